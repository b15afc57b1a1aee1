"""The one registry mechanism behind every extension point (runtimes, pruning criteria, ...).

A `Registry` holds one instance per registered class, keyed by the class's lower-case `name`. The
modules of its package whose names do not start with "_" are imported on first use, so a new
built-in is one new file there; an entry of your own is one decorated class in your own code,
imported before a recipe names it (docs/extending.md).
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from typing import Generic, TypeVar

from pfp_deploy.errors import UsageError, did_you_mean

T = TypeVar("T")
NAME = re.compile(r"[a-z][a-z0-9_-]*")


class Registry(Generic[T]):
    """Entries of one kind (`kind` names them in messages: "runtime", "pruning method")."""

    def __init__(self, kind: str, base: type[T], package: str, example: str,
                 check: Callable[[type[T]], None] | None = None):
        self.kind, self.base, self.package, self.example, self.check = kind, base, package, example, check
        self._entries: dict[str, T] = {}
        self._builtins_loaded = False

    def _load_builtins(self) -> None:
        """Import every public module of the package once (each registers its entries)."""
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        package = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: add an instance of `cls` under `cls.name`, and return the class."""
        self._load_builtins()  # an entry of your own must not shadow a built-in by import order
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"the {self.kind} decorator takes a subclass of {self.base.__module__}."
                            f"{self.base.__qualname__}, got {cls!r}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UsageError(f"{cls.__qualname__}.name must be a lower-case name such as {self.example!r}, "
                             f"got {name!r}")
        if self.check is not None:
            self.check(cls)
        old = self._entries.get(name)
        if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
            raise UsageError(f"{self.kind} {name!r} is already registered by {type(old).__module__}."
                             f"{type(old).__qualname__}; pick another name or unregister it first")
        self._entries[name] = cls()  # the same class again (its module re-imported) replaces the old entry
        return cls

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests and plugins that replace one)."""
        self._entries.pop(self.get(name).name)

    def all(self) -> tuple[T, ...]:
        """Every registered entry, built-ins first."""
        self._load_builtins()
        return tuple(self._entries.values())

    def names(self) -> list[str]:
        return [entry.name for entry in self.all()]

    def get(self, name: str) -> T:
        """The entry registered as `name` (any case); UsageError listing the valid names otherwise."""
        self._load_builtins()
        entry = self._entries.get(str(name).strip().lower())
        if entry is None:
            names = list(self._entries)
            raise UsageError(f"unknown {self.kind} {str(name)!r}; valid: {', '.join(names)}."
                             f"{did_you_mean(name, names)}")
        return entry
