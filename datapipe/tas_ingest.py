"""Ingest for TAS-Balanced training: query TSV + teacher-scored pair TSV -> dataset directory + pair table.

"Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware Sampling" (Hofstätter et al.,
SIGIR 2021) trains on MS MARCO-style files:

* queries: ``qid<TAB>text`` per line;
* pairs with teacher scores: ``s_pos<TAB>s_neg<TAB>qid<TAB>pid_pos<TAB>pid_neg`` per line.

:func:`ingest_tas` writes the queries as a dataset directory (row ``i`` is query ``i``; columns ``qid``, ``text``,
``num_pairs`` and, with a tokenizer, ``input_ids``) and the pairs as ``pairs.arrow`` inside it (Arrow IPC file,
rows grouped by query: ``query``, ``pos_id``, ``neg_id``, ``s_pos``, ``s_neg``, ``margin``), which
:func:`load_pair_table` turns into a ``samplers.PairTable`` for ``samplers.TopicAwareBatchSampler``.
Everything is parsed and checked before anything is written; errors name the file and line.
:func:`cluster_embeddings` runs FAISS k-means over query embeddings and writes the cluster ids.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datapipe.format import DatasetError, read_sealed_table, write_sealed_table
from samplers.topic_aware import PairTable

__all__ = ["cluster_embeddings", "ingest_tas", "load_clusters", "load_pair_table", "read_pairs_tsv",
           "read_queries_tsv", "save_pair_table"]

PAIRS_FILE = "pairs.arrow"
_QUERY_FIELDS = ("qid", "text")
_PAIR_FIELDS = ("s_pos", "s_neg", "qid", "pid_pos", "pid_neg")


def _first_bad_line(path: Path, fields: tuple[str, ...], floats: tuple[int, ...] = (),
                    ints: tuple[int, ...] = ()) -> str:
    """Scan a TSV in Python to name the first malformed line (only called once a fast parse has failed)."""
    lineno = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != len(fields):
                return (f"{path}: line {lineno}: expected {len(fields)} tab-separated fields "
                        f"({', '.join(fields)}), got {len(parts)}: {line[:80]!r}")
            for i in floats:
                try:
                    float(parts[i])
                except ValueError:
                    return f"{path}: line {lineno}: column {fields[i]!r} is not a number: {parts[i][:40]!r}"
            for i in ints:
                try:
                    int(parts[i])
                except ValueError:
                    return f"{path}: line {lineno}: column {fields[i]!r} is not an integer id: {parts[i][:40]!r}"
    if lineno == 0:
        return f"{path}: the file is empty"
    return f"{path}: could not be parsed as a {len(fields)}-column TSV"


def _read_tsv(path: Path, fields: tuple[str, ...], types: dict, floats=(), ints=()) -> pa.Table:
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=list(fields), block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        try:
            msg = _first_bad_line(path, fields, floats, ints)
        except UnicodeDecodeError as ue:
            msg = f"{path}: not valid UTF-8 ({ue})"
        raise DatasetError(msg) from e
    if table.num_rows == 0:
        raise DatasetError(f"{path}: the file is empty")
    if any(col.null_count for col in table.columns):  # an empty line or an empty numeric field
        raise DatasetError(_first_bad_line(path, fields, floats, ints))
    return table


def read_queries_tsv(path: str | os.PathLike) -> pa.Table:
    """Read ``qid<TAB>text`` lines into a table (``qid``, ``text`` strings), row ``i`` = line ``i + 1``.

    Raises:
        DatasetError: missing/empty file, a line without exactly two fields, an empty or repeated qid
            (naming the line).
    """
    path = Path(path)
    t = _read_tsv(path, _QUERY_FIELDS, {"qid": pa.string(), "text": pa.string()})
    head = (t.column("qid")[0].as_py().strip().lower(), t.column("text")[0].as_py().strip().lower())
    if head[0] in ("qid", "query_id", "id") and head[1] in ("text", "query", "query_text"):
        raise DatasetError(f"{path}: line 1 is a header ({t.column('qid')[0].as_py()!r}, "
                           f"{t.column('text')[0].as_py()!r}), not a query: remove it (the file is qid<TAB>text "
                           "lines, as MS MARCO's queries.train.tsv)")
    qid = t.column("qid")
    empty = pc.equal(pc.utf8_length(qid), 0)
    if pc.any(empty).as_py():
        line = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0]) + 1
        raise DatasetError(f"{path}: line {line}: empty qid")
    vc = pc.value_counts(qid).flatten()
    if len(vc[0]) != t.num_rows:
        dup_val = vc[0].filter(pc.greater(vc[1], 1))[0].as_py()
        lines = np.flatnonzero(pc.equal(qid, dup_val).to_numpy(zero_copy_only=False))[:2] + 1
        raise DatasetError(f"{path}: qid {dup_val!r} appears twice (lines {lines[0]} and {lines[1]}); "
                           "qids must be unique")
    return t


def read_pairs_tsv(path: str | os.PathLike, qids) -> tuple[PairTable, np.ndarray, np.ndarray]:
    """Read ``s_pos<TAB>s_neg<TAB>qid<TAB>pid_pos<TAB>pid_neg`` lines into a pair table over ``qids``.

    Args:
        path: the pairs TSV.
        qids: the query ids in query-index order (a sequence of strings or a pyarrow string array); the pair
            table names queries by their position here.

    Returns:
        ``(pairs, s_pos, s_neg)``: the :class:`samplers.PairTable` (margin = ``s_pos - s_neg``), and the
        teacher scores as float64 ``[P]`` in the table's row order.

    Raises:
        DatasetError: malformed lines, non-finite scores, non-integer passage ids, or a qid not among ``qids``
            (naming the line).
    """
    path = Path(path)
    types = {"s_pos": pa.float64(), "s_neg": pa.float64(), "qid": pa.string(), "pid_pos": pa.int64(),
             "pid_neg": pa.int64()}
    t = _read_tsv(path, _PAIR_FIELDS, types, floats=(0, 1), ints=(3, 4))
    s_pos = t.column("s_pos").to_numpy()
    s_neg = t.column("s_neg").to_numpy()
    bad = np.flatnonzero(~(np.isfinite(s_pos) & np.isfinite(s_neg)))
    if len(bad):
        raise DatasetError(f"{path}: line {int(bad[0]) + 1}: teacher scores must be finite "
                           f"(s_pos={s_pos[bad[0]]}, s_neg={s_neg[bad[0]]}; {len(bad)} lines in all)")
    qids = qids if isinstance(qids, (pa.Array, pa.ChunkedArray)) else pa.array(list(qids), pa.string())
    query = pc.index_in(t.column("qid"), value_set=qids.combine_chunks() if isinstance(qids, pa.ChunkedArray) else qids)
    if query.null_count:
        first = int(np.flatnonzero(query.is_null().to_numpy(zero_copy_only=False))[0])
        raise DatasetError(
            f"{path}: line {first + 1}: qid {t.column('qid')[first].as_py()!r} is not in the queries file "
            f"({query.null_count} lines name unknown queries)"
        )
    q = query.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(q, kind="stable")
    pairs = PairTable.from_arrays(q, t.column("pid_pos").to_numpy(), t.column("pid_neg").to_numpy(),
                                  s_pos - s_neg, num_queries=len(qids))
    return pairs, s_pos[order], s_neg[order]


def save_pair_table(pairs: PairTable, path: str | os.PathLike, *, s_pos=None, s_neg=None) -> Path:
    """Write a pair table as an Arrow IPC file (atomically: temp file + rename).

    Columns: ``query``, ``pos_id``, ``neg_id``, ``margin`` (and ``s_pos``, ``s_neg`` when given, in row order);
    the schema metadata records ``num_queries`` so queries without pairs survive the round trip, and a digest of
    the content, which :func:`load_pair_table` checks.
    """
    path = Path(path)
    cols = {"query": pairs.query_of(np.arange(pairs.num_pairs)), "pos_id": pairs.pos_id, "neg_id": pairs.neg_id,
            "margin": pairs.margin}
    if s_pos is not None and s_neg is not None:
        cols.update(s_pos=np.asarray(s_pos, np.float64), s_neg=np.asarray(s_neg, np.float64))
    table = pa.table(cols).replace_schema_metadata({"num_queries": str(pairs.num_queries),
                                                    "format": "datapipe.pair_table/1"})
    return write_sealed_table(path, table)


def load_pair_table(path: str | os.PathLike) -> PairTable:
    """Read a pair table written by :func:`save_pair_table` (or the ``pairs.arrow`` of a TAS dataset dir).

    Raises:
        DatasetError: naming the file when it is missing, unreadable, or fails its checksum (the dataset
            manifest's entry for a TAS dataset directory, the digest the file carries otherwise).
    """
    path = Path(path)
    if path.is_dir():
        from datapipe.format import read_manifest, verify_checksum

        manifest = read_manifest(path)
        entry = next((e for e in manifest.get("files") or [] if e["file"] == PAIRS_FILE), None)
        path = path / PAIRS_FILE
        if entry is not None and path.exists():
            if path.stat().st_size != entry["bytes"]:
                raise DatasetError(f"{path}: {path.stat().st_size} bytes but the manifest says {entry['bytes']}; "
                                   "the pair table is truncated: rerun `datapipe tas ingest`")
            verify_checksum(path, entry["checksum"])
    if not path.exists():
        raise DatasetError(f"{path}: no such pair table (run `datapipe tas ingest` first)")
    t = read_sealed_table(path, what="pair table")
    meta = t.schema.metadata or {}
    if b"num_queries" not in meta:
        raise DatasetError(f"{path}: not a pair table (no num_queries in the schema metadata)")
    nq = int(meta[b"num_queries"])
    q = t.column("query").to_numpy()
    if len(q) and np.any(np.diff(q) < 0):
        raise DatasetError(f"{path}: rows are not grouped by query")
    try:
        return PairTable.from_arrays(q, t.column("pos_id").to_numpy(), t.column("neg_id").to_numpy(),
                                     t.column("margin").to_numpy(), num_queries=nq)
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from None


def ingest_tas(queries_tsv: str | os.PathLike, pairs_tsv: str | os.PathLike, out_dir: str | os.PathLike, *,
               tokenizer=None, shard_rows: int = 65_536, compression: str | None = None, overwrite: bool = False,
               progress: Callable[[int], None] | None = None) -> Path:
    """Write a TAS dataset directory: the queries (one row each) plus ``pairs.arrow`` beside the shards.

    Args:
        queries_tsv: ``qid<TAB>text`` file.
        pairs_tsv: ``s_pos<TAB>s_neg<TAB>qid<TAB>pid_pos<TAB>pid_neg`` file.
        out_dir: dataset directory to create.
        tokenizer: ``None`` (text only), ``"bytes"``, a path to a ``tokenizer.json``, or an object with
            ``encode_batch``: adds ``input_ids`` (and ``length`` in the index).
        shard_rows, compression, overwrite, progress: as in :func:`datapipe.write_dataset`.

    Returns:
        The dataset directory. ``ArrowDataset.open(dir)[i]`` is query ``i``; ``load_pair_table(dir)`` its pairs.

    Raises:
        DatasetError: bad files (naming file and line); nothing is written then.
    """
    from datapipe.writer import write_dataset

    queries = read_queries_tsv(queries_tsv)
    pairs, s_pos, s_neg = read_pairs_tsv(pairs_tsv, queries.column("qid"))
    cols = {"qid": queries.column("qid"), "text": queries.column("text"), "num_pairs": pairs.counts()}
    index_columns = ["num_pairs"]
    if tokenizer is not None:
        from datapipe.tokenize import load_tokenizer

        tok = tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer)
        r = tok.encode_batch(queries.column("text").to_pylist())
        cols["input_ids"] = pa.ListArray.from_arrays(pa.array(np.asarray(r.offsets, np.int32)), pa.array(r.values))
        index_columns.insert(0, "length")
    table = pa.table(cols)
    params = {"kind": "tas", "queries_tsv": str(queries_tsv), "pairs_tsv": str(pairs_tsv),
              "num_pairs": pairs.num_pairs, "pairs_file": PAIRS_FILE}
    out = write_dataset(table, out_dir, shard_rows=shard_rows, index_columns=index_columns, compression=compression,
                        overwrite=overwrite, params=params, progress=progress,
                        extra_files={PAIRS_FILE: lambda p: save_pair_table(pairs, p, s_pos=s_pos, s_neg=s_neg)})
    return Path(out)


def _load_embeddings(source: str | os.PathLike, column: str | None) -> np.ndarray:
    p = Path(source)
    if p.is_dir():
        from datapipe.dataset import ArrowDataset, Ragged

        ds = ArrowDataset.open(p)
        if column is None:
            raise ValueError(f"column must name the embedding column of the dataset {p} (columns: {ds.column_names})")
        if column not in ds.column_names:
            raise DatasetError(f"{p}: no column {column!r} (columns: {ds.column_names})")
        vals = ds.__getitems__(np.arange(len(ds), dtype=np.int64))[column]
        if isinstance(vals, Ragged):
            lens = vals.lengths
            if len(lens) and np.any(lens != lens[0]):
                row = int(np.flatnonzero(lens != lens[0])[0])
                raise DatasetError(f"{p}: column {column!r} row {row} has {lens[row]} values, row 0 has {lens[0]}")
            return np.asarray(vals.values).reshape(len(lens), -1)
        arr = np.asarray(vals)
        if arr.dtype == object:
            try:
                arr = np.stack(arr)
            except ValueError as e:
                raise DatasetError(f"{p}: column {column!r} does not hold one equal-length vector per row "
                                   f"({e})") from None
        return _check_embeddings(arr, f"{p}: column {column!r}")
    if not p.exists():
        raise DatasetError(f"{p}: no such file")
    if p.suffix != ".npy":
        raise ValueError(f"source must be a .npy file or a dataset directory (got {str(p)!r})")
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise DatasetError(f"{p}: not a .npy file ({'empty' if not magic else 'no NUMPY header'}); save the "
                           "embeddings with numpy.save(path, float32 array of shape [n, d])")
    try:
        x = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # empty, truncated, pickled objects, not a .npy at all
        raise DatasetError(f"{p}: cannot read a numeric .npy array ({type(e).__name__}: {e}); save the embeddings "
                           "with numpy.save(path, float32 array of shape [n, d])") from None
    return _check_embeddings(x, str(p))


def _check_embeddings(x: np.ndarray, where: str, chunk_rows: int = 1 << 16) -> np.ndarray:
    """``x`` if it is a finite numeric ``[n, d]`` array with n, d >= 1, else a :class:`DatasetError` naming
    ``where``, the shape or dtype found and the first bad row (checked ``chunk_rows`` rows at a time, so a
    memory-mapped file is never copied whole)."""
    if x.ndim != 2:
        raise DatasetError(f"{where}: embeddings of shape {x.shape} ({x.ndim}-D), expected 2-D [n, d] (one row "
                           "per query); reshape, e.g. x.reshape(-1, 1) for 1-D values")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
            or np.issubdtype(x.dtype, np.bool_)):
        raise DatasetError(f"{where}: embeddings of dtype {x.dtype}, expected numbers (float32 preferred)")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise DatasetError(f"{where}: embeddings of shape {x.shape}, expected at least one row and one column")
    if np.issubdtype(x.dtype, np.floating):
        for a in range(0, x.shape[0], chunk_rows):
            bad = np.flatnonzero(~np.isfinite(x[a:a + chunk_rows]).all(axis=1))
            if len(bad):
                row = a + int(bad[0])
                col = int(np.flatnonzero(~np.isfinite(x[row]))[0])
                raise DatasetError(f"{where}: row {row}, column {col}: {x[row, col]} (NaN/inf); drop or fix the "
                                   "rows before clustering")
    return x


def cluster_embeddings(source: str | os.PathLike, k: int, *, column: str | None = None,
                       out: str | os.PathLike | None = None, niter: int = 20, seed: int = 0, gpu="auto",
                       max_points_per_centroid: int = 256, step: Callable[[str], None] | None = None):
    """k-means (FAISS) over query embeddings from a ``.npy`` file or a dataset column; optionally write the ids.

    Args:
        source: ``[n, d]`` ``.npy`` file, or a dataset directory with a list/fixed-size-list column ``column``.
        k: number of clusters.
        column: the embedding column when ``source`` is a dataset directory.
        out: optional Arrow IPC file to write (column ``cluster`` int64, row ``i`` = query ``i``; the centroids
            go to ``<out stem>.centroids.npy``).
        niter, seed, gpu, max_points_per_centroid: as in :func:`native.kmeans`.
        step: called with a short description before each step (for progress display).

    Returns:
        ``(centroids, cluster_ids)``: float32 ``[k, d]``, int64 ``[n]``.
    """
    from native.faiss_ops import kmeans

    say = step or (lambda _s: None)
    say("loading embeddings")
    x = _load_embeddings(source, column)
    say(f"k-means: {x.shape[0]} x {x.shape[1]} -> {k} clusters")
    centroids, ids = kmeans(x, k, niter=niter, seed=seed, gpu=gpu, max_points_per_centroid=max_points_per_centroid)
    if out is not None:
        say("writing cluster ids")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cpath = out.with_name(out.stem + ".centroids.npy")
        ctmp = cpath.with_name(f".{cpath.name}.tmp-{uuid.uuid4().hex[:8]}.npy")
        try:
            np.save(ctmp, centroids)
            os.replace(ctmp, cpath)
        finally:
            if ctmp.exists():
                ctmp.unlink()
        from datapipe.format import file_checksum

        # the ids file carries a digest of its content and the centroids file's checksum
        table = pa.table({"cluster": ids}).replace_schema_metadata(
            {"k": str(k), "seed": str(seed), "centroids_file": cpath.name,
             "centroids_checksum": file_checksum(cpath)})
        write_sealed_table(out, table)
    return centroids, ids


def load_clusters(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a cluster file written by :func:`cluster_embeddings` (``datapipe tas cluster --out``), checked.

    Returns:
        ``(cluster_ids int64 [n], centroids float32 [k, d] or None when the centroids file is absent)``.

    Raises:
        DatasetError: naming the file whose content does not match its checksum (the ids file carries a digest
            of its content and the checksum of its centroids file).
    """
    from datapipe.format import verify_checksum

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such cluster file (run `datapipe tas cluster --out {path}` first)")
    t = read_sealed_table(path, what="cluster file")
    if "cluster" not in t.column_names:
        raise DatasetError(f"{path}: no 'cluster' column (columns: {t.column_names}); not a cluster file")
    meta = t.schema.metadata or {}
    centroids = None
    if b"centroids_file" in meta:
        cpath = path.with_name(meta[b"centroids_file"].decode())
        if cpath.exists():
            verify_checksum(cpath, meta[b"centroids_checksum"].decode())
            centroids = np.load(cpath, allow_pickle=False)
    return t.column("cluster").to_numpy(), centroids

