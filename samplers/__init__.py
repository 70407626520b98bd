"""Batch samplers: one technique per module, all following the contract of ``samplers.base``.

Each sampler reads small numpy metadata arrays (never payloads) and yields int64 row-index arrays, one per
batch, for its rank. Names are imported lazily so ``import samplers`` does not import torch or compile kernels.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "samplers.base": ("BatchSamplerBase", "Plan"),
    "samplers.random": ("RandomBatchSampler",),
    "samplers.token_budget": ("TokenBudgetBatchSampler",),
    "samplers.decomposed": ("DecomposedBatchSampler",),
    "samplers.duration": ("DurationBucketSampler", "estimate_duration_bins", "estimate_duration_bins_2d"),
    "samplers.packing": ("PackedDurationSampler",),
    "samplers.calibrate": ("calibrate_batch_sizes",),
    "samplers.topic_aware": ("PairTable", "TopicAwareBatchSampler"),
    "samplers.ngame": ("NGAMEBatchSampler",),
    "samplers.mixture": ("MixtureBatchSampler",),
}
_MODULES = ("base", "calibrate", "decomposed", "duration", "immiscible", "mixture", "ngame", "packing",
            "random", "token_budget", "topic_aware")
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _MODULES:
        module = importlib.import_module(f"samplers.{name}")
        globals()[name] = module
        return module
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'samplers' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))
