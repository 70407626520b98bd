"""Write a dataset directory from a table, a stream, a Hugging Face dataset, rows or Parquet/JSONL files.

Shards are Arrow IPC files written into a temporary sibling directory while the output's write lock is held; the
manifest (with its own digest) is written last and the directory is published by a rename (or an atomic exchange
over an existing dataset), so an interrupted write leaves no dataset behind, two concurrent writers cannot both
win, and the next write removes what a killed one left (see :mod:`datapipe.format`).

Every value is checked before it is written: nulls, negative or too-large token ids, and negative, NaN or absurd
(``uint64 > 2**63-1``, ``float > 2**53``) lengths/durations raise :class:`DatasetError` naming the source (the
file for Parquet/JSONL inputs), the row within that source (counted from 0) and the column.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datapipe.format import (FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, MANIFEST, SHARD_DIR, DatasetError,
                             exclusive_output, file_checksum, fsync_path, publish_dir, schema_to_b64, temp_name,
                             write_manifest)

TOKEN_COLUMN = "input_ids"
TOKEN_COLUMNS = (TOKEN_COLUMN,)  # list<int> columns of token ids: no nulls, no negative ids, ids fit int32
_INT32_MAX = 2**31 - 1
_FLOAT_EXACT = 2**53  # floats above this are not exact integers: no length/duration is that large
LENGTH_COLUMNS = ("length", "duration", "num_tokens", "num_frames")  # must be finite and >= 0
AUTO_INDEX = ("length", "duration", "num_tokens", "num_frames", "domain")
DEFAULT_SHARD_ROWS = 65_536
_ROW_CHUNK = 8192


# ---------------------------------------------------------------------------------------------------------------
# sources -> (name, first_row, RecordBatch) stream
def _iter_paths(paths: Sequence[Path]) -> Iterator[tuple[str, pa.RecordBatch]]:
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    for p in paths:
        name = str(p)
        if not p.exists():
            raise DatasetError(f"{name}: no such file")
        suffixes = "".join(p.suffixes[-2:]).lower()
        try:
            if p.suffix.lower() == ".parquet":
                for b in pq.ParquetFile(p).iter_batches(batch_size=_ROW_CHUNK * 8):
                    yield name, b
            elif suffixes.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
                for b in pajson.read_json(p).to_batches():
                    yield name, b
            else:
                raise DatasetError(f"{name}: unsupported file type (write_dataset reads .parquet, .jsonl, .json; "
                                   "use datapipe.ingest for plain text files)")
        except pa.ArrowInvalid as e:
            raise DatasetError(f"{name}: cannot read ({e})") from None


def _iter_rows(rows: Iterable[Mapping]) -> Iterator[tuple[str, pa.RecordBatch]]:
    chunk: list[Mapping] = []
    keys = None
    start = 0
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DatasetError(f"row {i}: expected a dict of column -> value, got {type(row).__name__}")
        if keys is None:
            keys = list(row.keys())
        elif row.keys() != set(keys) and set(row.keys()) != set(keys):
            raise DatasetError(f"row {i}: columns {sorted(row.keys())} differ from the first row's {sorted(keys)}")
        chunk.append(row)
        if len(chunk) == _ROW_CHUNK:
            yield from _rows_batch(chunk, keys, start)
            start += len(chunk)
            chunk = []
    if chunk:
        yield from _rows_batch(chunk, keys, start)


def _chain1(head, it):
    yield head
    yield from it


def _iter_named(head, it) -> Iterator[tuple[str, pa.RecordBatch]]:
    for item in _chain1(head, it):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], pa.RecordBatch)):
            raise TypeError(f"a source of (name, RecordBatch) pairs yielded a {type(item).__name__}")
        yield str(item[0]), item[1]


def _plain(v):
    """Torch tensors (and anything with ``.numpy()``) become numpy arrays, which Arrow converts."""
    if hasattr(v, "detach") and hasattr(v, "numpy"):
        return v.detach().cpu().numpy()
    return v


def _rows_batch(chunk, keys, start):
    try:
        t = pa.Table.from_pylist(chunk)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        try:
            t = pa.Table.from_pylist([{k: _plain(v) for k, v in row.items()} for row in chunk])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DatasetError(f"rows {start}..{start + len(chunk) - 1}: cannot convert to Arrow ({e})") from None
    for b in t.select(keys).to_batches():
        yield "rows", b


def iter_source(source) -> Iterator[tuple[str, pa.RecordBatch]]:
    """Normalise any supported source into ``(source name, RecordBatch)`` pairs.

    Besides the sources :func:`write_dataset` lists, an iterable of ``(name, RecordBatch)`` pairs is passed
    through, so a caller that reads files itself (``datapipe.ingest``) gets errors that name each file.
    """
    if isinstance(source, pa.Table):
        yield from (("<table>", b) for b in source.to_batches())
    elif isinstance(source, pa.RecordBatch):
        yield "<record batch>", source
    elif isinstance(source, pa.RecordBatchReader):
        yield from (("<reader>", b) for b in source)
    elif isinstance(source, (str, os.PathLike)):
        yield from _iter_paths([Path(source)])
    elif type(source).__module__.startswith("datasets.") and hasattr(source, "with_format"):
        if hasattr(source, "features") and not hasattr(source, "__len__"):  # IterableDataset
            yield from _iter_rows(source)
        else:
            for t in source.with_format("arrow").iter(batch_size=_ROW_CHUNK * 8):
                yield from (("<datasets.Dataset>", b) for b in t.to_batches())
    elif isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        yield from _iter_paths([Path(s) for s in source])
    elif isinstance(source, Iterable):
        it = iter(source)
        try:
            head = next(it)
        except StopIteration:
            return
        if isinstance(head, tuple) and len(head) == 2 and isinstance(head[1], pa.RecordBatch):
            yield from _iter_named(head, it)  # (name, batch) pairs: errors name each batch's source
        else:
            yield from _iter_rows(_chain1(head, it))
    else:
        raise TypeError(f"source must be a pyarrow Table/RecordBatchReader, a datasets.Dataset, paths, or an "
                        f"iterable of dicts (got {type(source).__name__})")


# ---------------------------------------------------------------------------------------------------------------
def _normalise_schema(schema: pa.Schema) -> pa.Schema:
    """Token ids are stored as ``list<int32>`` (``large_list<int32>`` kept large)."""
    i = schema.get_field_index(TOKEN_COLUMN)
    if i >= 0:
        t = schema.field(i).type
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and not (
                pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type)):
            raise DatasetError(f"column {TOKEN_COLUMN!r} must be a list of integer token ids (got {t}); convert "
                               "the ids to integers")
        if pa.types.is_list(t) and t.value_type != pa.int32():
            schema = schema.set(i, pa.field(TOKEN_COLUMN, pa.list_(pa.int32())))
        elif pa.types.is_large_list(t) and t.value_type != pa.int32():
            schema = schema.set(i, pa.field(TOKEN_COLUMN, pa.large_list(pa.int32())))
        elif not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            raise DatasetError(f"column {TOKEN_COLUMN!r} must be a list of integers (got {t})")
    return schema


def _conform(name: str, first: str, batch: pa.RecordBatch, schema: pa.Schema, row0: int) -> pa.RecordBatch:
    if batch.schema.names != schema.names:
        if set(batch.schema.names) == set(schema.names):
            batch = batch.select(schema.names)
        else:
            raise DatasetError(f"{name} (row {row0}): columns {batch.schema.names} do not match the schema of "
                               f"{first}: {schema.names}")
    if not batch.schema.equals(schema):
        try:
            batch = batch.cast(schema, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, NotImplementedError) as e:
            raise DatasetError(f"{name} (row {row0}): schema {batch.schema} does not match the schema of {first}: "
                               f"{schema} ({e})") from None
    return batch


def _index_arrays(batch: pa.RecordBatch, index_columns: Sequence[str], name: str, row0: int) -> dict:
    out = {}
    for col in index_columns:
        if col in batch.schema.names:
            arr = batch.column(col)
        elif col == "length" and TOKEN_COLUMN in batch.schema.names:
            arr = pc.list_value_length(batch.column(TOKEN_COLUMN)).cast(pa.int64())
        else:
            raise DatasetError(f"index column {col!r} is neither a column of {name} ({batch.schema.names}) nor "
                               f"derivable ('length' is derived from {TOKEN_COLUMN!r})")
        if arr.null_count:
            bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{name}: row {row0 + bad}, column {col!r}: null value in an index column")
        if col in LENGTH_COLUMNS:
            _check_length_values(arr, col, name, row0)
        out[col] = arr
    return out


def _check_length_values(arr: pa.Array, col: str, name: str, row0: int) -> None:
    """Lengths and durations are finite, >= 0 and exact in int64/float64 (no wrap-around downstream)."""
    a = arr.to_numpy(zero_copy_only=False)
    if a.dtype.kind not in "iuf":
        raise DatasetError(f"{name}: column {col!r} must be numeric (got {arr.type})")
    checks = []
    if a.dtype.kind == "f":
        checks = [(~np.isfinite(a), "is not finite"), (a < 0, "is negative"),
                  (a > _FLOAT_EXACT, "is absurdly large (> 2**53)")]
    elif a.dtype.kind == "i":
        checks = [(a < 0, "is negative")]
    else:
        checks = [(a > np.iinfo(np.int64).max, "does not fit int64 (> 2**63-1)")]
    for mask, why in checks:
        bad = np.flatnonzero(mask)
        if len(bad):
            raise DatasetError(f"{name}: row {row0 + int(bad[0])}, column {col!r}: value {a[bad[0]]} {why} "
                               f"({len(bad)} such rows in this batch); fix or drop these rows")


def _check_tokens(batch: pa.RecordBatch, name: str, row0: int) -> None:
    """Token lists: no null list, no null id, no negative id, every id fits int32 (checked before the cast)."""
    for column in TOKEN_COLUMNS:
        if column not in batch.schema.names:
            continue
        col = batch.column(column)
        t = col.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            continue  # _normalise_schema names the type
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{name}: row {row0 + bad}, column {column!r}: null token list; drop the row or "
                               "give it an empty list")
        flat = col.flatten()
        if len(flat) == 0 or pa.types.is_null(flat.type):
            continue
        offsets = col.offsets.to_numpy()
        offsets = offsets - offsets[0]

        def row_of(v: int) -> int:
            return row0 + int(np.searchsorted(offsets, v, side="right") - 1)

        if flat.null_count:
            v = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{name}: row {row_of(v)}, column {column!r}: null token id at position "
                               f"{v - int(offsets[row_of(v) - row0])}; token ids must be integers >= 0")
        if not pa.types.is_integer(flat.type):
            continue
        lo, hi = pc.min_max(flat).values()
        if lo.as_py() >= 0 and hi.as_py() <= _INT32_MAX:
            continue
        ids = flat.to_numpy()
        bad = np.flatnonzero((ids < 0) | (ids > _INT32_MAX))
        v = int(bad[0])
        why = "is negative" if ids[v] < 0 else f"does not fit int32 (> {_INT32_MAX})"
        raise DatasetError(f"{name}: row {row_of(v)}, column {column!r}: token id {ids[v]} at position "
                           f"{v - int(offsets[row_of(v) - row0])} {why}; token ids must be in [0, {_INT32_MAX}]")


class _ShardWriter:
    def __init__(self, root: Path, schema: pa.Schema, shard_rows: int, compression: str | None):
        self.root, self.schema, self.shard_rows = root, schema, shard_rows
        self.options = pa.ipc.IpcWriteOptions(compression=compression)
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.shards: list[dict] = []

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self.pending, schema=self.schema)
        head, tail = table.slice(0, rows), table.slice(rows)
        fname = f"{SHARD_DIR}/{len(self.shards):05d}.arrow"
        path = self.root / fname
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self.schema, options=self.options) as w:
            for b in head.combine_chunks().to_batches(max_chunksize=None):
                w.write_batch(b)
        fsync_path(path)
        self.shards.append({"file": fname, "rows": head.num_rows, "bytes": path.stat().st_size,
                            "checksum": file_checksum(path)})
        self.pending = tail.combine_chunks().to_batches() if tail.num_rows else []
        self.pending_rows = tail.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)


def write_dataset(source, out_dir: str | os.PathLike, *, shard_rows: int = DEFAULT_SHARD_ROWS,
                  index_columns: Sequence[str] | None = None, compression: str | None = None,
                  overwrite: bool = False, params: Mapping | None = None,
                  progress: Callable[[int], None] | None = None,
                  extra_files: Mapping[str, Callable[[Path], object]] | None = None, filesystem=None) -> Path:
    """Write ``source`` as a dataset directory of memory-mappable Arrow IPC shards.

    Args:
        source: a pyarrow Table, RecordBatch or RecordBatchReader; a ``datasets.Dataset``; a path or list of paths
            to Parquet/JSONL files; an iterable of dicts (column -> value); or an iterable of
            ``(source name, RecordBatch)`` pairs (errors then name the source and the row within it). Token ids
            go in ``input_ids`` (stored as ``list<int32>``).
        out_dir: the dataset directory to create.
        shard_rows: rows per shard file.
        index_columns: per-row metadata columns copied into ``index.arrow`` for samplers. ``length`` is derived
            from ``input_ids`` when absent. Default: those of ``length, duration, num_tokens, num_frames, domain``
            that exist or can be derived.
        compression: ``None``, ``"lz4"`` or ``"zstd"`` (compressed shards are read without zero-copy).
        overwrite: replace an existing dataset at ``out_dir``.
        params: extra JSON-serialisable creation parameters recorded in the manifest.
        progress: called with the number of rows written so far.
        extra_files: files stored beside the shards, ``{name: write(path)}``: each function writes its file at
            the path it is given (inside the temporary directory) before the manifest is sealed, and the file is
            listed in the manifest's ``files`` with its size and checksum (so ``datapipe verify`` covers it).
        filesystem: a configured ``pyarrow.fs.FileSystem``; with it, or with a URL as ``out_dir`` (``s3://bkt/ds``),
            the dataset is built in a local temporary directory and uploaded, manifest last (``datapipe.remote``);
            the URL is returned. With ``overwrite``, the old manifest is deleted before anything else changes, the
            new files are uploaded, the old version's other files deleted, and the new manifest uploaded last: a
            reader that opens the URL meanwhile gets "unfinished upload" (no manifest), never a mix. A reader that
            opened the old version before keeps its manifest: shards it already cached still read as the old
            rows; a shard it downloads afterwards is checked against the old manifest and fails (``DatasetError``:
            checksum or size mismatch if replaced, "not found" if deleted), never new rows under the old manifest.
            Reopen the dataset after an overwrite.

    Returns:
        The dataset directory.

    Raises:
        DatasetError: empty source, schema mismatch across sources, null/negative/too-large token ids, nulls or
            negative/NaN/absurd lengths in index columns (naming the source file, the row within it and the
            column), an existing dataset without ``overwrite``, or another process writing ``out_dir`` now.
    """
    if not isinstance(shard_rows, (int, np.integer)) or shard_rows < 1:
        raise ValueError(f"shard_rows must be an integer >= 1 (got {shard_rows=})")
    if compression not in (None, "lz4", "zstd"):
        raise ValueError(f"compression must be None, 'lz4' or 'zstd' (got {compression=})")
    if filesystem is not None or "://" in str(out_dir):  # object storage: build locally, upload, manifest last
        from datapipe import remote

        if remote.is_remote(out_dir, filesystem):
            return remote.write_remote(write_dataset, source, out_dir, filesystem=filesystem, overwrite=overwrite,
                                       shard_rows=shard_rows, index_columns=index_columns, compression=compression,
                                       params=params, progress=progress, extra_files=extra_files)
        out_dir = remote.local_path(out_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_output(out):  # also removes what killed writers of `out` left
        _check_target(out, overwrite)
        tmp = temp_name(out)
        (tmp / SHARD_DIR).mkdir(parents=True)
        try:
            manifest = _write_into(tmp, source, int(shard_rows), index_columns, compression, params, progress)
            files = []
            for fname, write in (extra_files or {}).items():
                if os.path.isabs(fname) or ".." in Path(fname).parts or fname in (MANIFEST, INDEX_FILE, SHARD_DIR):
                    raise ValueError(f"extra_files names must be plain relative names (got {fname!r})")
                fpath = tmp / fname
                fpath.parent.mkdir(parents=True, exist_ok=True)
                write(fpath)
                fsync_path(fpath)
                files.append({"file": fname, "bytes": fpath.stat().st_size, "checksum": file_checksum(fpath)})
            if files:
                manifest["files"] = files
            fsync_path(tmp / SHARD_DIR)
            write_manifest(tmp / MANIFEST, manifest)
            publish_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if (out / MANIFEST).exists() and not overwrite:
        raise DatasetError(f"{out}: a dataset already exists (pass overwrite=True, or --overwrite on the command "
                           "line, to replace it)")
    if out.is_dir() and not (out / MANIFEST).exists():
        leftovers = {p.name for p in out.iterdir()} - {SHARD_DIR, INDEX_FILE}
        if leftovers:
            raise DatasetError(f"{out}: exists, holds other files ({sorted(leftovers)[:5]}) and is not a dataset; "
                               "choose an empty or new directory")


def _write_into(tmp, source, shard_rows, index_columns, compression, params, progress) -> dict:
    schema = first = writer = None
    index_parts: dict[str, list] = {}
    rows = 0
    source_rows: dict[str, int] = {}  # rows seen per source: errors give the row within that file
    for name, batch in iter_source(source):
        if batch.num_rows == 0:
            continue
        row0 = source_rows.get(name, 0)
        source_rows[name] = row0 + batch.num_rows
        if schema is None:
            schema, first = _normalise_schema(batch.schema), name
            if index_columns is None:
                index_columns = [c for c in AUTO_INDEX if c in schema.names or (c == "length" and TOKEN_COLUMN in schema.names)]
            index_columns = list(index_columns)
            writer = _ShardWriter(tmp, schema, shard_rows, compression)
        _check_tokens(batch, name, row0)
        batch = _conform(name, first, batch, schema, row0)
        for col, arr in _index_arrays(batch, index_columns, name, row0).items():
            index_parts.setdefault(col, []).append(arr)
        writer.add(batch)
        rows += batch.num_rows
        if progress is not None:
            progress(rows)
    if schema is None:
        raise DatasetError("the source is empty: no rows to write")
    writer.close()
    index_meta = None
    if index_columns:
        index = pa.table({c: pa.chunked_array(index_parts[c]).combine_chunks() for c in index_columns})
        ipath = tmp / INDEX_FILE
        with pa.OSFile(str(ipath), "wb") as sink, pa.ipc.new_file(sink, index.schema) as w:
            w.write_table(index)
        fsync_path(ipath)
        index_meta = {"file": INDEX_FILE, "rows": index.num_rows, "bytes": ipath.stat().st_size,
                      "checksum": file_checksum(ipath)}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "num_rows": rows,
        "schema": schema_to_b64(schema),
        "schema_text": str(schema),
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
        "index_columns": list(index_columns),
        "shards": writer.shards,
        "index": index_meta,
        "compression": compression,
        "shard_rows": shard_rows,
        "created_by": "datapipe",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params": dict(params or {}),
    }
