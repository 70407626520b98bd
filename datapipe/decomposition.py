"""Build and store the dataset-decomposition index of a dataset directory (``datapipe.decompose``).

Implements the data side of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (Pouransari et al., NeurIPS 2024): every document is cut into pieces of ``2^k`` tokens (bucket
``D_k``), and the tails are packed, padded or dropped (``native.decompose``). The index is stored beside the
dataset, zero-copy (no token is rewritten)::

    <dataset_dir>/decomposition/
        manifest.json     parameters, per-bucket counts, token/EOS counts, checksums; written last
        pieces.arrow      int64 row, start, length, sequence    (one entry per piece, sorted by sequence)
        sequences.arrow   int64 log2, tokens, first_piece       (one entry per training sequence)
        buckets/k08.arrow ...  with --materialize: fixed_size_list<int32>[2^k] token rows, one file per bucket

The local engine streams (:mod:`datapipe.decomposition_stream`): the lengths are read and the tables written one
block of rows at a time, so a corpus of 1e9 documents needs the memory of one block, not of the corpus. The
directory is built under a temporary name, with the dataset's ``.decomposition.lock`` held (a second concurrent
``decompose`` of the same dataset gets a ``DatasetError``), and swapped in whole (an atomic exchange over an
existing index), so readers never see half an index. Reading lives in :mod:`datapipe.decomposition_index`
(:class:`DecomposedIndex`, :func:`verify_decomposition`), the histogram and plot in
:mod:`datapipe.decomposition_plot`; both are re-exported here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from datapipe.dataset import ArrowDataset
from datapipe.decomposition_index import (DECOMPOSITION_DIR, FORMAT_NAME, FORMAT_VERSION, PIECE_COLUMNS,
                                          DecomposedIndex, dataset_fingerprint, verify_decomposition)
from datapipe.decomposition_plot import bucket_histogram_lines, plot_buckets
from datapipe.decomposition_stream import BLOCK_ROWS, plan_stream, stored_arrays, write_stream
from datapipe.format import (DatasetError, exclusive_output, fsync_path, new_hash, publish_dir, temp_name,
                             write_manifest)
from native.decompose import REMAINDER_POLICIES, bucket_totals, check_doc_lengths, check_log2

__all__ = ["DECOMPOSITION_DIR", "DecomposedIndex", "bucket_histogram_lines", "decompose", "plot_buckets",
           "verify_decomposition"]

ENGINES = ("local", "ray")
_COUNT_KEYS = ("documents", "tokens", "kept_tokens", "dropped_tokens", "dropped_documents", "eos_kept",
               "padded_tokens")


class _HashingSink:
    """A binary file that hashes what it writes (the manifest checksum without reading the file back)."""

    def __init__(self, f) -> None:
        self._f = f
        self.algo, self._h = new_hash()
        self.closed = False

    def write(self, data) -> int:
        self._h.update(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self.closed = True

    def checksum(self) -> str:
        return f"{self.algo}:{self._h.hexdigest()}"


def _write_table(path: Path, columns: dict[str, NDArray]) -> dict:
    # pa.array over a contiguous int64 numpy array is zero-copy: the only copy is the write itself
    table = pa.table({k: pa.array(np.ascontiguousarray(v)) for k, v in columns.items()})
    with open(path, "wb", buffering=0) as f:
        hs = _HashingSink(f)
        with pa.PythonFile(hs, mode="w") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table, max_chunksize=max(1, table.num_rows))
        size = f.tell()
        os.fsync(f.fileno())
    return {"file": path.name, "rows": table.num_rows, "bytes": size, "checksum": hs.checksum()}


def _length_column(ds: ArrowDataset) -> tuple[NDArray, str]:
    """The dataset's ``length`` index column (memory-mapped, not checked yet) and the index file's name."""
    idx_file = f"{ds.path}/{(ds.manifest.get('index') or {}).get('file', 'index.arrow')}"
    lengths = ds.index.get("length")
    if lengths is None:
        raise DatasetError(f"{idx_file}: no 'length' column; write the dataset with token ids in 'input_ids' so "
                           "datapipe derives it")
    return lengths, idx_file


def decompose(dataset_dir: str | os.PathLike, *, min_log2: int = 8, max_log2: int = 13, remainder: str = "pack",
              seed: int = 0, engine: str = "local", materialize: bool = False, ray_address: str | None = None,
              num_blocks: int | None = None, block_rows: int = BLOCK_ROWS,
              progress: Callable[[str, float], None] | None = None, filesystem=None,
              cache_dir: str | os.PathLike | None = None) -> DecomposedIndex:
    """Decompose a dataset into power-of-two buckets and store the index beside it.

    Args:
        dataset_dir: a dataset directory (``datapipe.write_dataset``) whose index has a ``length`` column
            (tokens per document, EOS included).
        min_log2, max_log2: bucket sizes ``2^min_log2 .. 2^max_log2`` tokens.
        remainder: ``"pack"`` (tails packed padding-free into ``2^min_log2`` sequences), ``"pad"`` or ``"drop"``.
        seed: seed of the size draws for long documents.
        engine: ``"local"`` (one process, streaming: the lengths are read and the tables written one block of
            rows at a time) or ``"ray"`` (the same kernels over Ray Data blocks; byte-identical files).
        materialize: also write per-bucket token files (``buckets/kNN.arrow``) so a sequence is one
            contiguous ``2^k`` slice.
        ray_address: Ray cluster address for ``engine="ray"`` (default: a local cluster).
        num_blocks: Ray blocks (default: one per CPU of the cluster).
        block_rows: rows per block of the local engine: its memory is about one block's lengths, layout and
            outputs (~200 bytes per row, ~200 MiB at the default 2^20); the files do not depend on it.
        progress: called as ``progress(stage, fraction)`` while building.
        filesystem, cache_dir: for a dataset on object storage (``dataset_dir`` a URL such as ``s3://bkt/ds``, or a
            path inside ``filesystem``): the index (and the dataset's ``index.arrow``, and with ``materialize`` its
            shards, through ``cache_dir``) is read from the store, built in a local temporary directory and
            uploaded to ``<url>/decomposition`` (manifest last, after the previous manifest was removed; see
            ``datapipe.remote.upload_dataset``). No lock guards two concurrent builds into one store.

    Returns:
        the opened :class:`DecomposedIndex`.

    Raises:
        ValueError: bad parameters (``min_log2 > max_log2``, unknown ``remainder`` or ``engine``, ``block_rows``).
        DatasetError: no dataset, no ``length`` column, or a document of length 0 (names the file and row).
    """
    min_log2, max_log2 = check_log2(min_log2, max_log2)
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (got {engine=})")
    if not isinstance(block_rows, (int, np.integer)) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be an integer >= 1 (got {block_rows=})")
    report = progress or (lambda stage, frac: None)
    ds = ArrowDataset.open(dataset_dir, filesystem=filesystem, cache_dir=cache_dir)
    lengths, idx_file = _length_column(ds)
    if len(lengths) == 0:
        raise DatasetError(f"{ds.path}: the dataset has no rows")
    params = {"min_log2": min_log2, "max_log2": max_log2, "remainder": remainder, "seed": int(seed)}
    report("decompose", 0.0)
    try:
        if engine == "local":  # pass 1 (checks every length) before anything is written
            plan = plan_stream(lengths, min_log2=min_log2, max_log2=max_log2, remainder=remainder, seed=seed,
                               block_rows=block_rows, name="length")
        else:
            lengths = check_doc_lengths(lengths, name="length")
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{idx_file}: column 'length': {e}") from None
    if engine == "local":
        def write_tables(tmp: Path) -> tuple[dict, dict | None]:
            return write_stream(lengths, tmp, plan, progress=report), None
    else:
        from datapipe.engines_ray import decompose_lengths_ray

        arrays = decompose_lengths_ray(lengths, min_log2=min_log2, max_log2=max_log2, remainder=remainder,
                                       seed=seed, ray_address=ray_address, num_blocks=num_blocks)
        report("decompose", 1.0)

        def write_tables(tmp: Path) -> tuple[dict, dict | None]:
            return _write_arrays(tmp, arrays, params), arrays
    from datapipe.remote import RemoteArrowDataset, upload_dataset

    if isinstance(ds, RemoteArrowDataset):  # build locally, upload, manifest last
        import tempfile

        with tempfile.TemporaryDirectory(prefix="datapipe-upload-") as tmp:
            out = Path(tmp) / DECOMPOSITION_DIR
            _build_locked(ds, out, write_tables, params, materialize, report)
            upload_dataset(out, f"{ds.url.rstrip('/')}/{DECOMPOSITION_DIR}", ds.filesystem, overwrite=True,
                           timeout=ds.timeout)
        return DecomposedIndex.open(ds, verify=False)  # the downloads are checked on arrival
    out = ds.path / DECOMPOSITION_DIR
    with exclusive_output(out, what="decomposition"):  # also removes what killed builds left
        _build_locked(ds, out, write_tables, params, materialize, report)
    return DecomposedIndex.open(ds.path, verify=False)  # checksummed while this process wrote them


def write_index(ds: ArrowDataset, arrays: dict, params: dict, *, materialize: bool = False,
                progress: Callable[[str, float], None] | None = None) -> Path:
    """Write the decomposition of ``ds`` from the in-memory dict of ``native.decompose.decompose_lengths``
    atomically (the same files as the streaming ``decompose``); returns the decomposition directory."""
    out = ds.path / DECOMPOSITION_DIR
    with exclusive_output(out, what="decomposition"):  # also removes what killed builds left
        _build_locked(ds, out, lambda tmp: (_write_arrays(tmp, arrays, params), arrays), params, materialize,
                      progress)
    return out


def _write_arrays(tmp: Path, arrays: dict, params: dict) -> dict:
    """The two tables of an in-memory decomposition, and what the manifest says of them."""
    files = {
        "pieces": _write_table(tmp / "pieces.arrow", {k: arrays[k] for k in PIECE_COLUMNS}),
        "sequences": _write_table(tmp / "sequences.arrow", {
            "log2": arrays["sequence_log2"], "tokens": arrays["sequence_tokens"],
            "first_piece": arrays["sequence_offsets"][:-1]}),
    }
    log2, tokens = arrays["sequence_log2"], arrays["sequence_tokens"]
    seq_counts, tok_counts = bucket_totals(log2, tokens, params["max_log2"])
    return {"files": files, "num_pieces": int(len(arrays["row"])), "num_sequences": int(len(log2)),
            "buckets": {str(k): {"sequences": int(seq_counts[k]), "tokens": int(tok_counts[k])}
                        for k in range(params["min_log2"], params["max_log2"] + 1)},
            "counts": {k: int(arrays[k]) for k in _COUNT_KEYS}}


def _build_locked(ds, out: Path, write_tables: Callable[[Path], tuple[dict, dict | None]], params: dict,
                  materialize: bool, progress) -> None:
    """Build the decomposition directory ``out`` under a temporary name and publish it (the lock is held)."""
    tmp = temp_name(out)
    tmp.mkdir()
    try:
        summary, arrays = write_tables(tmp)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "params": params,
            "dataset": dataset_fingerprint(ds),
            "num_pieces": summary["num_pieces"], "num_sequences": summary["num_sequences"],
            "buckets": summary["buckets"], "counts": {k: int(summary["counts"][k]) for k in _COUNT_KEYS},
            "files": summary["files"], "materialized": None,
        }
        if materialize:
            from datapipe.decomposed_buckets import materialize_buckets

            arrays = stored_arrays(tmp) if arrays is None else arrays  # the streamed tables, memory-mapped
            manifest["materialized"] = materialize_buckets(ds, arrays, params, tmp / "buckets", progress=progress)
            for meta in manifest["materialized"]["buckets"].values():
                fsync_path(tmp / "buckets" / meta["file"])
        write_manifest(tmp / "manifest.json", manifest)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
