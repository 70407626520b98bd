"""``ArrowDataset``: a map-style dataset over a dataset directory of memory-mapped Arrow IPC shards.

``ds[i]`` returns a dict (list columns as zero-copy numpy views); ``ds.__getitems__(indices)`` gathers a whole
batch per shard in one vectorised step (Numba kernels over the offsets/values buffers) and returns a columnar
:class:`Batch`, which the collators in ``datapipe.collate`` turn into tensors.

Reads are checked: the manifest's own digest and every file's size when the dataset is opened; a file's checksum
the first time a process touches it (``verify="first_touch"``, the default; ``"never"`` for data verified offline);
Arrow's full structural validation and the list offsets of every ragged column before a kernel reads them. All
of it happens in :func:`open_ipc`, once per file per process, never in the per-batch path.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch.utils.data
from numpy.typing import NDArray

from datapipe import urls
from datapipe.batch import Batch, Ragged, ShardRows, gather_columns, is_numeric, is_numeric_list
from datapipe.format import (MANIFEST, DatasetError, check_list_offsets, corrupt_file, read_manifest, schema_from_b64,
                             shard_starts, verify_buffer)
from native.ragged import gather_lengths, locate_rows, row_offsets

__all__ = ["ArrowDataset", "Batch", "DatasetError", "Ragged", "ShardRows", "VERIFY_MODES", "check_shard", "map_checked",
           "open_ipc", "shard_from_batch"]


VERIFY_MODES = ("first_touch", "never")
# files whose checksum this process has verified: (path, inode, size, mtime, checksum). A forked DataLoader worker
# inherits it (same files, same maps); a spawned one verifies what it touches itself.
_VERIFIED: set[tuple] = set()


def check_size(path: Path, meta: dict, *, what: str = "shard", fix: str = "rebuild the dataset") -> os.stat_result:
    """``os.stat(path)``, after checking that the file exists and has the size ``meta`` records.

    Raises:
        DatasetError: naming ``path``, the sizes and ``fix``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} file is missing; {fix}") from None
    if st.st_size != meta["bytes"]:
        raise DatasetError(f"{path}: {st.st_size} bytes but the manifest says {meta['bytes']}: the {what} is "
                           f"truncated or was replaced; {fix}")
    return st


def map_checked(path: Path, meta: dict, *, verify: str = "first_touch", what: str = "shard",
                fix: str = "rebuild the dataset") -> pa.Buffer:
    """Memory-map a file a manifest lists, after checking its size, and its checksum on the first touch in this
    process (``verify="first_touch"``; a forked worker inherits what its parent verified).

    Args:
        path: the local file. meta: its manifest entry (``bytes``, ``checksum``).
        what: what the file is, for errors. fix: what the user should do, for errors.

    Returns:
        the whole file as one buffer over the map (no copy).

    Raises:
        DatasetError: naming ``path``: missing, wrong size, unmappable, checksum mismatch.
    """
    st = check_size(path, meta, what=what, fix=fix)
    try:
        buf = pa.memory_map(str(path), "r").read_buffer()
    except OSError as e:
        raise DatasetError(f"{path}: cannot map the {what} ({e})") from None
    if verify == "first_touch":
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, meta["checksum"])
        if key not in _VERIFIED:
            verify_buffer(buf, meta["checksum"], path)
            _VERIFIED.add(key)
    return buf


def open_ipc(path: Path, meta: dict, *, verify: str, what: str = "shard") -> pa.RecordBatch:
    """Memory-map one Arrow IPC file of a dataset and check it before anything reads its buffers.

    The one place a file of a dataset directory becomes data (shards and ``index.arrow``): size against the
    manifest; checksum on the first touch in this process (``verify="first_touch"``); Arrow's full structural
    validation (offsets, UTF-8, nulls) in every mode. ``path`` is a local file (a cache may have put it there).

    Returns:
        the file's rows as one record batch (zero-copy over the map when uncompressed).

    Raises:
        DatasetError: naming ``path``: wrong size, checksum mismatch, unreadable or structurally invalid.
    """
    buf = map_checked(path, meta, verify=verify, what=what)
    try:
        reader = pa.ipc.open_file(buf)
        if reader.num_record_batches == 1:
            batch = reader.get_batch(0)
        else:
            table = reader.read_all()
            batch = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist(
                [], schema=table.schema)
        batch.validate(full=True)
    except (pa.ArrowException, OSError, IndexError) as e:
        raise corrupt_file(path, f"cannot read the {what} ({type(e).__name__}: {e})") from None
    return batch


