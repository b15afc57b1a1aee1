"""Helpers for running under ``torchrun --nproc_per_node=N``.

Everything here degrades to a no-op in a plain single-process run, so callers never branch on
"am I distributed?" themselves: they pass a DistContext around and call the helpers.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from .errors import UsageError

__all__ = [
    "DistContext",
    "ShardSampler",
    "all_reduce_max",
    "all_reduce_sum",
    "average_buffers",
    "barrier",
    "cleanup",
    "init_distributed",
    "is_active",
    "shard_indices",
    "wrap_loader_for_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """True when there are several processes and a process group to talk to."""
        return self.world_size > 1 and is_active()


def is_active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"Environment variable {name}={value!r} is not an integer; torchrun sets it, "
                         "so unset it when not running under torchrun.") from None


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK, or return a single-process context.

    ``device`` picks the device type ("cpu" or "cuda"); by default CUDA when present. Under torchrun
    with CUDA each process gets ``cuda:LOCAL_RANK`` and the NCCL backend, otherwise gloo.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    wanted = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")

    if world_size <= 1:
        return DistContext(0, 1, 0, True, wanted)
    if not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world_size - 1}.")

    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("init_distributed(device='cuda') but no CUDA device is visible; use device='cpu'.")
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, init_method="env://",
                                      rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, rank == 0, wanted)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The indices of ``range(n)`` that ``rank`` of ``world`` owns (strided, so shards differ by at most one)."""
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"shard_indices: rank must be in 0..world-1, got rank={rank}, world={world}.")
    if n < 0:
        raise UsageError(f"shard_indices: n must be >= 0, got {n}.")
    return list(range(rank, n, world))


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise MAX across ranks; returns the tensor (unchanged single-process)."""
    if is_active():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise SUM across ranks; returns the tensor (unchanged single-process)."""
    if is_active():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def average_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running stats) across ranks so every rank holds one model."""
    if not is_active():
        return
    world = torch_dist.get_world_size()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.SUM)
            buffer.div_(world)


def barrier() -> None:
    """Wait for every rank; no-op single-process."""
    if is_active():
        torch_dist.barrier()


def cleanup() -> None:
    """Leave the process group if one was joined (safe to call always)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Yields this rank's ``shard_indices`` in order: no padding, so evaluation counts each sample once."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = shard_indices(n, rank, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def wrap_loader_for_distributed(loader: DataLoader, dist: DistContext, shuffle: bool, seed: int = 0,
                                *, even: bool = True) -> DataLoader:
    """Rebuild ``loader`` so that each rank reads its own part of the dataset.

    ``even=True`` (training) uses a DistributedSampler, seeded, which pads so all ranks take the same
    number of steps; call ``loader.sampler.set_epoch(e)`` each epoch. ``even=False`` (evaluation)
    uses a ShardSampler that never duplicates samples. The per-rank batch size stays the same, so the
    global batch grows with the world size. Single-process, the loader comes back unchanged.
    """
    if dist.world_size <= 1:
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise UsageError("Cannot shard a DataLoader over an IterableDataset across ranks; "
                         "use a map-style dataset or shard the stream yourself.")
    if loader.batch_size is None:
        raise UsageError("Cannot shard a DataLoader built with a custom batch_sampler; "
                         "build it with batch_size=... instead.")
    if even:
        sampler: Sampler[int] = DistributedSampler(loader.dataset, num_replicas=dist.world_size, rank=dist.rank,
                                                   shuffle=shuffle, seed=seed, drop_last=False)
    else:
        sampler = ShardSampler(len(loader.dataset), dist.rank, dist.world_size)
    extra = {}
    if loader.num_workers > 0:  # these options are only legal with worker processes
        extra = dict(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        **extra,
    )
