"""The columnar batch ``ArrowDataset.__getitems__`` returns: :class:`Batch` (column -> array), :class:`Ragged` (a
list column, gathered lazily from the memory-mapped shards) and :class:`ShardRows` (where a batch's rows live when
they span several shards, for the one-call kernels of :mod:`native.shards`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from native.ragged import gather_values
from native.shards import gather_flat, gather_shard_values, shard_row_offsets

__all__ = ["Batch", "Ragged", "ShardRows", "gather_columns", "is_numeric", "is_numeric_list"]


class ShardRows:
    """Where the rows of an unmaterialised ragged column live when they span several shards: per shard the
    addresses of its offsets and values buffers (``int64 [S]``), per batch row its shard and row within it, the
    buffers' dtypes (``off_like``, ``val_like``), and the dataset's open shards (``keep``, so the memory maps stay
    alive while a kernel of :mod:`native.shards` reads them) with the column's name."""

    __slots__ = ("off_addr", "val_addr", "shard", "local", "off_like", "val_like", "keep", "column")

    def __init__(self, off_addr, val_addr, shard, local, off_like, val_like, keep, column):
        self.off_addr, self.val_addr, self.shard, self.local = off_addr, val_addr, shard, local
        self.off_like, self.val_like, self.keep, self.column = off_like, val_like, keep, column


class Ragged:
    """A batch of variable-length rows: flat ``values`` and int64 ``offsets`` ``[B+1]`` (row b is
    ``values[offsets[b]:offsets[b+1]]``).

    ``ArrowDataset.__getitems__`` returns it unmaterialised: ``parts`` holds one ``(offsets, values, rows, pos)``
    per shard touched (the shard's memory-mapped buffers, the shard rows taken, their positions in the batch) and
    ``values`` is gathered on first access. The collators write from the shards straight into their outputs, so a
    batch goes from the memory map to the output tensors in one pass. A batch spanning several shards also carries
    ``shards`` (:class:`ShardRows`), which the built-in collators read in one kernel call whatever the number of
    shards; ``parts`` is then derived from it when asked for. Pickling materialises ``values``."""

    __slots__ = ("_values", "offsets", "_parts", "shards")

    def __init__(self, values: NDArray | None, offsets: NDArray[np.int64], parts: tuple | None = None,
                 shards: ShardRows | None = None):
        if values is None and parts is None and shards is None:
            raise ValueError("Ragged needs values, parts or shards")
        self._values = values
        self.offsets = offsets
        self._parts = parts if values is None else None
        self.shards = shards if values is None else None

    @property
    def parts(self) -> tuple | None:
        if self._parts is None and self.shards is not None:
            self._parts = _split_by_shard(self.shards)
        return self._parts

    @parts.setter
    def parts(self, parts) -> None:
        self._parts = parts

    @property
    def values(self) -> NDArray:
        if self._values is None:
            self._values = _gather_parts(self, self.offsets)
        return self._values

    @values.setter
    def values(self, values: NDArray) -> None:
        self._values, self._parts, self.shards = values, None, None

    def __reduce__(self):
        return (Ragged, (self.values, self.offsets))

    @classmethod
    def from_list(cls, rows: Sequence, dtype=None) -> Ragged:
        arrs = [np.asarray(r.numpy() if hasattr(r, "numpy") else r, dtype=dtype) for r in rows]
        offsets = np.zeros(len(arrs) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrs], out=offsets[1:])
        values = np.concatenate(arrs) if arrs else np.zeros(0, dtype=dtype or np.int64)
        return cls(values, offsets)

    @property
    def lengths(self) -> NDArray[np.int64]:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> NDArray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[NDArray]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Ragged(rows={len(self)}, values={len(self.values)}, dtype={self.values.dtype})"


def _split_by_shard(src: ShardRows) -> tuple:
    """``parts`` of a :class:`ShardRows`: ``(offsets, values, rows, pos)`` per touched shard."""
    order = np.argsort(src.shard, kind="stable")
    sorted_shards = src.shard[order]
    cut = np.concatenate(([0], np.flatnonzero(np.diff(sorted_shards)) + 1, [len(order)]))
    out = []
    for a, b in zip(cut[:-1].tolist(), cut[1:].tolist()):
        if b > a:
            off, val = src.keep[int(sorted_shards[a])].ragged[src.column]
            pos = order[a:b]
            out.append((off, val, src.local[pos], pos))
    return tuple(out)


