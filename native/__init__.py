"""Hot loops: Numba kernels (arrays in, arrays out) and FAISS wrappers (GPU when visible, CPU otherwise).

Names are imported lazily so that ``import native`` stays cheap and a kernel compiles only when first used.
"""

from __future__ import annotations

from native._lazy import attach

_LAZY = {
    # module: names
    "native.rng": ("mix_seed", "permutation", "shuffle_segments"),
    "native.batching": ("budget_cuts", "fixed_sizes", "split_to_multiple"),
    "native.ragged": ("gather_ragged", "pack_ragged", "pad_ragged"),
    "native.faiss_ops": ("assign", "gpu_available", "kmeans", "knn", "knn_search"),
    "native.tas": ("bin_table", "draw_pairs", "margin_bins"),
    "native.curriculum": ("curriculum_order",),
    "native.decompose": ("decompose_lengths",),
    "native.balanced": ("balanced_kmeans", "leaf_sizes"),
    "native.feistel": ("feistel_index", "feistel_permute", "stream_batches"),
    "native.duration": ("assign_buckets_2d", "bucket_batches", "pack_best_fit"),
    "native.rounding": ("largest_remainder",),
}
_MODULES = ()

__getattr__, __dir__, __all__, _WHERE = attach(__name__, _LAZY, _MODULES)
