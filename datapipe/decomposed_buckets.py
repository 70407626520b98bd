"""The materialized buckets of a decomposition (``datapipe decompose --materialize``): one Arrow file per bucket
``k`` whose rows are whole ``2^k`` sequences, gathered once from the dataset's shards.

Storage side of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum" (Pouransari
et al., NeurIPS 2024): :func:`materialize_buckets` writes the files (called by :func:`datapipe.decomposition.
write_index`), ``DecomposedIndex.open_bucket`` reads them back (checked), :class:`datapipe.DecomposedDataset`
serves them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from datapipe.dataset import ArrowDataset
from datapipe.format import DatasetError, file_checksum
from native.ragged import concat_ranges

__all__ = ["gather_sequences", "materialize_buckets"]


def gather_sequences(ds: ArrowDataset, index, seq_ids, *, pad_id: int = 0, column: str = "input_ids"):
    """Tokens of sequences of one bucket, read from the dataset's shards.

    Args:
        ds: the dataset the index was built on.
        index: a ``DecomposedIndex`` (or any object with its arrays).
        seq_ids: int ``[b]`` sequence ids, all with the same ``sequence_log2``.
        pad_id: id written into padding.

    Returns:
        ``(ids, pieces)``: int32 ``[b, 2^k]`` tokens, and the int64 piece positions ``[p]`` in batch order.
    """
    seq = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
    if len(seq) == 0:
        raise ValueError("seq_ids is empty")
    ks = np.unique(index.sequence_log2[seq])
    if len(ks) != 1:
        raise ValueError(f"a batch must hold sequences of one bucket (got log2 sizes {ks.tolist()}); use "
                         "samplers.DecomposedBatchSampler")
    L = 1 << int(ks[0])
    so = index.sequence_offsets
    lo, hi = so[seq], so[seq + 1]
    pieces = concat_ranges(lo, hi - lo)
    rows = index.row[pieces]
    plen = index.length[pieces]
    uniq, inv = np.unique(rows, return_inverse=True)
    col = ds.__getitems__(uniq)[column]
    values, offsets = np.asarray(col.values), np.asarray(col.offsets)
    ids = np.full(len(seq) * L, pad_id, dtype=np.int32)
    # destination of each piece: its row's base plus the tokens of the row's earlier pieces
    row_of_piece = np.repeat(np.arange(len(seq), dtype=np.int64), hi - lo)
    cum = np.cumsum(plen) - plen
    first = np.concatenate([[0], np.cumsum(hi - lo)[:-1]])
    within = cum - np.repeat(cum[first], hi - lo)
    dst_start = row_of_piece * L + within
    src_start = offsets[inv] + index.start[pieces]
    shift = np.repeat(src_start - dst_start, plen)
    dst = concat_ranges(dst_start, plen)
    ids[dst] = values[dst + shift]
    return ids.reshape(len(seq), L), pieces


def materialize_buckets(ds: ArrowDataset, arrays: dict, params: dict, out_dir: str | os.PathLike, *,
                        pad_id: int = 0, rows_per_chunk_tokens: int = 1 << 22,
                        progress: Callable[[str, float], None] | None = None) -> dict:
    """Write one Arrow file per bucket: ``input_ids`` fixed_size_list<int32>[2^k] rows and their ``sequence``.

    Returns:
        the ``materialized`` manifest entry: ``{"pad_id", "buckets": {k: {file, rows, bytes, checksum}}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = SimpleNamespace(**{k: arrays[k] for k in ("row", "start", "length", "sequence", "sequence_log2",
                                                       "sequence_tokens", "sequence_offsets")})
    log2 = arrays["sequence_log2"]
    ks = list(range(params["min_log2"], params["max_log2"] + 1))
    total = max(int(len(log2)), 1)
    done = 0
    buckets = {}
    for k in ks:
        members = np.flatnonzero(log2 == k)
        L = 1 << k
        path = out / f"k{k:02d}.arrow"
        schema = pa.schema([("input_ids", pa.list_(pa.int32(), L)), ("sequence", pa.int64())])
        chunk = max(1, rows_per_chunk_tokens >> k)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for a in range(0, len(members), chunk):
                seq = members[a : a + chunk]
                ids, _ = gather_sequences(ds, index, seq, pad_id=pad_id)
                arr = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), L)
                w.write_batch(pa.record_batch([arr, pa.array(seq)], schema=schema))
                done += len(seq)
                if progress:
                    progress("materialize", done / total)
        if not path.exists():
            raise DatasetError(f"{path}: not written")
        buckets[str(k)] = {"file": path.name, "rows": int(len(members)), "bytes": path.stat().st_size,
                           "checksum": file_checksum(path)}
    return {"pad_id": int(pad_id), "buckets": buckets}