class _Shard:
    """One memory-mapped shard: its record batch and numpy views of its buffers (checked: see :func:`open_ipc`).

    ``batch``: the shard's rows already read and structurally validated by the caller (a remote dataset maps its
    cached copy itself); ``path`` then only names it in errors."""

    def __init__(self, path: Path, meta: dict, schema: pa.Schema, *, verify: str = "first_touch",
                 batch: pa.RecordBatch | None = None):
        self.batch = open_ipc(path, meta, verify=verify) if batch is None else batch
        rows = meta["rows"]
        if not self.batch.schema.equals(schema):
            raise DatasetError(f"{path}: schema {self.batch.schema} differs from the manifest's {schema}")
        if self.batch.num_rows != rows:
            raise DatasetError(f"{path}: {self.batch.num_rows} rows but the manifest says {rows}")
        self.ragged: dict[str, tuple[NDArray, NDArray]] = {}
        self.flat: dict[str, NDArray] = {}
        for name, col in zip(self.batch.schema.names, self.batch.columns):
            if is_numeric_list(col):
                offsets, values = col.offsets.to_numpy(), col.values.to_numpy()
                check_list_offsets(path, name, offsets, len(values), rows)
                self.ragged[name] = (offsets, values)
            elif is_numeric(col):
                self.flat[name] = col.to_numpy(zero_copy_only=False)


def shard_from_batch(batch: pa.RecordBatch, meta: dict, schema: pa.Schema, *, name: str) -> _Shard:
    """A shard over rows already read and structurally validated by the caller (a remote dataset's cached copy, or
    rows copied out of one), with the checks and numpy buffer views the gather kernels read through.

    Args:
        batch: the rows. meta: ``{"rows": n, ...}``. schema: the dataset's schema. name: names it in errors.

    Raises:
        DatasetError: naming ``name``: schema or row count differ, list offsets out of their values.
    """
    return _Shard(name, meta, schema, batch=batch)


def check_shard(path: Path, meta: dict, schema: pa.Schema) -> None:
    """Check one shard's size, schema, row count and Arrow structure against its manifest entry (checksum not
    read: see :func:`datapipe.format.verify_checksum`).

    Raises:
        DatasetError: naming ``path``: what does not match and the fix.
    """
    _Shard(path, meta, schema, verify="never")


