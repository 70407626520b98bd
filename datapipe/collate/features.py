"""Padding-free speech collation: a batch's feature matrices (or waveforms) back to back, with ``cu_seqlens``.

The collator of the packing side of "Training and Inference Efficiency of Encoder-Decoder Speech Models"
(Żelasko et al., 2025): with a varlen-attention encoder (FlashAttention's ``flash_attn_varlen_func``, PyTorch
nested tensors) a pack of cuts (``samplers.PackedDurationSampler``) costs exactly its frames, nothing padded.

Input is what ``ArrowDataset.__getitems__`` returns (a Mapping whose list columns are ``Ragged``; the ragged
values of a batch are already contiguous in batch order, so the output is a zero-copy view) or a list of per-row
dicts (each ``features`` a ``[T, F]`` array, or flat with ``feature_dim``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from datapipe.collate.buffers import output_group
from datapipe.dataset import Ragged
from native.ragged import gather_values
from native.shards import gather_shard_values

__all__ = ["FeaturesCollate", "collate_features", "features_collator"]

_DIM_COLUMN = "feature_dim"
_SKIP = {"num_frames", "num_samples", _DIM_COLUMN}


def _pick_column(keys, column: str | None) -> str:
    if column is not None:
        if column not in keys:
            raise KeyError(f"batch has no column {column!r} (columns: {sorted(keys)})")
        return column
    for c in ("features", "audio"):
        if c in keys:
            return c
    raise KeyError(f"batch has neither 'features' nor 'audio' (columns: {sorted(keys)}); pass column=")


def _rows_to_columns(rows: Sequence[Mapping], column: str | None, feature_dim: int | None):
    """Per-row dicts -> (column name, flat values, int64 offsets in values, feature dim, other columns)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    column = _pick_column(rows[0].keys(), column)
    mats = []
    for i, r in enumerate(rows):
        m = r[column]
        m = np.asarray(m.numpy() if hasattr(m, "numpy") else m)
        if m.ndim == 2:
            f = m.shape[1]
        elif m.ndim == 1:
            f = int(r.get(_DIM_COLUMN, feature_dim or 1))
        else:
            raise ValueError(f"row {i}: column {column!r} must be 1-D or 2-D (got shape {m.shape})")
        if feature_dim is not None and f != feature_dim:
            raise ValueError(f"row {i}: feature dim {f} differs from feature_dim={feature_dim}")
        feature_dim = f
        mats.append(m.reshape(-1))
    r = Ragged.from_list(mats)
    others = {k: [row[k] for row in rows] for k in rows[0] if k != column}
    return column, r, feature_dim, others


