"""Several domain datasets as one: global row ids map to ``(domain, row)``, batches carry a ``domain`` column.

The row space is the concatenation of the domains in order: domain ``d`` owns ids ``[offsets[d], offsets[d+1])``
(the layout ``samplers.ShapedMixtureBatchSampler`` and ``samplers.MixtureBatchSampler`` yield). A batch of ids
is fetched from each domain with that dataset's own batched ``__getitems__`` (one call per domain present), and
the parts are merged back into the order of the ids:

* ``ArrowDataset`` domains give columnar :class:`~datapipe.dataset.Batch` parts (``Ragged`` token lists, numpy
  columns), merged column by column; any collator (``collate.pad``, ``collate.packed``) then applies;
* ``DecomposedDataset`` domains give ``[b_d, 2^k]`` tensors of one bucket; they are concatenated and
  ``cu_seqlens`` is rebuilt over the merged ``b * 2^k`` tokens.

``domain`` holds int64 domain ids (the order of ``names``): a numpy array for columnar batches, a tensor
for decomposed ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from datapipe.dataset import Batch, Ragged
from native.ragged import concat_ranges

__all__ = ["MultiDataset"]


def _take_ragged(parts: list[Ragged], inv: NDArray[np.int64]) -> Ragged:
    values = np.concatenate([p.values for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = lengths[inv]
    offsets = np.zeros(len(inv) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    return Ragged(values[concat_ranges(starts[inv], n)], offsets)


def _merge_cu_seqlens(parts: list, rows: list[int], widths: list[int], new_row: NDArray[np.int64]):
    """``cu_seqlens`` over the merged ``[b, L]`` batch: each part's segments, shifted, re-laid in row order."""
    L = widths[0]
    cus, shift = [], 0
    for cu, b in zip(parts, rows):
        c = np.asarray(cu, dtype=np.int64)
        cus.append(c[:-1] + shift)
        shift += b * L
    cu_all = np.concatenate([*cus, [shift]])
    seg = np.diff(cu_all)
    seg_row = cu_all[:-1] // L
    order = np.argsort(new_row[seg_row], kind="stable")
    out = np.zeros(len(seg) + 1, dtype=np.int32)
    np.cumsum(seg[order], out=out[1:])
    return torch.from_numpy(out)


class MultiDataset(torch.utils.data.Dataset):
    """A map-style dataset over domains, each a dataset with a batched ``__getitems__``.

    Args:
        datasets: one dataset per domain (``ArrowDataset``, ``DecomposedDataset``, ...), in domain-id order.
        names: domain names (default ``"0", "1", ...``).
        domain_column: name of the domain-id column added to every batch.

    Attributes:
        offsets: int64 ``[D+1]`` first global id of each domain (``offsets[-1] == len(self)``).
    """

    def __init__(self, datasets: Sequence, names: Sequence[str] | None = None, *,
                 domain_column: str = "domain") -> None:
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("datasets must hold at least one domain dataset")
        self.names = [str(i) for i in range(len(self.datasets))] if names is None else [str(n) for n in names]
        if len(self.names) != len(self.datasets):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.datasets)} datasets")
        for d, ds in enumerate(self.datasets):
            if not hasattr(ds, "__getitems__"):
                raise TypeError(f"domain {self.names[d]!r}: dataset {type(ds).__name__} has no batched __getitems__")
        self.domain_column = domain_column
        sizes = [len(ds) for ds in self.datasets]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, ids) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``(domain, row)`` int64 arrays of global ids."""
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(f"row {bad} is out of range for {n} rows over domains {self.names}")
        dom = np.searchsorted(self.offsets, idx, side="right") - 1
        return dom, idx - self.offsets[dom]

    def __getitems__(self, ids) -> Batch:
        """Rows ``ids`` (global) in that order, with a ``domain`` column. Columns every part has are merged."""
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            raise ValueError("ids is empty")
        dom, local = self.locate(idx)
        order = np.argsort(dom, kind="stable")  # merged position j holds requested position order[j]
        inv = np.argsort(order, kind="stable")
        present = np.unique(dom)
        parts, rows = [], []
        for d in present.tolist():
            sel = order[dom[order] == d]
            parts.append(self.datasets[d].__getitems__(local[sel]))
            rows.append(len(sel))
        keys = [k for k in parts[0] if all(k in p for p in parts)]
        inv_t = torch.from_numpy(inv)
        out: dict = {}
        tensors = False
        for k in keys:
            vals = [p[k] for p in parts]
            v0 = vals[0]
            if k == "cu_seqlens":
                widths = [int(p["input_ids"].shape[1]) for p in parts]
                out[k] = _merge_cu_seqlens(vals, rows, widths, order)
            elif isinstance(v0, Ragged):
                out[k] = _take_ragged(vals, inv)
            elif isinstance(v0, torch.Tensor) and v0.ndim and all(v.shape[0] == b for v, b in zip(vals, rows)):
                out[k] = torch.cat(vals).index_select(0, inv_t)  # (advanced indexing is ~1000x slower)
                tensors = True
            elif isinstance(v0, np.ndarray) and v0.ndim and all(len(v) == b for v, b in zip(vals, rows)):
                out[k] = np.concatenate(vals)[inv]
            elif isinstance(v0, list) and all(len(v) == b for v, b in zip(vals, rows)):
                flat = [x for v in vals for x in v]
                out[k] = [flat[i] for i in inv.tolist()]
            elif k == "max_seqlen":
                out[k] = max(int(v) for v in vals)
            elif all(_same(v, v0) for v in vals):
                out[k] = v0
            else:
                out[k] = vals  # per-domain values that do not merge row-wise
        domain = dom.astype(np.int64)
        out[self.domain_column] = torch.from_numpy(domain) if tensors else domain
        return Batch(out, len(idx), idx)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.__getitems__(np.array([i]))
        return self.__getitems__(i)

    def __repr__(self) -> str:
        return f"MultiDataset({dict(zip(self.names, np.diff(self.offsets).tolist()))})"


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return a is b
