"""The dataset of a decomposition: each item is a batch, ``[b, 2^k]`` token tensors with document boundaries.

The delivery side of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum"
(Pouransari et al., NeurIPS 2024). :class:`DecomposedDataset` maps a batch of sequence ids (from
``samplers.DecomposedBatchSampler``, all of one bucket ``k``) to tensors. Bucket sequences are one slice of one
document; packed remainder sequences hold several documents' tails back to back, padding-free, and
``cu_seqlens`` gives their boundaries (flash-attention varlen layout over the flattened ``b * 2^k`` tokens).
Tokens come from the dataset's memory-mapped shards (zero-copy index) or, after ``--materialize``, from the
per-bucket files where every sequence is one contiguous ``2^k`` row.

The dataset returns the collated batch; ``datapipe.DataLoader``'s default collate passes it through (with a
plain ``torch.utils.data.DataLoader`` give ``collate_fn=datapipe.collate.collate_decomposed``)::

    ds = DecomposedDataset(ArrowDataset.open(path))
    loader = datapipe.DataLoader(ds, batch_sampler=DecomposedBatchSampler(ds.index, tokens_per_batch=65536))
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from datapipe.dataset import ArrowDataset, Batch
from datapipe.decomposition import DecomposedIndex
from datapipe.dtypes import np_dtype
from datapipe.format import DatasetError
from native.ragged import concat_ranges, pad_tails, place_pieces

__all__ = ["DecomposedDataset"]


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
        self.dataset = dataset if isinstance(dataset, ArrowDataset) else ArrowDataset.open(dataset)
        self._own_index = index is not None  # a user's index travels with the dataset when pickled
        if index is None:
            index = DecomposedIndex.open(self.dataset)  # a remote dataset's index comes through its cache
        self.index = index
        self.pad_id, self.label_pad, self.column = int(pad_id), int(label_pad), column
        self.dtype = np_dtype(dtype, "dtype")
        self._buckets: dict[int, NDArray] | None = None

    def __getstate__(self):
        # the stored index is reopened from the dataset directory (memory-mapped); a user's index is pickled
        from datapipe.remote import RemoteArrowDataset  # pickles its URL, filesystem and cache settings

        path = self.dataset if isinstance(self.dataset, RemoteArrowDataset) else str(self.dataset.path)
        return {"path": path, "index": self.index if self._own_index else None,
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
            t = self.index.open_bucket(k)  # checked against the manifest's checksum, once per process
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
        pieces = concat_ranges(so[seq], npieces)
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
