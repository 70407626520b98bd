"""Batches gathered over a list of open shards with address tables of their own (a remote dataset's shards come and
go with its cache, so a batch cannot use a table over every shard as :class:`datapipe.dataset.ArrowDataset` does);
the gather itself is :func:`datapipe.batch.gather_columns`, the local dataset's."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from datapipe.batch import Batch, Ragged, gather_columns, is_numeric, is_numeric_list

__all__ = ["gather_shards", "generic_column", "shard_addresses"]


def gather_shards(shards: list, which: NDArray[np.int64], local: NDArray[np.int64], idx: NDArray[np.int64],
                  schema: pa.Schema) -> Batch:
    """A :class:`Batch` of row ``local[i]`` of ``shards[which[i]]`` for every ``i``, as ``ArrowDataset`` gathers
    over its open shards (:func:`datapipe.batch.gather_columns`: list columns lazily through ``ShardRows``, numeric
    columns by one kernel call, whatever the number of shards), with address tables over these shards only; other
    columns (strings, nulls, kinds that differ between the shards) through Arrow. The batch holds ``shards`` (and
    so their maps) while it lives."""
    addrs = [shard_addresses(sh) for sh in shards]
    ragged: dict = {}
    flat: dict = {}
    for name in schema.names:
        if all(name in sh.ragged for sh in shards):
            off0, val0 = shards[0].ragged[name]
            if all(sh.ragged[name][0].dtype == off0.dtype and sh.ragged[name][1].dtype == val0.dtype
                   for sh in shards):
                ragged[name] = (np.array([a[name][0] for a in addrs], dtype=np.int64),
                                np.array([a[name][1] for a in addrs], dtype=np.int64), off0, val0)
        elif all(name in sh.flat for sh in shards):
            col0 = shards[0].flat[name]
            if all(sh.flat[name].dtype == col0.dtype and sh.flat[name].flags.c_contiguous for sh in shards):
                flat[name] = (np.array([a[name] for a in addrs], dtype=np.int64), col0)
    return gather_columns(schema.names, ragged, flat, which, local, shards, idx,
                          fallback=lambda name: generic_column(shards, which, local, name))


def shard_addresses(sh) -> dict:
    """Column -> buffer address(es) of a shard (offsets and values of a list column; a numeric column's data),
    computed once per shard object."""
    got = getattr(sh, "_remote_addresses", None)
    if got is None:
        got = {name: (off.ctypes.data, val.ctypes.data) for name, (off, val) in sh.ragged.items()}
        got.update((name, col.ctypes.data) for name, col in sh.flat.items())
        sh._remote_addresses = got
    return got


def generic_column(shards: list, which: NDArray[np.int64], local: NDArray[np.int64], name: str):
    """One column through Arrow: a numpy array when every value is a number and none is null, else a list."""
    parts = [sh.batch.column(name).take(pa.array(local[which == j])) for j, sh in enumerate(shards)]
    col = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
    order = np.argsort(which, kind="stable")  # concat order: by shard, batch order within a shard
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    col = col.take(pa.array(inverse))
    if is_numeric(col):
        return col.to_numpy(zero_copy_only=False)
    if is_numeric_list(col):
        off = col.offsets.to_numpy().astype(np.int64)
        return Ragged(col.values.to_numpy()[off[0]:off[-1]], off - off[0])
    return col.to_pylist()
