"""Which data, in what proportion, when: step schedules, RegMix, domain up-sampling at the end of training."""

from __future__ import annotations

import importlib

_LAZY = {
    "mixtures.schedules": ("Constant", "DomainUpsampling", "Linear", "Piecewise"),
}
_MODULES = ("regmix", "schedules")
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _MODULES:
        module = importlib.import_module(f"mixtures.{name}")
        globals()[name] = module
        return module
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'mixtures' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))
