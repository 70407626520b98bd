"""Tokenizing ingest: text (plain files, Parquet, JSONL, Hugging Face datasets, tables) -> a dataset directory
with ``input_ids`` (list<int32>, EOS appended per document) and ``length`` in the index.

Lossless by construction: a ``tokenizer.json``'s truncation and padding are disabled, the byte tokenizer stores a
file's bytes as they are, binary files are refused by name (or skipped and counted), and pre-tokenized ids that
are null, negative or too large are refused naming the file, the row within that file (from 0) and the column.

Work is split into tasks (:mod:`datapipe.ingest_sources`: a group of text files, one table file, a row range of a
Hugging Face dataset, one batch of an in-memory source) that tokenize independently; the results are written in
task order, so ``num_proc`` and ``engine="ray"`` give byte-identical shards to the single-process run.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datapipe.format import DatasetError
from datapipe.ingest_sources import (BINARY_MAGIC, HF_ROWS_PER_TASK, binary_reason, expand_sources, plan_tasks,
                                     portable_task, read_json_lines)
from datapipe.tokenize import ByteTokenizer, load_tokenizer
from datapipe.writer import DEFAULT_SHARD_ROWS, TOKEN_COLUMN, write_dataset

__all__ = ["BINARY_MAGIC", "ENGINES", "binary_reason", "expand_sources", "ingest"]

ENGINES = ("local", "ray")
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------
# tasks: each one tokenizes independently (in this process, a worker process or a Ray task)
@dataclass(frozen=True)
class _Config:
    tokenizer: object | None
    text_column: str
    tokens_column: str | None
    keep_text: bool
    vocab_size: int | None  # for checking given ids
    auto_tokens: bool  # a source without the text column but with input_ids is taken as pre-tokenized


@dataclass
class _Result:
    batches: list = field(default_factory=list)  # (source name, row within that source, RecordBatch)
    not_utf8: list = field(default_factory=list)  # paths decoded with U+FFFD replacements (non-byte tokenizers)
    files_done: int = 0
    pretokenized: bool = False  # ids taken from a column, not made by the tokenizer


def _row_of(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask, dtype=bool))[0])


def _refuse_nulls(name: str, row0: int, column: str, arr: pa.Array, what: str) -> None:
    """Raise naming the first null row of ``arr`` (``what`` says what it is and the fix)."""
    if arr.null_count:
        bad = _row_of(arr.is_null().to_numpy(zero_copy_only=False))
        raise DatasetError(f"{name}: row {row0 + bad}, column {column!r}: {what}")


def _check_ids(name: str, row0: int, column: str, arr: pa.Array, vocab_size: int | None) -> pa.Array:
    """``arr`` as list<int32> after refusing nulls, non-integers, negatives and ids >= vocab size / > int32."""
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise DatasetError(f"{name}: column {column!r} holds {t}, not lists of token ids; pass the column of id "
                           "lists as tokens_column= (or a text column as text_column=)")
    if not (pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type)):
        raise DatasetError(f"{name}: column {column!r} holds lists of {t.value_type}, not integer token ids; cast "
                           "the ids to integers before ingest")
    _refuse_nulls(name, row0, column, arr, "null token list; drop the row or give it an empty list")
    values = pc.list_flatten(arr)
    parents = None
    if values.null_count:
        parents = pc.list_parent_indices(arr).to_numpy()
        bad = int(parents[np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]])
        raise DatasetError(f"{name}: row {row0 + bad}, column {column!r}: null token id; drop or fix the row")
    v = values.to_numpy(zero_copy_only=False)
    limit = _INT32_MAX if vocab_size is None else min(_INT32_MAX, int(vocab_size) - 1)
    if len(v):
        lo, hi = v.min(), v.max()
        if lo < 0 or hi > limit:
            parents = pc.list_parent_indices(arr).to_numpy()
            j = int(np.flatnonzero((v < 0) | (v > limit))[0])
            what = ("negative" if v[j] < 0 else
                    f">= the vocabulary size {vocab_size}" if vocab_size is not None and v[j] <= _INT32_MAX else
                    "above the int32 maximum")
            raise DatasetError(f"{name}: row {row0 + int(parents[j])}, column {column!r}: token id {int(v[j])} is "
                               f"{what}; fix the ids (or pass the tokenizer they were made with)")
    return arr.cast(pa.list_(pa.int32()))


def _tokenize_column(name: str, row0: int, column: str, text: pa.Array, tok) -> pa.Array:
    t = text.type
    is_binary = pa.types.is_binary(t) or pa.types.is_large_binary(t)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or is_binary):
        raise DatasetError(f"{name}: column {column!r} holds {t}, not text; pass the text column as text_column= "
                           "(or ids as tokens_column=)")
    _refuse_nulls(name, row0, column, text,
                  f"null text ({text.null_count} null rows in this batch); drop those rows or fill them")
    docs = text.to_pylist()
    if is_binary and not isinstance(tok, ByteTokenizer):
        docs = [d.decode("utf-8", errors="replace") for d in docs]
    return _ragged_to_arrow(tok.encode_batch(docs))


def _ragged_to_arrow(r) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.asarray(r.offsets, dtype=np.int32)),
                                    pa.array(np.asarray(r.values, dtype=np.int32)))


def _tokens_column(cfg: _Config, names: Sequence[str]) -> str | None:
    if cfg.tokens_column:
        return cfg.tokens_column
    if cfg.auto_tokens and cfg.text_column not in names and TOKEN_COLUMN in names:
        return TOKEN_COLUMN  # e.g. a tokenized Hugging Face dataset: its ids as they are (checked, no EOS added)
    return None


def _convert(cfg: _Config, name: str, row0: int, batch: pa.RecordBatch, res: _Result) -> pa.RecordBatch:
    cols = dict(zip(batch.schema.names, batch.columns))
    tokens_column = _tokens_column(cfg, batch.schema.names)
    if tokens_column:
        if tokens_column not in cols:
            raise DatasetError(f"{name}: no column {tokens_column!r} (columns: {batch.schema.names}); pass the "
                               "column of token ids as tokens_column=")
        ids = _check_ids(name, row0, tokens_column, cols.pop(tokens_column), cfg.vocab_size)
        res.pretokenized = True
    else:
        if cfg.text_column not in cols:
            raise DatasetError(f"{name}: no text column {cfg.text_column!r} (columns: {batch.schema.names}); "
                               "pass the text column as text_column= (or ids as tokens_column=)")
        text = cols[cfg.text_column] if cfg.keep_text else cols.pop(cfg.text_column)
        ids = _tokenize_column(name, row0, cfg.text_column, text, cfg.tokenizer)
    if TOKEN_COLUMN in cols:
        raise DatasetError(f"{name}: already has a column {TOKEN_COLUMN!r} besides the one ingest writes; rename it, "
                           f"or pass tokens_column='{TOKEN_COLUMN}'")
    _check_length_column(name, row0, cols, ids)
    return pa.record_batch({TOKEN_COLUMN: ids, **cols})


def _check_length_column(name: str, row0: int, cols: dict, ids: pa.Array) -> None:
    """The index's ``length`` is the token count; a source column of that name must agree (the writer would take
    it for the count), so anything else is refused naming the file, row and column."""
    if "length" not in cols:
        return
    n = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    arr = cols["length"]
    given = arr.to_numpy(zero_copy_only=False)
    if not arr.null_count and given.dtype.kind in "iuf" and np.array_equal(given, n):
        return
    if arr.null_count or given.dtype.kind not in "iuf":
        bad = 0 if not arr.null_count else _row_of(arr.is_null().to_numpy(zero_copy_only=False))
    else:
        bad = int(np.flatnonzero(given != n)[0]) if not np.array_equal(given, n) else 0
    raise DatasetError(f"{name}: row {row0 + bad}, column 'length': {arr[bad].as_py()!r} is not the row's token count "
                       f"({int(n[bad])}, EOS included), which ingest stores as 'length'; rename or drop that column")


def _read_text_files(cfg: _Config, paths: Sequence[str]) -> _Result:
    if cfg.tokens_column:
        raise DatasetError(f"{paths[0]}: a plain text file has no column {cfg.tokens_column!r} of token ids; drop "
                           "tokens_column= to tokenize the files, or pass Parquet/JSONL tables")
    res = _Result(files_done=len(paths))
    keep, docs, texts = [], [], []
    byte_tok = isinstance(cfg.tokenizer, ByteTokenizer)
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise DatasetError(f"{p}: cannot read ({e.strerror or e})") from None
        text = None
        if not byte_tok or cfg.keep_text:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("utf-8", errors="replace")
                if not byte_tok:
                    res.not_utf8.append(p)
        keep.append(p)
        docs.append(data if byte_tok else text)
        if cfg.keep_text:
            texts.append(text)
    if keep:
        cols = {TOKEN_COLUMN: _ragged_to_arrow(cfg.tokenizer.encode_batch(docs)), "path": pa.array(keep, pa.string())}
        if cfg.keep_text:
            cols["text"] = pa.array(texts, pa.string())
        # one row per file, so a file is row 0 of itself; the batch is named by its first file
        res.batches.append((keep[0], 0, pa.record_batch(cols)))
    return res


def _read_table_file(cfg: _Config, path: str) -> _Result:
    import pyarrow.parquet as pq

    res = _Result(files_done=1)
    row = 0
    try:
        if path.lower().endswith(".parquet"):
            batches: Iterable[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(batch_size=65_536)
        else:
            batches = read_json_lines(path).to_batches()
        for b in batches:
            if b.num_rows:
                res.batches.append((path, row, _convert(cfg, path, row, b, res)))
            row += b.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    return res


def _read_hf_range(cfg: _Config, ds, name: str, start: int, stop: int, last: bool) -> _Result:
    res = _Result(files_done=int(last))
    part = ds.select(range(start, stop)) if (start, stop) != (0, len(ds)) else ds
    row = start
    for t in part.with_format("arrow").iter(batch_size=HF_ROWS_PER_TASK):
        for b in t.to_batches():
            if b.num_rows:
                res.batches.append((name, row, _convert(cfg, name, row, b, res)))
            row += b.num_rows
    return res


def _run_task(task: tuple, cfg: _Config) -> _Result:
    """Tokenize one task: ``("text", paths)``, ``("table", path)``, ``("hf", dataset, name, start, stop, last)`` or
    ``("batch", name, row0, RecordBatch, files_done)``."""
    kind, *args = task
    if kind == "text":
        return _read_text_files(cfg, args[0])
    if kind == "table":
        return _read_table_file(cfg, args[0])
    if kind == "hf":
        return _read_hf_range(cfg, *args)
    name, row0, batch, done = args
    res = _Result(files_done=done)
    res.batches.append((name, row0, _convert(cfg, name, row0, batch, res)))
    return res


# ---------------------------------------------------------------------------------------------------------------
# executors: each yields results in task order
_WORKER_CFG: _Config | None = None


def _init_worker(cfg: _Config) -> None:
    global _WORKER_CFG
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _WORKER_CFG = cfg


def _run_in_worker(task: tuple) -> _Result:
    return _run_task(task, _WORKER_CFG)


def _run_local(tasks: Iterator[tuple], cfg: _Config, num_proc: int) -> Iterator[_Result]:
    if num_proc == 1:
        for t in tasks:
            yield _run_task(t, cfg)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork where there is one: spawn would re-run an unguarded user script (no `if __name__ == "__main__"`);
    # Arrow re-initialises its thread pools after a fork, and the parent has not used the tokenizer's threads
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    import datapipe.dataset  # noqa: F401  (the tokenizers' Ragged; imported once here, not in every worker)
    with ProcessPoolExecutor(num_proc, mp_context=mp.get_context(method), initializer=_init_worker,
                             initargs=(cfg,)) as pool:
        window: deque = deque()
        try:
            for t in tasks:
                window.append(pool.submit(_run_in_worker, portable_task(t)))
                if len(window) >= 2 * num_proc:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


# ---------------------------------------------------------------------------------------------------------------
def ingest(sources, out_dir: str | os.PathLike, *, text_column: str = "text", tokens_column: str | None = None,
           tokenizer=None, keep_text: bool = False, shard_rows: int = DEFAULT_SHARD_ROWS,
           compression: str | None = None, overwrite: bool = False, skip_binary: bool = False,
           vocab_size: int | None = None, num_proc: int = 1, engine: str = "local", ray_address: str | None = None,
           progress: Callable[[int], None] | None = None,
           file_progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Tokenize (or take pre-tokenized ids from) ``sources`` and write a dataset directory.

    Every row is the document's ids plus EOS, nothing cut or padded: a ``tokenizer.json``'s own truncation and
    padding are disabled on load (``no_truncation()``, ``no_padding()``), so a row equals
    ``encode(text, add_special_tokens=False).ids + [eos]``; the byte tokenizer stores a file's raw bytes (a
    non-UTF-8 file is its bytes plus EOS).

    Args:
        sources: paths or glob patterns (an existing path is taken literally before glob expansion): plain text
            files become one document each, with a ``path`` column; Parquet/JSONL files are tables (a JSONL line
            longer than Arrow's block size is read by growing the block); a Hugging Face ``save_to_disk`` folder
            (``datasets.load_from_disk`` input) gives its rows (all splits in order for a DatasetDict). Also a
            ``datasets.Dataset``/``DatasetDict``, or anything ``write_dataset`` accepts (Table, reader, dicts).
        out_dir: dataset directory to create.
        text_column: the column holding text to tokenize.
        tokens_column: take ids from this column instead of tokenizing (renamed to ``input_ids``); nulls, negative
            ids, ids above int32 or ``>= vocab_size`` are refused. With the defaults (no ``tokenizer``,
            ``text_column="text"``), a table that has no ``text`` but an ``input_ids`` column (a tokenized Hugging
            Face dataset) is taken as pre-tokenized: its ids are stored as they are.
        tokenizer: ``"bytes"`` (None: the default when tokenizing), a path to a ``tokenizer.json``, a
            ``tokenizers.Tokenizer``, or an object with ``encode_batch`` and ``eos_id`` (picklable for
            ``num_proc > 1`` or Ray). With ``tokens_column``, only its vocabulary size is used (to check ids).
        keep_text: keep the text column beside ``input_ids`` (for plain text files, their UTF-8 decoding, with
            U+FFFD for invalid bytes; ``input_ids`` keeps the bytes).
        shard_rows, compression, overwrite: as in :func:`datapipe.write_dataset`.
        skip_binary: skip plain-text sources that look binary (NUL bytes in the first 8 KiB, or a magic number
            in :data:`BINARY_MAGIC`: gzip, zip, RIFF/WAV, PNG, ...) instead of raising; they are counted in the
            manifest's ``params["skipped_binary"]`` and reported with a ``UserWarning``.
        vocab_size: ids must be below this (default: the tokenizer's vocabulary size when one is given).
        num_proc: tokenize in this many worker processes (output identical to ``num_proc=1``).
        engine: ``"local"`` (this process or ``num_proc`` workers) or ``"ray"`` (the same tasks as Ray tasks, each
            reading its files on the worker, so on a multi-node cluster paths must be on a shared filesystem; the
            running Ray session, else ``ray.init(address=ray_address)``); identical output.
        ray_address: Ray cluster address for ``engine="ray"`` (default: a local cluster).
        progress: called with the number of rows written so far.
        file_progress: called with ``(sources done, total sources)`` (files or folders; total None when unknown).

    Returns:
        The dataset directory; its manifest records the tokenizer, EOS id and vocabulary size.

    Raises:
        FileNotFoundError: a path that does not exist and matches no file.
        DatasetError: a binary file (without ``skip_binary``), a missing or wrongly typed column, bad ids, mixed
            text and table sources; each names the file, the row within it (from 0) and the column.
        ValueError: bad parameters (``engine``, ``num_proc``).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (got {engine=})")
    if not isinstance(num_proc, (int, np.integer)) or isinstance(num_proc, bool) or num_proc < 1:
        raise ValueError(f"num_proc must be an integer >= 1 (got {num_proc=})")
    given_tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    tok = given_tok if (tokens_column or given_tok is not None) else load_tokenizer("bytes")
    # ids read from a column are checked against vocab_size, else the vocabulary of a tokenizer passed with them
    check_vocab = vocab_size if vocab_size is not None else getattr(given_tok, "vocab_size", None)
    cfg = _Config(tokenizer=None if tokens_column else tok, text_column=text_column, tokens_column=tokens_column,
                  keep_text=keep_text, vocab_size=check_vocab,
                  auto_tokens=tokens_column is None and tokenizer is None and text_column == "text")
    tasks, total, skipped = plan_tasks(sources, skip_binary)
    if engine == "ray":
        from datapipe.engines_ray import map_ordered_ray

        results = map_ordered_ray(_run_task, map(portable_task, tasks), cfg, ray_address=ray_address)
    else:
        results = _run_local(tasks, cfg, int(num_proc))
    not_utf8: list = []
    pretokenized = False

    def convert() -> Iterator[tuple[str, pa.RecordBatch]]:
        nonlocal pretokenized
        # (source name, batch) pairs: the writer counts rows per name, so its errors (schema mismatch across
        # files, absurd index values) name the file and the row within it
        done = 0
        for res in results:
            not_utf8.extend(res.not_utf8)
            pretokenized |= res.pretokenized
            for name, _, b in res.batches:
                yield name, b
            done += res.files_done
            if file_progress is not None:
                file_progress(done, total)

    stream = convert()
    try:
        try:
            first = next(stream)
        except StopIteration:
            more = f" ({len(skipped)} binary files skipped)" if skipped else ""
            raise DatasetError(f"the sources are empty: no documents to ingest{more}") from None
        if pretokenized:  # ids from a column: the tokenizer (if one was given) only set the vocabulary checked
            params = {"tokenizer": getattr(given_tok, "name", None), "eos_id": None, "vocab_size": check_vocab}
        else:
            params = {"tokenizer": getattr(tok, "name", type(tok).__name__), "eos_id": tok.eos_id,
                      "vocab_size": vocab_size if vocab_size is not None else getattr(tok, "vocab_size", None)}
        if skipped:
            params["skipped_binary"] = len(skipped)
            params["skipped_binary_files"] = [str(p) for p, _ in skipped[:100]]
        out = write_dataset(_chain(first, stream), out_dir, shard_rows=shard_rows, compression=compression,
                            overwrite=overwrite, params=params, progress=progress)
    finally:
        stream.close()
        if hasattr(results, "close"):
            results.close()
    if skipped:
        names = ", ".join(str(p) for p, _ in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"ingest skipped {len(skipped)} binary files: {names}", UserWarning, stacklevel=2)
    if not_utf8:
        names = ", ".join(str(p) for p in not_utf8[:5]) + (", ..." if len(not_utf8) > 5 else "")
        warnings.warn(f"ingest decoded {len(not_utf8)} files that are not valid UTF-8 with U+FFFD replacements "
                      f"before tokenizing: {names} (the byte tokenizer stores their bytes instead)", UserWarning,
                      stacklevel=2)
    return out


def _chain(first, rest):
    yield first
    yield from rest
