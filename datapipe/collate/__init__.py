"""Collators: turn what ``ArrowDataset.__getitems__`` returns (a columnar :class:`~datapipe.dataset.Batch`), or a
list of per-row dicts, into torch tensors.

* :func:`pad` -> ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, L]``, right-padded.
* :func:`packed` -> padding-free: flat ``input_ids`` ``[T]``, ``cu_seqlens`` int32 ``[B+1]``, ``position_ids``
  ``[T]``, ``max_seqlen``, ``labels`` with -100 where a sequence starts (flash-attention varlen layout).

Both are Numba kernels (``nogil``, so :class:`datapipe.prefetch.ThreadPrefetcher` threads build batches in
parallel) writing from the memory-mapped shards straight into the output arrays (one pass: ``ArrowDataset.
__getitems__`` hands over unmaterialised :class:`Ragged` columns), then ``torch.from_numpy`` (no copy).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from datapipe.collate._parallel import KernelMode
from datapipe.collate._pool import POOL
from datapipe.collate.buffers import output_group
from datapipe.collate.decomposed import collate_decomposed
from datapipe.collate.features import FeaturesCollate, collate_features, features_collator
from datapipe.dataset import Batch, Ragged
from datapipe.dtypes import np_dtype
from native.ragged import gather_values, pack_layout, pad_rows
from native.shards import gather_shard_values, pad_shard_rows

__all__ = ["FeaturesCollate", "PackedCollate", "PadCollate", "collate_decomposed", "collate_features", "default",
           "features_collator", "packed", "pad", "ragged_column"]


def __getattr__(name: str):
    # a Dataset, not a collator: datapipe.DecomposedDataset (datapipe.decomposed_dataset); the old name resolves
    # for one release, looked up on use so the DeprecationWarning fires there
    if name == "DecomposedDataset":
        import warnings

        warnings.warn("datapipe.collate.DecomposedDataset moved to datapipe.DecomposedDataset "
                      "(datapipe.decomposed_dataset); the old name goes in the next release", DeprecationWarning,
                      stacklevel=2)
        from datapipe.decomposed_dataset import DecomposedDataset

        return DecomposedDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ragged_column(batch, column: str) -> Ragged:
    """Column ``column`` of a batch (a :class:`Batch`, a dict of columns, or a list of per-row dicts) as Ragged."""
    if isinstance(batch, Mapping):
        if column not in batch:
            raise KeyError(f"batch has no column {column!r} (columns: {sorted(batch)})")
        col = batch[column]
        return col if isinstance(col, Ragged) else Ragged.from_list(col)
    if isinstance(batch, Sequence) and (len(batch) == 0 or isinstance(batch[0], Mapping)):
        try:
            return Ragged.from_list([row[column] for row in batch])
        except KeyError:
            raise KeyError(f"a row has no column {column!r}") from None
    raise TypeError(f"expected a Batch, a dict of columns or a list of row dicts (got {type(batch).__name__})")


def _extras(batch, skip: set) -> dict:
    """Numeric scalar columns as tensors, other columns as they are."""
    out = {}
    if isinstance(batch, Mapping):
        items = batch.items()
    elif batch and isinstance(batch[0], Mapping):
        items = ((k, [row[k] for row in batch]) for k in batch[0])
    else:
        items = ()
    for k, v in items:
        if k in skip or isinstance(v, Ragged):
            continue
        if isinstance(v, np.ndarray) and v.dtype.kind in "iufb":
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        elif isinstance(v, list) and v and isinstance(v[0], (int, float, np.number, bool)):
            out[k] = torch.as_tensor(np.asarray(v))
        else:
            out[k] = v
    return out


def _sources(r: Ragged) -> tuple:
    """``(offsets, values, rows, pos)`` per source of a ragged column: the shards of an unmaterialised
    :class:`Ragged` (what ``ArrowDataset.__getitems__`` returns), else the batch's own values."""
    if getattr(r, "parts", None) is not None:
        return r.parts
    values, offsets = r.values, r.offsets
    if len(offsets) and (offsets[-1] > len(values) or (len(offsets) > 1 and np.any(np.diff(offsets) < 0))):
        raise ValueError(f"ragged column: offsets must be non-decreasing and end at most at len(values)="
                         f"{len(values)} (got offsets[-1]={offsets[-1]})")
    every = np.arange(len(offsets) - 1, dtype=np.int64)
    return ((offsets, values, every, every),)


