"""Storage and delivery: dataset directories of memory-mapped Arrow IPC shards, ``ArrowDataset``, a drop-in
``DataLoader`` with exact resume, collators, the decomposition index and the Ray Data engine.

Names are imported lazily so ``import datapipe`` is cheap and torch loads only when the loader is used.
"""

from __future__ import annotations

from datapipe import urls
from native._lazy import attach

_LAZY = {
    "datapipe.writer": ("write_dataset",),
    "datapipe.dataset": ("ArrowDataset", "Batch", "DatasetError", "Ragged"),
    "datapipe.loader": ("DataLoader", "SeededRandomSampler"),
    "datapipe.tokenize": ("ByteTokenizer", "load_tokenizer"),
    "datapipe.ingestion": ("ingest",),
    "datapipe.decomposition": ("DecomposedIndex", "decompose"),
    "datapipe.decomposed_dataset": ("DecomposedDataset",),
    "datapipe.audio": ("import_lhotse_cuts", "ingest_audio"),
    "datapipe.tas_ingest": ("cluster_embeddings", "ingest_tas", "load_pair_table", "save_pair_table"),
    "datapipe.multi": ("MultiDataset",),
    "datapipe.recipe": ("Recipe",),
    "datapipe.immiscible": ("ImmiscibleCollate",),
}
_MODULES = ("collate", "immiscible")

__getattr__, __dir__, __all__, _WHERE = attach(__name__, _LAZY, _MODULES)


def _open_remote(url, **options):
    # ArrowDataset.open(url) reaches datapipe.remote through this opener (datapipe.urls holds it), so
    # datapipe.dataset never imports datapipe.remote (which subclasses its ArrowDataset: no import cycle), and the
    # opener is in place whichever datapipe module is imported first; the import waits for the first URL, so
    # `import datapipe` stays free of torch
    from datapipe.remote import RemoteArrowDataset

    return RemoteArrowDataset(url, **options)


urls.register_remote_opener(_open_remote)