def collate_features(batch, *, column: str | None = None, feature_dim: int | None = None,
                     keep_columns: bool = True) -> dict:
    """Concatenate a batch's features (or audio samples) along time, with ``cu_seqlens`` for varlen attention.

    Args:
        batch: a Mapping of columns (``ArrowDataset.__getitems__``; list columns as ``Ragged``) or a list of
            per-row dicts.
        column: the feature column; default ``features``, else ``audio``.
        feature_dim: values per frame when the rows are stored flat; default the ``feature_dim`` column when
            present, else 1 (waveforms).
        keep_columns: pass the other columns through (numeric ones as tensors, the rest as lists).

    Returns:
        dict with ``features`` float ``[T, F]`` (the samples ``[T]`` when the column is ``audio``), ``cu_seqlens`` int32 ``[B+1]`` (frame
        offsets of each cut), ``lengths`` int64 ``[B]`` frames, ``max_seqlen`` (int), and the other columns.

    Raises:
        ValueError: rows whose value count is not a multiple of the feature dim, or differing feature dims.
    """
    if isinstance(batch, Mapping):
        column = _pick_column(batch.keys(), column)
        col = batch[column]
        r = col if isinstance(col, Ragged) else Ragged.from_list(list(col))
        dims = batch.get(_DIM_COLUMN)
        if feature_dim is None and dims is not None:
            dims = np.unique(np.asarray(dims))
            if len(dims) > 1:
                raise ValueError(f"rows have different feature dims {dims.tolist()}; collate them separately")
            feature_dim = int(dims[0]) if len(dims) else None
        others = {k: v for k, v in batch.items() if k != column}
    elif isinstance(batch, Sequence) and (len(batch) == 0 or isinstance(batch[0], Mapping)):
        column, r, feature_dim, others = _rows_to_columns(batch, column, feature_dim)
    else:
        raise TypeError(f"expected a Mapping of columns or a list of row dicts (got {type(batch).__name__})")
    f = int(feature_dim or 1)
    if f < 1:
        raise ValueError(f"feature_dim must be >= 1 (got {feature_dim=})")
    offsets = np.asarray(r.offsets, dtype=np.int64)
    if np.any(offsets % f):
        b = int(np.flatnonzero(np.diff(offsets) % f)[0]) if np.any(np.diff(offsets) % f) else 0
        raise ValueError(f"row {b} of column {column!r} holds {int(offsets[b + 1] - offsets[b])} values, not a "
                         f"multiple of feature_dim={f}")
    frames = offsets // f
    if frames[-1] >= 2**31:
        raise ValueError(f"{int(frames[-1])} frames overflow int32 cu_seqlens; use smaller packs")
    shards = getattr(r, "shards", None)
    if shards is not None or getattr(r, "parts", None) is not None:
        # straight from the shards' memory maps into the output (one pass; ints become float32 on the way)
        src = shards.val_like.dtype if shards is not None else r.parts[0][1].dtype
        (values,), tensor = output_group([(int(offsets[-1]), src if src.kind == "f" else np.float32)])
        if shards is not None:  # rows of many shards: one kernel call
            gather_shard_values(shards.off_addr, shards.val_addr, shards.shard, shards.local, offsets, values,
                                shards.off_like, shards.val_like)
        else:
            for off, val, rows, pos in r.parts:
                gather_values(off, val, rows, pos, offsets, values)
        feats = tensor(values)
    else:
        values = np.asarray(r.values)[offsets[0] : offsets[-1]]
        if values.dtype.kind != "f":
            values = values.astype(np.float32)
        feats = torch.from_numpy(np.ascontiguousarray(values))
    feats = feats.view(-1, f) if f > 1 or column == "features" else feats
    cu = (frames - frames[0]).astype(np.int32)
    lengths = np.diff(frames)
    out = {"features": feats, "cu_seqlens": torch.from_numpy(cu), "lengths": torch.from_numpy(lengths),
           "max_seqlen": int(lengths.max()) if len(lengths) else 0}
    if keep_columns:
        for k, v in others.items():
            if k in out or k in _SKIP:
                continue
            if isinstance(v, Ragged):
                out[k] = [torch.from_numpy(np.array(x)) for x in v]
            elif isinstance(v, np.ndarray) and v.dtype.kind in "iufb":
                out[k] = torch.from_numpy(np.ascontiguousarray(v))
            elif isinstance(v, list) and v and all(isinstance(x, (int, float, np.number, bool)) for x in v):
                out[k] = torch.as_tensor(np.asarray(v))
            else:
                out[k] = v
    return out


class FeaturesCollate:
    """:func:`collate_features` with its options bound: a picklable ``collate_fn`` (spawned DataLoader workers
    receive it by pickle, which a closure cannot do)."""

    def __init__(self, *, column: str | None = None, feature_dim: int | None = None, keep_columns: bool = True):
        if feature_dim is not None and (not isinstance(feature_dim, (int, np.integer)) or feature_dim < 1):
            raise ValueError(f"feature_dim must be an integer >= 1 (got {feature_dim=})")
        self.column, self.feature_dim, self.keep_columns = column, feature_dim, keep_columns

    def __call__(self, batch) -> dict:
        return collate_features(batch, column=self.column, feature_dim=self.feature_dim,
                                keep_columns=self.keep_columns)

    def __repr__(self) -> str:
        return (f"FeaturesCollate(column={self.column!r}, feature_dim={self.feature_dim!r}, "
                f"keep_columns={self.keep_columns!r})")


def features_collator(*, column: str | None = None, feature_dim: int | None = None,
                      keep_columns: bool = True) -> FeaturesCollate:
    """``collate_features`` with its options bound, for ``DataLoader(collate_fn=...)``; picklable."""
    return FeaturesCollate(column=column, feature_dim=feature_dim, keep_columns=keep_columns)
