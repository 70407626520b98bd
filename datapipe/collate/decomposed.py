"""Batches of a decomposed dataset: ``[b, 2^k]`` token tensors with document boundaries.

The delivery side of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum"
(Pouransari et al., NeurIPS 2024). :class:`DecomposedDataset` maps a batch of sequence ids (from
``samplers.DecomposedBatchSampler``, all of one bucket ``k``) to tensors. Bucket sequences are one slice of one
document; packed remainder sequences hold several documents' tails back to back, padding-free, and
``cu_seqlens`` gives their boundaries (flash-attention varlen layout over the flattened ``b * 2^k`` tokens).
Tokens come from the dataset's memory-mapped shards (zero-copy index) or, after ``--materialize``, from the
per-bucket files where every sequence is one contiguous ``2^k`` row.

The dataset returns the collated batch; ``datapipe.DataLoader``'s default collate passes it through (with a
plain ``torch.utils.data.DataLoader`` give ``collate_fn=collate_decomposed``)::

    ds = DecomposedDataset(ArrowDataset.open(path))
    loader = datapipe.DataLoader(ds, batch_sampler=DecomposedBatchSampler(ds.index, tokens_per_batch=65536))
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from numpy.typing import NDArray

from datapipe.dataset import ArrowDataset, Batch
from datapipe.format import DatasetError, file_checksum
from native.ragged import pad_tails, place_pieces

__all__ = ["DecomposedDataset", "collate_decomposed", "gather_sequences", "materialize_buckets"]


def _ranges(lo: NDArray[np.int64], hi: NDArray[np.int64]) -> NDArray[np.int64]:
    """Concatenation of ``arange(lo[i], hi[i])`` for every i, vectorised."""
    n = hi - lo
    total = int(n.sum())
    base = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return base + np.arange(total, dtype=np.int64)


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
    pieces = _ranges(lo, hi)
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
    dst = _ranges(dst_start, dst_start + plen)
    ids[dst] = values[dst + shift]
    return ids.reshape(len(seq), L), pieces


class DecomposedDataset(torch.utils.data.Dataset):
    """Map-style dataset over the sequences of a decomposition.

    Args:
        dataset: an ``ArrowDataset`` or a dataset directory.
        index: its ``DecomposedIndex`` (default: the one stored beside the dataset).
        pad_id: id of padding tokens; label_pad: label at positions that carry no loss.
        column: the token column.

    ``ds[ids]`` / ``ds.__getitems__(ids)`` (ids of one bucket ``k``) returns a dict: ``input_ids`` int64
    ``[b, 2^k]``, ``labels`` int64 ``[b, 2^k]`` (the ids; ``label_pad`` at padding and at each document
    segment's first token), ``attention_mask`` int64 ``[b, 2^k]`` (0 at padding), ``position_ids`` int64
    ``[b, 2^k]`` (restarting at each segment), ``cu_seqlens`` int32 ``[segments+1]`` over the flattened
    ``b * 2^k`` tokens (padding is a segment of its own), ``max_seqlen`` int, ``sequence_ids`` int64 ``[b]``,
    ``log2`` int (a ``datapipe.dataset.Batch``, i.e. a dict). ``dtype`` (``torch.int64`` or ``torch.int32``)
    sets the dtype of ``input_ids``, ``attention_mask`` and ``position_ids``; labels stay int64. Tokens go from
    the shards' memory maps (or the materialized bucket rows) straight into the outputs, one pass per piece.

    Pickles (spawned DataLoader workers) with its dataset path, and with its index when one was passed in.
    """

    def __init__(self, dataset, index=None, *, pad_id: int = 0, label_pad: int = -100,
                 column: str = "input_ids", dtype=torch.int64) -> None:
        from datapipe.collate import _np_dtype

        self.dataset = dataset if isinstance(dataset, ArrowDataset) else ArrowDataset.open(dataset)
        self._own_index = index is not None  # a user's index travels with the dataset when pickled
        if index is None:
            from datapipe.decomposition import DecomposedIndex

            index = DecomposedIndex.open(self.dataset.path)
        self.index = index
        self.pad_id, self.label_pad, self.column = int(pad_id), int(label_pad), column
        self.dtype = _np_dtype(dtype, "dtype")
        self._buckets: dict[int, NDArray] | None = None

    def __getstate__(self):
        # the stored index is reopened from the dataset directory (memory-mapped); a user's index is pickled
        return {"path": str(self.dataset.path), "index": self.index if self._own_index else None,
                "pad_id": self.pad_id, "label_pad": self.label_pad, "column": self.column, "dtype": self.dtype.name}

    def __setstate__(self, state):
        self.__init__(state["path"], state.get("index"), pad_id=state["pad_id"], label_pad=state["label_pad"],
                      column=state["column"], dtype=state.get("dtype", "int64"))

    def __len__(self) -> int:
        return int(len(self.index.sequence_log2))

    def _materialized_ids(self, seq: NDArray[np.int64], k: int) -> NDArray | None:
        meta = getattr(self.index, "materialized", None)
        if not meta or self.pad_id != meta.get("pad_id", 0):
            return None
        if self._buckets is None:
            self._buckets = {}
        if k not in self._buckets:
            info = meta["buckets"][str(k)]
            t = pa.ipc.open_file(pa.memory_map(str(Path(self.index.path) / "buckets" / info["file"]), "r")).read_all()
            # zero-copy [rows, 2^k] views of the memory-mapped record batches (one per chunk of rows)
            views = [c.values.to_numpy().reshape(-1, 1 << k) for c in t.column("input_ids").chunks]
            starts = np.cumsum([0] + [len(v) for v in views])
            self._buckets[k] = (views, starts, t.column("sequence").to_numpy())
        views, starts, seqs = self._buckets[k]
        pos = np.searchsorted(seqs, seq)
        if len(pos) == 0 or (pos >= len(seqs)).any() or (seqs[np.minimum(pos, len(seqs) - 1)] != seq).any():
            raise DatasetError(f"{self.index.path}/buckets: sequence(s) missing from the materialized bucket {k}; "
                               "rerun `datapipe decompose --materialize`")
        chunk = np.searchsorted(starts, pos, side="right") - 1
        out = np.empty((len(seq), 1 << k), dtype=np.int32)
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = views[c][pos[sel] - starts[c]]
        return out

    def __getitems__(self, seq_ids) -> dict:
        seq = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        if len(seq) == 0:
            raise ValueError("seq_ids is empty")
        n = len(self)
        if seq.min() < 0 or seq.max() >= n:
            raise IndexError(f"sequence id {int(seq[(seq < 0) | (seq >= n)][0])} is out of range [0, {n})")
        index = self.index
        ks = np.unique(index.sequence_log2[seq])
        if len(ks) != 1:
            raise ValueError(f"a batch must hold sequences of one bucket (got log2 sizes {ks.tolist()}); use "
                             "samplers.DecomposedBatchSampler")
        k = int(ks[0])
        L = 1 << k
        b = len(seq)
        so = index.sequence_offsets
        npieces = so[seq + 1] - so[seq]
        pieces = _ranges(so[seq], so[seq + 1])
        plen = index.length[pieces]
        # where each piece lands in the flat [b * L] outputs: its row's base plus the row's earlier pieces
        row_of_piece = np.repeat(np.arange(b, dtype=np.int64), npieces)
        first = np.concatenate([[0], np.cumsum(npieces)[:-1]]).astype(np.int64)
        cum = np.cumsum(plen) - plen
        within = cum - np.repeat(cum[first] if len(cum) else cum, npieces)
        dst = row_of_piece * L + within
        ids = np.empty(b * L, dtype=self.dtype)
        labels, mask, pos = np.empty(b * L, dtype=np.int64), np.empty(b * L, dtype=self.dtype), np.empty(b * L, dtype=self.dtype)
        mat = self._materialized_ids(seq, k)
        if mat is not None:  # rows of the bucket file: each piece sits at its place in its row already
            offs = np.arange(b + 1, dtype=np.int64) * L
            place_pieces(offs, mat.reshape(-1), row_of_piece, within, plen, dst, ids, labels, mask, pos,
                         label_pad=self.label_pad)
        else:  # straight from the shards' memory maps: only the pieces' tokens are read
            uniq, inv = np.unique(index.row[pieces], return_inverse=True)
            col = self.dataset.__getitems__(uniq)[self.column]
            parts = col.parts if getattr(col, "parts", None) is not None else (
                (col.offsets, col.values, np.arange(len(uniq)), np.arange(len(uniq))),)
            part_of, local_of = np.empty(len(uniq), dtype=np.int64), np.empty(len(uniq), dtype=np.int64)
            for i, (_, _, rows, at) in enumerate(parts):
                part_of[at], local_of[at] = i, rows
            start = index.start[pieces]
            for i, (offs, vals, _, _) in enumerate(parts):
                sel = slice(None) if len(parts) == 1 else part_of[inv] == i
                place_pieces(offs, vals, local_of[inv[sel]], start[sel], plen[sel], dst[sel], ids, labels, mask,
                             pos, label_pad=self.label_pad)
        tokens = index.sequence_tokens[seq]
        pad_tails(tokens, L, ids, labels, mask, pos, pad_id=self.pad_id, label_pad=self.label_pad)
        # segments: each row's pieces, then its padding (when any) as one more segment
        pad = L - tokens
        seg = np.insert(plen, np.cumsum(npieces)[pad > 0], pad[pad > 0])
        cu = np.zeros(len(seg) + 1, dtype=np.int32)
        np.cumsum(seg, out=cu[1:])
        # a Batch, so datapipe.DataLoader's default collate passes the tensors through unchanged
        return Batch({"input_ids": torch.from_numpy(ids.reshape(b, L)), "labels": torch.from_numpy(labels.reshape(b, L)),
                      "attention_mask": torch.from_numpy(mask.reshape(b, L)),
                      "position_ids": torch.from_numpy(pos.reshape(b, L)), "cu_seqlens": torch.from_numpy(cu),
                      "max_seqlen": int(seg.max()) if len(seg) else 0, "sequence_ids": torch.from_numpy(seq.copy()),
                      "log2": k}, b, seq)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.__getitems__(np.array([i]))
        return self.__getitems__(i)


def collate_decomposed(batch) -> dict:
    """A ``collate_fn`` for :class:`DecomposedDataset` (optional with ``datapipe.DataLoader``, whose default
    collate does the same): the batch is already collated, returned as a plain dict."""
    return dict(batch)


def materialize_buckets(ds: ArrowDataset, arrays: dict, params: dict, out_dir: str | os.PathLike, *,
                        pad_id: int = 0, rows_per_chunk_tokens: int = 1 << 22,
                        progress: Callable[[str, float], None] | None = None) -> dict:
    """Write one Arrow file per bucket: ``input_ids`` fixed_size_list<int32>[2^k] rows and their ``sequence``.

    Returns:
        the ``materialized`` manifest entry: ``{"pad_id", "buckets": {k: {file, rows, bytes, checksum}}}``.
    """
    from types import SimpleNamespace

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
