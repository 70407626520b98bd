"""The collate of :class:`datapipe.DecomposedDataset` (whose items are already collated batches).

``DecomposedDataset`` lives in :mod:`datapipe.decomposed_dataset` and the bucket writer in
:mod:`datapipe.decomposed_buckets`; their old names here resolve for one release with a ``DeprecationWarning``.
"""

from __future__ import annotations

__all__ = ["collate_decomposed"]

_MOVED = {"DecomposedDataset": "datapipe.decomposed_dataset", "gather_sequences": "datapipe.decomposed_buckets",
          "materialize_buckets": "datapipe.decomposed_buckets"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"datapipe.collate.decomposed.{name} moved to {_MOVED[name]}; import it from there (the old "
                      "name goes in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def collate_decomposed(batch) -> dict:
    """A ``collate_fn`` for :class:`DecomposedDataset` (optional with ``datapipe.DataLoader``, whose default
    collate does the same): the batch is already collated, returned as a plain dict."""
    return dict(batch)
