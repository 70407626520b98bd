"""Open and check the stored dataset-decomposition index of a dataset directory (the reading side).

The index of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum" (Pouransari et
al., NeurIPS 2024), as :mod:`datapipe.decomposition` builds it::

    <dataset_dir>/decomposition/
        manifest.json     parameters, per-bucket counts, token/EOS counts, checksums; written last
        pieces.arrow      int64 row, start, length, sequence    (one entry per piece, sorted by sequence)
        sequences.arrow   int64 log2, tokens, first_piece       (one entry per training sequence)
        buckets/k08.arrow ...  with --materialize: fixed_size_list<int32>[2^k] token rows, one file per bucket

Each table is one Arrow record batch, memory-mapped: the columns are numpy views, never copied. The manifest
carries its own digest and records every file's size and checksum (:meth:`DecomposedIndex.open` checks pieces and
sequences by default, :func:`verify_decomposition` every file, materialized buckets included) and the dataset's
index checksum: an index built for another version of the dataset is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from datapipe.dataset import ArrowDataset, map_checked
from datapipe.format import (DatasetError, check_file_entry, check_manifest_digest, load_json, parse_json,
                             verify_checksum)

__all__ = ["DECOMPOSITION_DIR", "FORMAT_NAME", "FORMAT_VERSION", "PIECE_COLUMNS", "SEQUENCE_COLUMNS",
           "DecomposedIndex", "dataset_fingerprint", "decomposition_files", "read_decomposition_manifest",
           "verify_decomposition"]

DECOMPOSITION_DIR = "decomposition"
FORMAT_NAME = "datapipe.decomposition"
FORMAT_VERSION = 2  # 2: the manifest carries its own digest (version 1 manifests are read without one)
#: the int64 columns of pieces.arrow and sequences.arrow, in file order
PIECE_COLUMNS = ("row", "start", "length", "sequence")
SEQUENCE_COLUMNS = ("log2", "tokens", "first_piece")


def _read_table(path: Path) -> pa.Table:
    try:
        t = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        t.validate(full=True)
        return t
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: cannot open ({e}); rebuild with `datapipe decompose`") from None


def _column(table: pa.Table, name: str, path: Path) -> NDArray[np.int64]:
    if name not in table.column_names:
        raise DatasetError(f"{path}: no column {name!r}; rebuild with `datapipe decompose`")
    col = table.column(name)
    arr = col.chunk(0).to_numpy() if col.num_chunks == 1 else col.to_numpy()
    return arr


def dataset_fingerprint(ds: ArrowDataset) -> dict:
    """What a decomposition records of its dataset (rows, index checksum): a mismatch means another version."""
    meta = ds.manifest.get("index") or {}
    return {"num_rows": int(len(ds)), "index_checksum": meta.get("checksum")}


def read_decomposition_manifest(path: Path, m: dict | None = None) -> dict:
    """The checked manifest of the decomposition at ``path`` (``m``: its parsed JSON, read from a store)."""
    mpath = path / "manifest.json" if isinstance(path, Path) else f"{path}/manifest.json"
    m = load_json(mpath) if m is None else m
    version = m.get("format_version", 0)
    if m.get("format") != FORMAT_NAME or not isinstance(version, int) or version > FORMAT_VERSION:
        raise DatasetError(f"{mpath}: not a decomposition this datapipe reads (format {m.get('format')!r}, "
                           f"version {m.get('format_version')})")
    check_manifest_digest(m, mpath, required=version >= 2)
    files = m.get("files")
    if not isinstance(files, dict) or set(files) != {"pieces", "sequences"}:
        raise DatasetError(f"{mpath}: 'files' must list pieces and sequences; rerun `datapipe decompose`")
    for name, meta in files.items():
        check_file_entry(meta, mpath, f"files.{name}")
    mat = m.get("materialized")
    if mat is not None:
        if not isinstance(mat, dict) or not isinstance(mat.get("buckets"), dict):
            raise DatasetError(f"{mpath}: 'materialized' is malformed; rerun `datapipe decompose --materialize`")
        for k, meta in mat["buckets"].items():
            check_file_entry(meta, mpath, f"materialized.buckets.{k}")
    for key in ("params", "buckets", "counts", "dataset"):
        if not isinstance(m.get(key), dict):
            raise DatasetError(f"{mpath}: no {key!r} object; rerun `datapipe decompose`")
    return m


def decomposition_files(path: Path, m: dict) -> list[tuple[Path, dict]]:
    """``(path, manifest entry)`` of every file of the decomposition at ``path``, materialized buckets included."""
    out = [(path / meta["file"], meta) for meta in m["files"].values()]
    for meta in ((m.get("materialized") or {}).get("buckets") or {}).values():
        out.append((path / "buckets" / meta["file"], meta))
    return out


def verify_decomposition(dataset_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Check every file of a dataset's decomposition: its manifest (digest, shape) and each file's size and
    checksum, materialized buckets included.

    Returns:
        ``[(file, problem), ...]``, empty when everything matches (or there is no decomposition).
    """
    path = Path(dataset_dir) / DECOMPOSITION_DIR
    if not path.exists():
        return []
    mpath = path / "manifest.json"
    if not mpath.exists():
        return [(str(mpath), "missing: the decomposition is unfinished; rerun `datapipe decompose`")]
    try:
        m = read_decomposition_manifest(path)
    except DatasetError as e:
        return [(str(mpath), str(e))]
    problems = []
    for p, meta in decomposition_files(path, m):
        try:
            if not p.exists() or p.stat().st_size != meta["bytes"]:
                raise DatasetError(f"{p}: missing or truncated ({meta['bytes']} bytes expected); rerun "
                                   "`datapipe decompose`")
            verify_checksum(p, meta["checksum"])
        except DatasetError as e:
            problems.append((str(p), str(e)))
    return problems