class PadCollate:
    """Right-padding collate function (picklable, so it works with spawn/forkserver workers); see :func:`pad`."""

    def __init__(self, pad_id: int = 0, pad_to_multiple_of: int | None = None, *, column: str = "input_ids",
                 max_length: int | None = None, label_pad: int = -100, keep_columns: bool = True,
                 dtype=torch.int64, label_dtype=torch.int64):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 (got {pad_to_multiple_of=})")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (got {max_length=})")
        self.pad_id, self.pad_to_multiple_of, self.column = pad_id, pad_to_multiple_of, column
        self.max_length, self.label_pad, self.keep_columns = max_length, label_pad, keep_columns
        self.dtype, self.label_dtype = np_dtype(dtype, "dtype"), np_dtype(label_dtype, "label_dtype")
        self._mode = KernelMode()

    def __call__(self, batch) -> dict:
        r = ragged_column(batch, self.column)
        lengths = np.diff(r.offsets)
        L = int(lengths.max()) if len(lengths) else 0
        if self.max_length is not None:
            L = min(L, self.max_length)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(lengths)
        fresh = POOL.fresh
        (ids, mask, labels), tensor = output_group([((B, L), self.dtype), ((B, L), self.dtype),
                                                    ((B, L), self.label_dtype)])
        parallel = self._mode.pick()
        t0 = time.perf_counter()
        src = getattr(r, "shards", None)
        if src is not None:  # rows of many shards: one kernel call
            pad_shard_rows(src.off_addr, src.val_addr, src.shard, src.local, src.off_like, src.val_like, ids, mask,
                           labels, pad_id=self.pad_id, label_pad=self.label_pad, parallel=parallel)
        else:
            for off, val, rows, pos in _sources(r):  # one pass from each shard's buffers into the padded outputs
                pad_rows(off, val, rows, pos, ids, mask, labels, pad_id=self.pad_id, label_pad=self.label_pad,
                         parallel=parallel, check=False)
        # fresh buffers pay page faults inside the kernel: not a measure of the kernel
        self._mode.record(parallel, time.perf_counter() - t0, B * L if POOL.fresh == fresh else 0)
        out = {"input_ids": tensor(ids), "attention_mask": tensor(mask), "labels": tensor(labels)}
        if self.keep_columns:
            out.update(_extras(batch, {self.column, *out}))
        return out


class PackedCollate:
    """Padding-free collate function (picklable); see :func:`packed`."""

    def __init__(self, *, column: str = "input_ids", label_pad: int = -100, keep_columns: bool = True,
                 dtype=torch.int64, label_dtype=torch.int64):
        self.column, self.label_pad, self.keep_columns = column, label_pad, keep_columns
        self.dtype, self.label_dtype = np_dtype(dtype, "dtype"), np_dtype(label_dtype, "label_dtype")
        self._mode = KernelMode()

    def __call__(self, batch) -> dict:
        r = ragged_column(batch, self.column)
        offsets = r.offsets
        if len(offsets) and offsets[0]:
            offsets = offsets - offsets[0]
        T = int(offsets[-1]) if len(offsets) else 0
        if T >= 2**31:
            raise ValueError(f"a batch of {T} tokens overflows int32 cu_seqlens; use smaller batches")
        fresh = POOL.fresh
        (ids, pos, labels), tensor = output_group([(T, self.dtype), (T, self.dtype), (T, self.label_dtype)])
        parallel = self._mode.pick()
        t0 = time.perf_counter()
        src = getattr(r, "shards", None)
        if src is not None:  # rows of many shards: one kernel call
            gather_shard_values(src.off_addr, src.val_addr, src.shard, src.local, offsets, ids, src.off_like,
                                src.val_like, parallel=parallel)
        else:
            for off, val, rows, where in _sources(r):  # from each shard's buffers straight into the ids
                gather_values(off, val, rows, where, offsets, ids, parallel=parallel)
        pack_layout(offsets, ids, pos, labels, label_pad=self.label_pad, parallel=parallel)
        self._mode.record(parallel, time.perf_counter() - t0, T if POOL.fresh == fresh else 0)
        cu = offsets.astype(np.int32)
        max_seqlen = int((offsets[1:] - offsets[:-1]).max()) if len(offsets) > 1 else 0
        out = {"input_ids": tensor(ids), "cu_seqlens": torch.from_numpy(cu), "position_ids": tensor(pos),
               "max_seqlen": max_seqlen, "labels": tensor(labels)}
        if self.keep_columns:
            out.update(_extras(batch, {self.column, *out}))
        return out


