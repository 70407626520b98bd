"""Hot loops: Numba kernels (arrays in, arrays out) and FAISS wrappers (GPU when visible, CPU otherwise).

Names are imported lazily so that ``import native`` stays cheap and a kernel compiles only when first used.
"""

from __future__ import annotations

import importlib

_LAZY = {
    # module: names
    "native.rng": ("mix_seed", "permutation", "shuffle_segments"),
    "native.batching": ("budget_cuts", "fixed_sizes", "split_to_multiple"),
    "native.ragged": ("gather_ragged", "pack_ragged", "pad_ragged"),
    "native.faiss_ops": ("kmeans", "knn_search"),
    "native.decompose": ("decompose_lengths",),
    "native.balanced_kmeans": ("balanced_kmeans",),
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'native' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