class DecomposedIndex:
    """The stored decomposition of a dataset: memory-mapped int64 arrays, one entry per piece or sequence.

    Attributes:
        row, start, length, sequence: int64 ``[P]`` per piece (sorted by ``sequence``): its document, first
            token in the document, tokens (``2^k`` for bucket pieces), and the training sequence it belongs to.
        sequence_log2: int64 ``[S]`` the ``k`` of each sequence (a sequence has ``2^k`` token slots).
        sequence_tokens: int64 ``[S]`` real tokens of each sequence (``< 2^k`` only for padded remainders).
        sequence_offsets: int64 ``[S+1]``: pieces of sequence ``s`` are ``sequence_offsets[s]:[s+1]``.
        min_log2, max_log2, remainder, seed: the build parameters; ``params`` holds them as a dict.
        bucket_sequences, bucket_tokens: ``{k: count}`` per bucket; ``counts``: documents, tokens, kept/dropped
            tokens, dropped documents, EOS kept, padded tokens.
        dataset_path, path: the dataset directory and the decomposition directory.
    """

    def __init__(self, dataset_dir: str | os.PathLike | ArrowDataset, *, verify: bool = True, filesystem=None,
                 cache_dir: str | os.PathLike | None = None, cache_limit: float | None = None) -> None:
        from datapipe import remote

        if isinstance(dataset_dir, ArrowDataset) and not isinstance(dataset_dir, remote.RemoteArrowDataset):
            dataset_dir = dataset_dir.path
        if isinstance(dataset_dir, remote.RemoteArrowDataset) or remote.is_remote(dataset_dir, filesystem):
            ds = dataset_dir if isinstance(dataset_dir, remote.RemoteArrowDataset) else ArrowDataset.open(
                dataset_dir, filesystem=filesystem, cache_dir=cache_dir, cache_limit=cache_limit)
            self._init_remote(ds, verify)
            return
        dataset_dir = remote.local_path(dataset_dir)
        self.dataset_path = Path(dataset_dir)
        self.path = self.dataset_path / DECOMPOSITION_DIR
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{self.path}: no decomposition here; run `datapipe decompose "
                                    f"{self.dataset_path}` first")
        m = read_decomposition_manifest(self.path)
        self.manifest = m
        ds_manifest = self.dataset_path / "manifest.json"
        doc_lengths = None
        if ds_manifest.exists():
            ds = ArrowDataset.open(self.dataset_path)
            if dataset_fingerprint(ds) != m["dataset"]:
                raise DatasetError(f"{mpath}: built for another version of the dataset ({m['dataset']} vs "
                                   f"{dataset_fingerprint(ds)}); rerun `datapipe decompose {self.dataset_path}`")
            doc_lengths = ds.index.get("length")
        for p, meta in decomposition_files(self.path, m):
            if not p.exists() or p.stat().st_size != meta["bytes"]:
                raise DatasetError(f"{p}: missing or truncated ({meta['bytes']} bytes expected); rerun "
                                   "`datapipe decompose`")
        for meta in m["files"].values():
            if verify:
                verify_checksum(self.path / meta["file"], meta["checksum"])
        pp = self.path / m["files"]["pieces"]["file"]
        sp = self.path / m["files"]["sequences"]["file"]
        self._set_arrays(m, _read_table(pp), pp, _read_table(sp), sp, doc_lengths)

    def _init_remote(self, ds, verify: bool) -> None:
        """The decomposition of a dataset on object storage: its manifest read from the store, the piece and
        sequence tables downloaded through the dataset's cache (checked on arrival; a copy cached earlier is
        checked too with ``verify``) and memory-mapped from there, pinned while this index lives."""
        import weakref

        from datapipe.remote import join_key, read_object

        self.dataset = ds
        self.dataset_path = ds.url
        self.path = f"{ds.url.rstrip('/')}/{DECOMPOSITION_DIR}"
        mpath = f"{self.path}/manifest.json"
        try:
            data = read_object(ds.filesystem, join_key(ds._root, f"{DECOMPOSITION_DIR}/manifest.json"), mpath,
                               ds.timeout)
        except DatasetError as e:
            if "not found in the store" in str(e):
                raise FileNotFoundError(f"{self.path}: no decomposition here; run `datapipe.decompose("
                                        f"{ds.url!r}, filesystem=...)` first") from None
            raise
        m = read_decomposition_manifest(self.path, parse_json(data, mpath))
        if dataset_fingerprint(ds) != m["dataset"]:
            raise DatasetError(f"{mpath}: built for another version of the dataset ({m['dataset']} vs "
                               f"{dataset_fingerprint(ds)}); rerun decompose on {ds.url}")
        pins: list[int] = []
        weakref.finalize(self, _release_pins, ds.cache, pins)
        tables = []
        for key in ("pieces", "sequences"):
            meta = m["files"][key]
            buf, pin = ds.fetch_file(f"{DECOMPOSITION_DIR}/{meta['file']}", meta, check=verify)
            if pin is not None:
                pins.append(pin)
            what = f"{self.path}/{meta['file']}"
            try:
                t = pa.ipc.open_file(buf).read_all()
                t.validate(full=True)
            except (pa.ArrowException, OSError) as e:
                raise DatasetError(f"{what}: cannot open ({e}); rerun decompose") from None
            tables += [t, what]
        self._set_arrays(m, *tables, ds.index.get("length"))
        # materialized buckets are not read from a store: DecomposedDataset gathers the same tokens from the
        # dataset's shards (through the cache); the manifest entry stays readable in ``manifest``
        self.materialized = None

    def _set_arrays(self, m: dict, pieces: pa.Table, pp, seqs: pa.Table, sp, doc_lengths) -> None:
        self.manifest = m
        for k in PIECE_COLUMNS:
            setattr(self, k, _column(pieces, k, pp))
        self.sequence_log2 = _column(seqs, "log2", sp)
        self.sequence_tokens = _column(seqs, "tokens", sp)
        self.sequence_offsets = np.append(_column(seqs, "first_piece", sp), np.int64(len(self.row)))
        self.params = dict(m["params"])
        self.min_log2 = int(self.params["min_log2"])
        self.max_log2 = int(self.params["max_log2"])
        self.remainder = self.params["remainder"]
        self.seed = int(self.params["seed"])
        self.bucket_sequences = {int(k): v["sequences"] for k, v in m["buckets"].items()}
        self.bucket_tokens = {int(k): v["tokens"] for k, v in m["buckets"].items()}
        self.counts = dict(m["counts"])
        self.materialized = m.get("materialized")
        self._check_ranges(pp, sp, doc_lengths)

    def _check_ranges(self, pp: Path, sp: Path, doc_lengths) -> None:
        """Every piece lies inside its document and every sequence's pieces inside the piece table, so readers
        that index with these arrays cannot go out of bounds (checked on every open, checksums or not)."""
        cols = [self.row, self.start, self.length, self.sequence]
        if len({len(c) for c in cols}) != 1 or any(c.dtype.kind != "i" for c in cols):
            raise DatasetError(f"{pp}: piece columns differ in length or type; rerun `datapipe decompose`")
        if len(self.sequence_log2) != len(self.sequence_tokens) or any(
                c.dtype.kind != "i" for c in (self.sequence_log2, self.sequence_tokens, self.sequence_offsets)):
            raise DatasetError(f"{sp}: sequence columns differ in length or type; rerun `datapipe decompose`")
        so = self.sequence_offsets
        bad_seq = (np.flatnonzero(np.diff(so) < 0) if len(so) > 1 else np.zeros(0, np.int64))
        if len(so) and (so[0] != 0 or len(bad_seq)):
            raise DatasetError(f"{sp}: column 'first_piece' is not a non-decreasing list of piece positions from 0 "
                               f"(row {int(bad_seq[0]) if len(bad_seq) else 0}); rerun `datapipe decompose`")
        lo, hi = self.min_log2, self.max_log2
        bad = np.flatnonzero((self.sequence_log2 < lo) | (self.sequence_log2 > hi) | (self.sequence_tokens < 0)
                             | (self.sequence_tokens > (np.int64(1) << np.clip(self.sequence_log2, 0, 62))))
        if len(bad):
            raise DatasetError(f"{sp}: row {int(bad[0])}: log2/tokens out of range; rerun `datapipe decompose`")
        bad = (self.start < 0) | (self.length < 0) | (self.row < 0)
        if doc_lengths is not None:
            n = len(doc_lengths)
            ok_row = (self.row >= 0) & (self.row < n)
            bad |= ~ok_row
            doc_len = np.asarray(doc_lengths, np.int64)[np.where(ok_row, self.row, 0)]
            bad |= ok_row & (self.start + self.length > doc_len)
        rows = np.flatnonzero(bad)
        if len(rows):
            raise DatasetError(f"{pp}: row {int(rows[0])}: piece (row {int(self.row[rows[0]])}, start "
                               f"{int(self.start[rows[0]])}, length {int(self.length[rows[0]])}) lies outside its "
                               "document; rerun `datapipe decompose`")

    def open_bucket(self, k: int) -> pa.Table:
        """The materialized bucket ``k`` (``buckets/kNN.arrow``), memory-mapped and checked: size, checksum on the
        first touch in this process (as ``ArrowDataset`` shards), Arrow structure.

        Raises:
            DatasetError: no materialized bucket ``k``, or the file is truncated, changed or malformed.
        """
        meta = ((self.materialized or {}).get("buckets") or {}).get(str(int(k)))
        if meta is None:
            raise DatasetError(f"{self.path}/buckets: bucket {k} is not materialized; rerun `datapipe decompose "
                               "--materialize`")
        p = self.path / "buckets" / meta["file"]
        buf = map_checked(p, meta, what="materialized bucket", fix="rerun `datapipe decompose --materialize`")
        try:
            t = pa.ipc.open_file(buf).read_all()
            t.validate(full=True)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{p}: cannot read ({e}); rerun `datapipe decompose --materialize`") from None
        if t.num_rows != meta["rows"]:
            raise DatasetError(f"{p}: {t.num_rows} rows but the manifest says {meta['rows']}")
        return t

    @classmethod
    def open(cls, dataset_dir: str | os.PathLike | ArrowDataset, *, verify: bool = True, filesystem=None,
             cache_dir: str | os.PathLike | None = None, cache_limit: float | None = None) -> DecomposedIndex:
        """Open the decomposition stored in ``dataset_dir``.

        Args:
            dataset_dir: a dataset directory, an ``ArrowDataset``, or a dataset on object storage (a URL such as
                ``s3://bkt/ds``, a path inside ``filesystem``, or an opened ``RemoteArrowDataset``, whose cache
                then holds the downloads).
            verify: check the checksums of the piece and sequence tables (default; they are small next to the
                dataset). Ranges are checked either way; :func:`verify_decomposition` also checks materialized
                buckets. Remote tables are always checked on arrival; ``verify`` also checks a copy another
                reader cached earlier.
            filesystem, cache_dir, cache_limit: as in ``ArrowDataset.open`` for a dataset on object storage. A
                remote index keeps its two tables pinned in the cache while it lives, and reads no materialized
                buckets (``materialized`` is ``None``: sequences are gathered from the shards).
        """
        return cls(dataset_dir, verify=verify, filesystem=filesystem, cache_dir=cache_dir, cache_limit=cache_limit)

    @staticmethod
    def exists(dataset_dir: str | os.PathLike) -> bool:
        return (Path(dataset_dir) / DECOMPOSITION_DIR / "manifest.json").exists()

    @property
    def num_sequences(self) -> int:
        return int(len(self.sequence_log2))

    @property
    def num_pieces(self) -> int:
        return int(len(self.row))

    def __len__(self) -> int:
        return self.num_sequences

    def pieces_of(self, sequence: int) -> slice:
        """The piece positions of one sequence."""
        return slice(int(self.sequence_offsets[sequence]), int(self.sequence_offsets[sequence + 1]))

    def histogram_lines(self) -> list[str]:
        """Human-readable bucket histogram (what ``datapipe inspect`` prints)."""
        c = self.counts
        tok = max(c["tokens"], 1)
        docs = max(c["documents"], 1)
        lines = [f"decomposition  2^{self.min_log2}..2^{self.max_log2}, remainder={self.remainder}, seed={self.seed}: "
                 f"{self.num_sequences:,} sequences from {self.num_pieces:,} pieces",
                 f"  tokens kept {c['kept_tokens']:,} / {c['tokens']:,} ({100 * c['kept_tokens'] / tok:.2f} %), "
                 f"EOS kept {c['eos_kept']:,} / {c['documents']:,} ({100 * c['eos_kept'] / docs:.2f} %), "
                 f"padding {c['padded_tokens']:,}"]
        top = max(self.bucket_tokens.values(), default=0) or 1
        for k in sorted(self.bucket_tokens):
            t = self.bucket_tokens[k]
            bar = "#" * int(round(30 * t / top))
            lines.append(f"  D_{k:<2d} {1 << k:>6,} tok  {self.bucket_sequences[k]:>12,} seq  {t:>15,} tok "
                         f"{100 * t / tok:5.1f} %  {bar}")
        return lines

    def __repr__(self) -> str:
        return (f"DecomposedIndex({str(self.dataset_path)!r}, sequences={self.num_sequences}, "
                f"pieces={self.num_pieces}, params={self.params})")


def _release_pins(cache, pins: list[int]) -> None:
    for fd in pins:
        try:
            cache.release(fd)
        except OSError:  # closed already (a forked child closes the cache's descriptors)
            pass
    pins.clear()

