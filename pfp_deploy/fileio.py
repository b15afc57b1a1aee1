"""Writing files safely, in one place: every artifact pfp-deploy writes goes through here.

- Atomic: the data goes to a fresh temp file next to the target (created with O_EXCL, so a planted
  file or symlink of that name is never opened), is fsync'ed, then renamed over the target. A crash or
  a full disk leaves the previous file (or none), never a torn or empty one.
- Never through a symlink: rename replaces a symlink at the target itself; what it pointed to is
  untouched.
- Modes from the umask (0666 & ~umask, like `open()`), for every artifact alike: mkstemp's 0600
  would make some files private and others not.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` would give a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def _temp_in(directory: Path, name: str) -> tuple[int, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TEMP_SUFFIX)
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path next to `path` for a writer that wants a file name (torch.save, ONNX
    export); it is moved over `path` only when the block succeeds, and removed otherwise."""
    path = Path(path)
    fd, tmp = _temp_in(path.parent, path.name)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """open() for writing, atomically: the target changes only when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = _temp_in(path.parent, path.name)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to `path` atomically. torch reports a failed write (full disk, file size limit)
    as a RuntimeError from its C++ writer; it becomes an OSError that names the file and free space."""
    import shutil

    import torch

    path = Path(path)
    with atomic_open(path, "wb") as f:
        try:  # through the file object: the archive's inner folder is then "archive", not the temp name
            torch.save(obj, f)
        except RuntimeError as exc:
            free = shutil.disk_usage(path.parent).free
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OSError(f"could not write {path} ({first}); {free / 2**20:.0f} MiB free on its disk: "
                          "free some space (or raise the file size limit) and rerun with --resume") from exc
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def replace_into(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished file (e.g. from a temp folder) over `target`, with the umask's mode."""
    os.chmod(source, file_mode())
    os.replace(source, target)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoints and exports can be 100s of MB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the `.*.tmp` files an interrupted run left under `directory` (for --resume)."""
    removed = []
    for tmp in Path(directory).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file() or tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LockedError(OSError):
    """Another live process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


_HELD_LOCKS: weakref.WeakSet = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, a library's helper process): close the copies of the
    parent's lock descriptors. A flock belongs to the open file, so a child that outlives the run
    would otherwise keep its directory locked; closing a copy (no LOCK_UN) leaves the parent's lock."""
    for lock in list(_HELD_LOCKS):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None


os.register_at_fork(after_in_child=_drop_inherited_locks)


class FileLock:
    """An exclusive advisory lock (flock) on `path`, held until release() or the process ends.

    The kernel drops a flock when its holder dies, so a killed run never leaves a stale lock; the
    file's text (pid, host, start time) only serves to tell the next process who holds it.
    """

    def __init__(self, path: str | os.PathLike, holder: str):
        self.path, self.holder, self._fd = Path(path), holder, None

    def acquire(self) -> FileLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LockedError(self.path, text) from None
        os.ftruncate(fd, 0)
        os.write(fd, self.holder.encode())
        self._fd = fd
        _HELD_LOCKS.add(self)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking it would race)
            self._fd = None
            _HELD_LOCKS.discard(self)

    def __del__(self) -> None:  # a lock dropped without release() must not outlive its owner object
        self.release()

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
