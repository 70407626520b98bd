"""Lazy package exports (the ``lazy_loader.attach`` pattern of scientific Python): a package lists which module
defines each public name, and the name is imported on first access. Keeps ``import samplers`` free of torch and
of kernel compilation. Lives in ``native/`` because every package may import it (DESIGN.md's import rules).

Readers and type checkers cannot follow a run-time ``__getattr__``, so each package also ships an
``__init__.pyi`` stub with one explicit ``from .mod import Name as Name`` line per export and the same
``__all__``, generated from the same tables by ``native._stubgen`` (``make stubs``); a test checks they match.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def attach(package: str, lazy: Mapping[str, tuple[str, ...]], modules: tuple[str, ...] = (),
           deprecated: tuple[str, ...] = ()) -> tuple[Callable, Callable, list[str], dict[str, str]]:
    """Build a package's ``__getattr__``, ``__dir__``, sorted ``__all__`` and name -> module map.

    Args:
        package: the package's ``__name__``.
        lazy: module path -> names it defines.
        modules: submodules exported as attributes (``datapipe.collate``).
        deprecated: names of ``lazy`` or ``modules`` that still resolve but are left out of ``__all__``,
            ``dir()`` and the stub (old names kept one release; their module warns when imported).
    """
    where = {name: mod for mod, names in lazy.items() for name in names}
    unknown = sorted(set(deprecated) - set(where) - set(modules))
    if unknown:
        raise ValueError(f"{package}: deprecated names {unknown} are not in its lazy table or modules")
    exported = sorted(n for n in {*where, *modules} if n not in deprecated)
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
