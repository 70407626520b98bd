"""``ArrowDataset``: a map-style dataset over a dataset directory of memory-mapped Arrow IPC shards.

``ds[i]`` returns a dict (list columns as zero-copy numpy views); ``ds.__getitems__(indices)`` gathers a whole
batch per shard in one vectorised step (Numba kernels over the offsets/values buffers) and returns a columnar
:class:`Batch`, which the collators in ``datapipe.collate`` turn into tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch.utils.data
from numpy.typing import NDArray

from datapipe.format import INDEX_FILE, DatasetError, read_manifest, schema_from_b64, verify_checksum
from native.ragged import gather_lengths, gather_values

__all__ = ["ArrowDataset", "Batch", "DatasetError", "Ragged"]


class Ragged:
    """A batch of variable-length rows: flat ``values`` and int64 ``offsets`` ``[B+1]`` (row b is
    ``values[offsets[b]:offsets[b+1]]``)."""

    __slots__ = ("values", "offsets")

    def __init__(self, values: NDArray, offsets: NDArray[np.int64]):
        self.values = values
        self.offsets = offsets

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


class _Shard:
    """One memory-mapped shard: its record batch and numpy views of its buffers."""

    def __init__(self, path: Path, schema: pa.Schema, rows: int):
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            if reader.num_record_batches == 1:
                self.batch = reader.get_batch(0)
            else:
                self.batch = reader.read_all().combine_chunks().to_batches()[0]
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{path}: cannot open shard ({e}); the file is truncated or corrupt: rebuild") from None
        if not self.batch.schema.equals(schema):
            raise DatasetError(f"{path}: schema {self.batch.schema} differs from the manifest's {schema}")
        if self.batch.num_rows != rows:
            raise DatasetError(f"{path}: {self.batch.num_rows} rows but the manifest says {rows}")
        self.ragged: dict[str, tuple[NDArray, NDArray]] = {}
        self.flat: dict[str, NDArray] = {}
        for name, col in zip(self.batch.schema.names, self.batch.columns):
            t = col.type
            if (pa.types.is_list(t) or pa.types.is_large_list(t)) and col.null_count == 0 and (
                    pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)) and col.values.null_count == 0:
                self.ragged[name] = (col.offsets.to_numpy(), col.values.to_numpy())
            elif (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)) and col.null_count == 0:
                self.flat[name] = col.to_numpy(zero_copy_only=False)


class ArrowDataset(torch.utils.data.Dataset):
    """Map-style dataset over a dataset directory (see ``datapipe.write_dataset``).

    Shards are memory-mapped: opening costs no reads of the payload, workers share the page cache, and a
    pickled dataset (sent to a spawned worker) reopens its maps from the path.

    Attributes:
        path: the dataset directory.
        manifest: the parsed ``manifest.json``.
        schema: the Arrow schema of the rows.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.schema = schema_from_b64(self.manifest["schema"])
        shards = self.manifest["shards"]
        self._starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s["rows"] for s in shards], out=self._starts[1:])
        if self._starts[-1] != self.manifest["num_rows"]:
            raise DatasetError(f"{self.path / 'manifest.json'}: shard rows sum to {self._starts[-1]} but num_rows "
                               f"is {self.manifest['num_rows']}")
        for s in shards:
            p = self.path / s["file"]
            if not p.exists():
                raise DatasetError(f"{p}: shard file is missing")
            if p.stat().st_size != s["bytes"]:
                raise DatasetError(f"{p}: {p.stat().st_size} bytes but the manifest says {s['bytes']}: the shard is "
                                   "truncated or was replaced; rebuild the dataset")
        self._shards: list[_Shard | None] = [None] * len(shards)
        self._index: dict[str, NDArray] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> ArrowDataset:
        """Open a dataset directory (memory-maps shards lazily; checks sizes, not checksums: see :meth:`verify`)."""
        return cls(path)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    # ---- shards -------------------------------------------------------------------------------------------
    def _shard(self, s: int) -> _Shard:
        sh = self._shards[s]
        if sh is None:
            meta = self.manifest["shards"][s]
            sh = self._shards[s] = _Shard(self.path / meta["file"], self.schema, meta["rows"])
        return sh

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, idx: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"row {int(bad)} is out of range for a dataset of {n} rows ({self.path})")
        idx = np.where(idx < 0, idx + n, idx)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        return shard, idx - self._starts[shard]

    # ---- rows ---------------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        if isinstance(i, slice):
            return self.__getitems__(np.arange(len(self))[i])
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int (got {type(i).__name__}); use __getitems__ for batches")
        shard, local = self._locate(np.array([i], dtype=np.int64))
        sh, r = self._shard(int(shard[0])), int(local[0])
        out = {}
        for name, col in zip(sh.batch.schema.names, sh.batch.columns):
            if name in sh.ragged:
                off, val = sh.ragged[name]
                out[name] = val[off[r] : off[r + 1]]
            elif name in sh.flat:
                out[name] = sh.flat[name][r]
            else:
                out[name] = col[r].as_py()
        return out

    def __getitems__(self, indices) -> Batch:
        """Gather a batch of rows, shard by shard, in one vectorised step per shard and column.

        Args:
            indices: int array-like ``[B]`` (negative indices count from the end).

        Returns:
            :class:`Batch`: list columns as :class:`Ragged` (int64 offsets), numeric columns as numpy arrays
            ``[B]``, other columns as Python lists, all in the order of ``indices``.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        B = len(idx)
        shard, local = self._locate(idx)
        order = np.argsort(shard, kind="stable")
        sorted_shards = shard[order]
        bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
        groups = [(int(sorted_shards[a]), order[a:b]) for a, b in zip(np.r_[0, bounds], np.r_[bounds, B]) if b > a]
        touched = [(self._shard(s), pos, local[pos]) for s, pos in groups]
        cols: dict = {}
        for name, field in zip(self.schema.names, self.schema):
            if touched and name in touched[0][0].ragged:
                lengths = np.empty(B, dtype=np.int64)
                for sh, pos, loc in touched:
                    gather_lengths(sh.ragged[name][0], loc, pos, lengths)
                offsets = np.zeros(B + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                values = np.empty(offsets[-1], dtype=touched[0][0].ragged[name][1].dtype)
                parallel = B > 64 and torch.utils.data.get_worker_info() is None  # workers are parallel already
                for sh, pos, loc in touched:
                    off, val = sh.ragged[name]
                    gather_values(off, val, loc, pos, offsets, values, parallel=parallel)
                cols[name] = Ragged(values, offsets)
            elif touched and all(name in sh.flat for sh, _, _ in touched):
                out = np.empty(B, dtype=touched[0][0].flat[name].dtype)
                for sh, pos, loc in touched:
                    out[pos] = sh.flat[name][loc]
                cols[name] = out
            else:
                vals: list = [None] * B
                for sh, pos, loc in touched:
                    taken = sh.batch.column(name).take(pa.array(loc)).to_pylist()
                    for p, v in zip(pos.tolist(), taken):
                        vals[p] = v
                cols[name] = vals
        return Batch(cols, B, idx)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    # ---- metadata -----------------------------------------------------------------------------------------
    @property
    def index(self) -> dict[str, NDArray]:
        """The per-row metadata columns (``index.arrow``) as numpy arrays, memory-mapped where possible."""
        if self._index is None:
            meta = self.manifest.get("index")
            if not meta:
                self._index = {}
            else:
                p = self.path / meta["file"]
                try:
                    t = pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all()
                except (pa.ArrowInvalid, OSError) as e:
                    raise DatasetError(f"{p}: cannot open the index ({e})") from None
                self._index = {n: t.column(n).to_numpy() for n in t.column_names}
        return self._index

    def verify(self) -> dict:
        """Check every file against the manifest's checksums.

        Returns:
            ``{"ok": True, "files": n, "bytes": total}``.

        Raises:
            DatasetError: naming the first file that is missing, truncated or changed.
        """
        files = list(self.manifest["shards"])
        if self.manifest.get("index"):
            files.append(self.manifest["index"])
        total = 0
        for meta in files:
            p = self.path / meta["file"]
            if not p.exists():
                raise DatasetError(f"{p}: file is missing")
            if p.stat().st_size != meta["bytes"]:
                raise DatasetError(f"{p}: {p.stat().st_size} bytes but the manifest says {meta['bytes']} (truncated?)")
            verify_checksum(p, meta["checksum"])
            total += meta["bytes"]
        return {"ok": True, "files": len(files), "bytes": total}

    def __repr__(self) -> str:
        return f"ArrowDataset({str(self.path)!r}, rows={len(self)}, shards={self.num_shards}, columns={self.column_names})"


def _index_file(path: Path) -> Path:  # used by tools that read only the index
    return path / INDEX_FILE