def _gather_parts(r: Ragged, offsets: NDArray[np.int64]) -> NDArray:
    """The values of an unmaterialised :class:`Ragged`: each shard's rows copied to their batch positions."""
    from datapipe.prefetch import may_parallelize

    parallel = len(offsets) > 65 and may_parallelize()
    src = r.shards
    if src is not None:
        values = np.empty(int(offsets[-1]), dtype=src.val_like.dtype)
        gather_shard_values(src.off_addr, src.val_addr, src.shard, src.local, offsets, values, src.off_like,
                            src.val_like, parallel=parallel)
        return values
    values = np.empty(int(offsets[-1]), dtype=r.parts[0][1].dtype)
    for off, val, rows, pos in r.parts:
        gather_values(off, val, rows, pos, offsets, values, parallel=parallel)
    return values


def gather_columns(names: Sequence[str], ragged: Mapping, flat: Mapping, shard: NDArray[np.int64],
                   local: NDArray[np.int64], keep, idx: NDArray[np.int64], fallback=None) -> Batch | None:
    """A :class:`Batch` of row ``local[i]`` of shard ``shard[i]`` for every ``i``, one kernel call per column:
    the one gather of a batch spread over several shards, for a local dataset (address tables over all its shards,
    kept) and a remote one (tables over the shards of one batch).

    Args:
        names: the columns, in order.
        ragged: list column -> ``(offsets addresses, values addresses, offsets like, values like)``: int64 ``[S]``
            buffer addresses per shard and arrays of the buffers' dtypes; gathered lazily (:class:`ShardRows`).
        flat: numeric column -> ``(addresses, like)``: int64 ``[S]`` data addresses per shard, an array of the
            dtype.
        shard, local: int64 ``[B]`` each row's shard (an index into the tables) and row within it.
        keep: the open shards (they hold the memory maps the addresses point into while the batch lives).
        idx: int64 ``[B]`` the dataset rows (``Batch.indices``).
        fallback: ``name -> column`` for a column in neither table (strings, nulls, kinds that differ between
            shards); ``None``: such a column makes the result ``None``.
    """
    B = len(idx)
    cols: dict = {}
    for name in names:
        if name in ragged:
            oa, va, off0, val0 = ragged[name]
            offsets = np.empty(B + 1, dtype=np.int64)
            shard_row_offsets(oa, shard, local, off0, offsets)
            cols[name] = Ragged(None, offsets, shards=ShardRows(oa, va, shard, local, off0, val0, keep, name))
        elif name in flat:
            addr, col0 = flat[name]
            out = np.empty(B, dtype=col0.dtype)
            gather_flat(addr, shard, local, col0, out)
            cols[name] = out
        elif fallback is None:
            return None
        else:
            cols[name] = fallback(name)
    return Batch(cols, B, idx)


class Batch(dict):
    """Columns of a batch of rows: column -> numpy array, :class:`Ragged`, or list (other Arrow types).

    A dict of columns (``len()`` is the number of columns, as for any dict); ``num_rows`` is the batch size and
    ``rows()`` the per-row dicts.
    """

    def __init__(self, columns: Mapping, num_rows: int, indices: NDArray[np.int64] | None = None):
        super().__init__(columns)
        self.num_rows = num_rows
        self.indices = indices

    def rows(self) -> list[dict]:
        return [{k: v[i] for k, v in self.items()} for i in range(self.num_rows)]

    def __reduce__(self):
        return (Batch, (dict(self), self.num_rows, self.indices))


def is_numeric(col) -> bool:
    """An Arrow column of integers, floats or booleans without nulls: gathered as a numpy array."""
    t = col.type
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)) and col.null_count == 0


def is_numeric_list(col) -> bool:
    """An Arrow list column of integers or floats without a null list or value: gathered as :class:`Ragged`."""
    t = col.type
    return ((pa.types.is_list(t) or pa.types.is_large_list(t)) and col.null_count == 0
            and (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type))
            and col.values.null_count == 0)
