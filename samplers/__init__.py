"""Batch samplers: one technique per module, all following the contract of ``samplers.base``.

Each sampler reads small numpy metadata arrays (never payloads) and yields int64 row-index arrays, one per
batch, for its rank. Names are imported lazily so ``import samplers`` does not import torch or compile kernels;
``__init__.pyi`` lists them for readers and type checkers (generated: ``python -m native._stubgen``).
"""

from __future__ import annotations

from native._lazy import attach

_LAZY = {
    "samplers.base": ("BatchSamplerBase", "Plan", "PlanStats", "PlanWarning"),
    "samplers.random": ("RandomBatchSampler",),
    "samplers.token_budget": ("TokenBudgetBatchSampler",),
    "samplers.decomposed": ("DecomposedBatchSampler",),
    "samplers.duration": ("DurationBucketSampler", "estimate_duration_bins", "estimate_duration_bins_2d"),
    "samplers.packing": ("PackedDurationSampler",),
    "samplers.calibrate": ("BatchShape", "BatchShape2D", "calibrate_batch_sizes"),
    "samplers.topic_aware": ("PairTable", "TopicAwareBatchSampler"),
    "samplers.ngame": ("NGAMEBatchSampler",),
    "samplers.labels": ("positive_mask",),
    "samplers.immiscible": ("ImmiscibleCollate", "assign_linear", "knn_noise", "knn_noise_exact", "plain_noise"),
    "samplers.mixture": ("MixtureBatchSampler", "largest_remainder_counts"),
    "samplers.shaped_mixture": ("ShapedMixtureBatchSampler",),
}
_MODULES = ("base", "bins", "calibrate", "decomposed", "duration", "immiscible", "labels", "mixture", "ngame",
            "packing", "random", "shaped_mixture", "token_budget", "topic_aware")
# moved to datapipe.immiscible (a collator, not a sampler); these resolve for one release and warn
_DEPRECATED = ("ImmiscibleCollate", "assign_linear", "immiscible", "knn_noise", "knn_noise_exact", "plain_noise")

__getattr__, __dir__, __all__, _WHERE = attach(__name__, _LAZY, _MODULES, _DEPRECATED)