class ArrowDataset(torch.utils.data.Dataset):
    """Map-style dataset over a dataset directory (see ``datapipe.write_dataset``).

    Shards are memory-mapped: opening costs no reads of the payload, workers share the page cache, and a
    pickled dataset (sent to a spawned worker) reopens its maps from the path.

    Reads are checked: opening checks the manifest's own digest and every file's size; the first time a process
    touches a shard (or the index) its checksum is verified (``verify="first_touch"``, once per file per process,
    DataLoader workers included), and every file is structurally validated before any kernel reads its buffers,
    so a damaged file raises :class:`DatasetError` naming it instead of returning wrong rows or crashing.

    Attributes:
        path: the dataset directory.
        manifest: the parsed ``manifest.json``.
        schema: the Arrow schema of the rows.
        verify: ``"first_touch"`` or ``"never"``.
    """

    def __init__(self, path: str | os.PathLike, *, verify: str = "first_touch"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES} (got {verify=}); use 'never' only for data "
                             "you verify offline with `datapipe verify`")
        self.path = Path(path)
        self.verify_mode = verify
        self.manifest = read_manifest(self.path)
        mpath = self.path / MANIFEST
        self.schema = schema_from_b64(self.manifest["schema"], mpath)
        shards = self.manifest["shards"]
        self._starts = shard_starts(self.manifest, mpath)
        self._check_files()
        self._shards: list[_Shard | None] = [None] * len(shards)
        self._index: dict[str, NDArray] | None = None
        # buffer addresses of the open shards, per column (native.shards: a batch over many shards in one call)
        self._opened = np.zeros(len(shards), dtype=bool)
        self._addr: dict[str, tuple] = {}  # ragged column -> (offsets addr [S], values addr [S], offsets, values)
        self._flat_addr: dict[str, tuple] = {}  # fixed-width column -> (addr [S], a column array)
        self._mixed: set[str] = set()  # columns whose kind differs between shards (nulls): the generic path
        self._open_lock = threading.Lock()  # prefetch threads open shards side by side

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: str = "first_touch", filesystem=None,
             cache_dir: str | os.PathLike | None = None, cache_limit: float | None = None,
             timeout: float = 60.0, keep_open: int | None = None) -> ArrowDataset:
        """Open a dataset directory: checks the manifest (its digest) and file sizes; shards are memory-mapped
        lazily and checked on first touch.

        Args:
            path: the dataset directory, or a URL any ``pyarrow.fs`` filesystem understands (``s3://bkt/ds``,
                ``gs://``, ``hdfs://``, ``file://``).
            verify: ``"first_touch"`` (default): a file's checksum is verified the first time this process
                touches it (about one extra pass over a warm page cache, once per process); ``"never"``: skip
                checksums (structural checks still run), for data verified offline with :meth:`verify`.
            filesystem: a configured ``pyarrow.fs.FileSystem`` (e.g. ``S3FileSystem(endpoint_override=...)``);
                a URL's scheme is then dropped and the rest is the path inside it.
            cache_dir, cache_limit, timeout: for a dataset on object storage (``datapipe.remote``): where shards
                are cached, the bytes the cache may hold (``None``: no bound), and the seconds of retries before
                a store that fails raises :class:`DatasetError`. Remote files are always checked on arrival.
            keep_open: for a dataset on object storage: bytes of cached shards kept open (memory-mapped) between
                batches, so a warm epoch reads at local speed (``None``: every touched shard without a ``cache_limit``,
                else ``cache_limit / 2`` shared by the DataLoader workers; ``0``: each batch maps what it reads).
        """
        if urls.is_remote(path, filesystem):  # a RemoteArrowDataset, through the opener datapipe.remote provides
            return urls.open_remote(path, filesystem=filesystem, cache_dir=cache_dir, cache_limit=cache_limit,
                                    timeout=timeout, keep_open=keep_open)
        if keep_open is not None:
            raise ValueError(f"keep_open is for datasets on object storage; {os.fspath(path)!r} is local (its shards "
                             "are memory-mapped and stay open): leave keep_open=None")
        return cls(urls.local_path(path), verify=verify)

    def prefetch_plan(self, batches) -> None:
        """Nothing to do for local shards (memory-mapped); a remote dataset downloads ahead in plan order (see
        ``datapipe.remote.RemoteArrowDataset.prefetch_plan``)."""

    def __getstate__(self):
        return {"path": self.path, "verify": self.verify_mode}

    def __setstate__(self, state):
        self.__init__(state["path"], verify=state.get("verify", "first_touch"))

    # ---- files --------------------------------------------------------------------------------------------
    def _local_file(self, meta: dict) -> Path:
        """The local path of a file of the manifest (``shards/00000.arrow``, ``index.arrow``, ...)."""
        return self.path / meta["file"]

    def _check_files(self) -> None:
        """Cheap open-time checks of every shard: present, and of the size the manifest records."""
        for s in self.manifest["shards"]:
            check_size(self._local_file(s), s)

    # ---- shards -------------------------------------------------------------------------------------------
    def _shard(self, s: int) -> _Shard:
        sh = self._shards[s]
        if sh is None:
            meta = self.manifest["shards"][s]
            opened = _Shard(self._local_file(meta), meta, self.schema, verify=self.verify_mode)
            with self._open_lock:  # one shard object and one address table entry, whichever thread opened first
                sh = self._shards[s]
                if sh is None:
                    sh = self._shards[s] = opened
                    self._note_addresses(s, sh)
        return sh

    def _note_addresses(self, s: int, sh: _Shard) -> None:
        """Record shard ``s``'s buffer addresses (it stays mapped while the dataset lives); under ``_open_lock``."""
        S = len(self._shards)
        for name in self.schema.names:
            if name in sh.ragged:
                off, val = sh.ragged[name]
                if name not in self._addr:
                    self._addr[name] = (np.zeros(S, np.int64), np.zeros(S, np.int64), off, val)
                oa, va, off0, val0 = self._addr[name]
                if off.dtype != off0.dtype or val.dtype != val0.dtype:
                    self._mixed.add(name)
                oa[s], va[s] = off.ctypes.data, val.ctypes.data
            elif name in sh.flat:
                col = sh.flat[name]
                if name not in self._flat_addr:
                    self._flat_addr[name] = (np.zeros(S, np.int64), col)
                addr, col0 = self._flat_addr[name]
                if col.dtype != col0.dtype or not col.flags.c_contiguous:
                    self._mixed.add(name)
                addr[s] = col.ctypes.data
            else:
                self._mixed.add(name)
            if (name in sh.ragged and name in self._flat_addr) or (name in sh.flat and name in self._addr):
                self._mixed.add(name)
        self._opened[s] = True

    def _gather_spread(self, idx: NDArray[np.int64], shard: NDArray[np.int64], local: NDArray[np.int64]):
        """A batch over several shards with one kernel call per column (None when a column needs the generic
        path: nulls, strings, kinds that differ between shards)."""
        need = np.unique(shard)
        for s in need[~self._opened[need]].tolist():
            self._shard(s)
        if self._mixed:
            return None
        return gather_columns(self.schema.names, self._addr, self._flat_addr, shard, local, self._shards, idx)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    #: whether the shards live on object storage (read through a bounded cache): ``datapipe.DataLoader`` then
    #: shuffles shard-locally by default (see its ``shard_window``)
    is_remote: bool = False

    @property
    def shard_offsets(self) -> NDArray[np.int64]:
        """int64 ``[S + 1]``: the first row of each shard, then the row count (for shard-local shuffles, e.g.
        ``RandomBatchSampler(len(ds), b, shuffle="shard_local", shard_offsets=ds.shard_offsets)``)."""
        return self._starts.copy()

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
        shard, local = np.empty(B, dtype=np.int64), np.empty(B, dtype=np.int64)
        bad, single = locate_rows(self._starts, idx, shard, local)  # one kernel call: ~1 µs a batch
        if bad >= 0:
            raise IndexError(f"row {int(idx[bad])} is out of range for a dataset of {len(self)} rows ({self.path})")
        if B and single:  # one shard: no grouping (the common case)
            sh = self._shard(int(shard[0]))
            cols = {}
            for name in self.schema.names:
                if name in sh.ragged:  # values are gathered on first access: collators write from the shard
                    off, val = sh.ragged[name]
                    offsets = np.empty(B + 1, dtype=np.int64)
                    row_offsets(off, local, offsets)
                    cols[name] = Ragged(None, offsets, ((off, val, local, np.arange(B, dtype=np.int64)),))
                else:
                    cols = None
                    break
            if cols is not None:
                return Batch(cols, B, idx)
            groups = [(int(shard[0]), np.arange(B, dtype=np.int64))]
        else:
            if B:
                batch = self._gather_spread(idx, shard, local)  # several shards: one kernel call per column
                if batch is not None:
                    return batch
            order = np.argsort(shard, kind="stable")
            sorted_shards = shard[order]
            cut = np.concatenate(([0], np.flatnonzero(np.diff(sorted_shards)) + 1, [B]))
            groups = [(int(sorted_shards[a]), order[a:b]) for a, b in zip(cut[:-1].tolist(), cut[1:].tolist()) if b > a]
        touched = [(self._shard(s), pos, local[pos]) for s, pos in groups]
        cols: dict = {}
        for name, field in zip(self.schema.names, self.schema):
            if touched and all(name in sh.ragged for sh, _, _ in touched):  # not when a shard has null lists
                lengths = np.empty(B, dtype=np.int64)
                for sh, pos, loc in touched:
                    gather_lengths(sh.ragged[name][0], loc, pos, lengths)
                offsets = np.zeros(B + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                # values are gathered on first access: collators write from the shards into their outputs
                cols[name] = Ragged(None, offsets, tuple((*sh.ragged[name], loc, pos) for sh, pos, loc in touched))
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
            self._index = self._read_index(meta) if meta else {}
        return self._index

    def _read_index(self, meta: dict) -> dict[str, NDArray]:
        """The columns of the index file ``meta`` describes, checked (a remote dataset downloads it instead)."""
        p = self._local_file(meta)
        batch = open_ipc(p, meta, verify=self.verify_mode, what="index")
        if batch.num_rows != len(self) or meta["rows"] != len(self):
            raise DatasetError(f"{p}: {batch.num_rows} rows but the dataset has {len(self)}; rebuild the dataset")
        expected = list(self.manifest.get("index_columns") or batch.schema.names)
        if batch.schema.names != expected:
            raise corrupt_file(p, f"columns {batch.schema.names} differ from the manifest's index columns {expected}")
        index = {}
        for n, col in zip(batch.schema.names, batch.columns):
            if col.null_count:
                raise corrupt_file(p, f"column {n!r} has {col.null_count} nulls")
            index[n] = col.to_numpy(zero_copy_only=False)
        return index

    def files(self) -> list[dict]:
        """Every file the manifest lists: shards, the index, extra files (``pairs.arrow``, ...)."""
        out = list(self.manifest["shards"])
        if self.manifest.get("index"):
            out.append(self.manifest["index"])
        out.extend(self.manifest.get("files") or [])
        return out

    def verify(self) -> dict:
        """Check every file the manifest lists against its size and checksum (always re-read, not cached), and
        every shard's structure.

        Returns:
            ``{"ok": True, "files": n, "bytes": total}``.

        Raises:
            DatasetError: naming the first file that is missing, truncated, changed or malformed (``datapipe
            verify`` reports every bad file, of the dataset and of its decomposition).
        """
        total = 0
        for meta in self.files():
            p = self._local_file(meta)
            check_size(p, meta, what="dataset")
            verify_buffer(pa.memory_map(str(p), "r").read_buffer(), meta["checksum"], p)
            total += meta["bytes"]
        for s in range(self.num_shards):
            meta = self.manifest["shards"][s]
            check_shard(self._local_file(meta), meta, self.schema)
        if self.manifest.get("index"):
            self._index = None
            self.index  # noqa: B018  (opens and checks the index)
        return {"ok": True, "files": len(self.files()), "bytes": total}

    def __repr__(self) -> str:
        return f"ArrowDataset({str(self.path)!r}, rows={len(self)}, shards={self.num_shards}, columns={self.column_names})"