def pad(pad_id: int = 0, pad_to_multiple_of: int | None = None, *, column: str = "input_ids",
        max_length: int | None = None, label_pad: int = -100, keep_columns: bool = True, dtype=torch.int64,
        label_dtype=torch.int64) -> PadCollate:
    """A collate function giving right-padded tensors.

    From ``ArrowDataset.__getitems__`` the tokens go from the memory-mapped shards straight into the outputs (one
    pass, no intermediate copy of the batch).

    Args:
        pad_id: id written into padding positions of ``input_ids``.
        pad_to_multiple_of: round the padded length up (tensor-core friendly shapes).
        column: the token column.
        max_length: truncate rows to this many tokens (and pad every batch to at most it).
        label_pad: label at padding positions (ignored by ``CrossEntropyLoss``).
        keep_columns: pass the batch's other numeric columns through as tensors.
        dtype: ``torch.int64`` (default) or ``torch.int32`` (or ``"int32"``): dtype of ``input_ids`` and
            ``attention_mask``, for models that take int32 ids.
        label_dtype: dtype of ``labels`` (``CrossEntropyLoss`` wants int64).

    Returns:
        ``collate(batch) -> dict`` with ``input_ids``, ``attention_mask``, ``labels`` of shape ``[B, L]``.
    """
    return PadCollate(pad_id, pad_to_multiple_of, column=column, max_length=max_length, label_pad=label_pad,
                      keep_columns=keep_columns, dtype=dtype, label_dtype=label_dtype)


def packed(*, column: str = "input_ids", label_pad: int = -100, keep_columns: bool = True, dtype=torch.int64,
           label_dtype=torch.int64) -> PackedCollate:
    """A padding-free collate function: the batch's sequences back to back, with ``cu_seqlens``.

    From ``ArrowDataset.__getitems__`` the tokens go from the memory-mapped shards straight into the outputs (one
    pass, no intermediate copy of the batch).

    Args:
        column: the token column.
        label_pad: label at each sequence's first token.
        keep_columns: pass the batch's other numeric columns through as tensors.
        dtype: ``torch.int64`` (default) or ``torch.int32`` (or ``"int32"``): dtype of ``input_ids`` and
            ``position_ids``.
        label_dtype: dtype of ``labels`` (``CrossEntropyLoss`` wants int64).

    Returns:
        ``collate(batch) -> dict`` with ``input_ids`` ``[T]``, ``cu_seqlens`` int32 ``[B+1]``,
        ``position_ids`` ``[T]`` (restarting at 0 for each sequence), ``max_seqlen`` (int), ``labels`` ``[T]``
        (-100 at each sequence's first token); int64 unless ``dtype``/``label_dtype`` say otherwise.
    """
    return PackedCollate(column=column, label_pad=label_pad, keep_columns=keep_columns, dtype=dtype,
                         label_dtype=label_dtype)


def default(batch):
    """The loader's collate when none is given: a :class:`Batch` becomes a dict of tensors (ragged columns as a
    list of 1-D tensors); anything else goes to ``torch.utils.data.default_collate``."""
    if isinstance(batch, Batch):
        out = {}
        for k, v in batch.items():
            if isinstance(v, Ragged):
                out[k] = [torch.from_numpy(np.array(x)) for x in v]
            elif isinstance(v, np.ndarray) and v.dtype.kind in "iufb":
                out[k] = torch.from_numpy(v)
            else:
                out[k] = v
        return out
    return torch.utils.data.default_collate(batch)
