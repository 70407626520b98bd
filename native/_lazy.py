"""Lazy package exports (the ``lazy_loader.attach`` pattern of scientific Python): a package lists which module
defines each public name, and the name is imported on first access. Keeps ``import samplers`` free of torch and
of kernel compilation. Lives in ``native/`` because every package may import it (DESIGN.md's import rules)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def attach(package: str, lazy: Mapping[str, tuple[str, ...]], modules: tuple[str, ...] = ()
           ) -> tuple[Callable, Callable, list[str], dict[str, str]]:
    """Build a package's ``__getattr__``, ``__dir__``, sorted ``__all__`` and name -> module map.

    Args:
        package: the package's ``__name__``.
        lazy: module path -> names it defines.
        modules: submodules exported as attributes (``samplers.immiscible``).
    """
    where = {name: mod for mod, names in lazy.items() for name in names}
    exported = sorted([*where, *(m for m in modules if m not in where)])
    pkg_globals: dict = {}

    def __getattr__(name: str):
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(mod), name)

    def __dir__():
        return sorted(set(pkg_globals) | set(exported))

    return __getattr__, __dir__, exported, where
