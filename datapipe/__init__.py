"""Storage and delivery: dataset directories of memory-mapped Arrow IPC shards, ``ArrowDataset``, a drop-in
``DataLoader`` with exact resume, collators, the decomposition index and the Ray Data engine.

Names are imported lazily so ``import datapipe`` is cheap and torch loads only when the loader is used.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "datapipe.writer": ("write_dataset",),
    "datapipe.dataset": ("ArrowDataset", "Batch", "DatasetError", "Ragged"),
    "datapipe.loader": ("DataLoader",),
    "datapipe.tokenize": ("ByteTokenizer", "load_tokenizer"),
    "datapipe.ingestion": ("ingest",),
    "datapipe.decompose": ("DecomposedIndex", "decompose"),
    "datapipe.audio": ("import_lhotse_cuts", "ingest_audio"),
    "datapipe.tas_ingest": ("ingest_tas",),
}
_MODULES = ("collate",)
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = sorted([*_WHERE, *_MODULES])


def __getattr__(name: str):
    if name in _MODULES:
        module = importlib.import_module(f"datapipe.{name}")
        globals()[name] = module
        return module
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'datapipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
