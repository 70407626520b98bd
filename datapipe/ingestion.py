"""Tokenizing ingest: text (plain files, Parquet, JSONL, tables) -> a dataset directory with ``input_ids``
(list<int32>, EOS appended per document) and ``length`` in the index."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from datapipe.format import DatasetError
from datapipe.tokenize import load_tokenizer
from datapipe.writer import DEFAULT_SHARD_ROWS, TOKEN_COLUMN, iter_source, write_dataset

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")
_FILES_PER_BATCH = 512


def _is_table_file(p: Path) -> bool:
    return "".join(p.suffixes[-2:]).lower().endswith(TABLE_SUFFIXES) or p.suffix.lower() in TABLE_SUFFIXES


def _text_file_batches(paths: Sequence[Path]) -> Iterator[tuple[str, pa.RecordBatch]]:
    for i in range(0, len(paths), _FILES_PER_BATCH):
        chunk = paths[i : i + _FILES_PER_BATCH]
        texts = []
        for p in chunk:
            try:
                texts.append(p.read_bytes().decode("utf-8", errors="replace"))
            except OSError as e:
                raise DatasetError(f"{p}: cannot read ({e})") from None
        yield "text files", pa.record_batch({"path": [str(p) for p in chunk], "text": texts})


def _sources(sources) -> Iterator[tuple[str, pa.RecordBatch]]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if isinstance(sources, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in sources):
        paths = [Path(s) for s in sources]
        for p in paths:
            if not p.is_file():
                raise DatasetError(f"{p}: no such file")
        tables = [p for p in paths if _is_table_file(p)]
        texts = [p for p in paths if not _is_table_file(p)]
        if tables and texts:
            raise DatasetError(f"mixing table files ({tables[0]}) and plain text files ({texts[0]}) in one ingest")
        yield from iter_source(tables) if tables else _text_file_batches(texts)
    else:
        yield from iter_source(sources)


def ingest(sources, out_dir: str | os.PathLike, *, text_column: str = "text", tokens_column: str | None = None,
           tokenizer="bytes", keep_text: bool = False, shard_rows: int = DEFAULT_SHARD_ROWS,
           compression: str | None = None, overwrite: bool = False,
           progress: Callable[[int], None] | None = None) -> Path:
    """Tokenize (or take pre-tokenized ids from) ``sources`` and write a dataset directory.

    Args:
        sources: paths (plain text files become one document each, with a ``path`` column; Parquet/JSONL
            files are tables), or anything ``write_dataset`` accepts.
        out_dir: dataset directory to create.
        text_column: the column holding text to tokenize.
        tokens_column: take ids from this column instead of tokenizing (renamed to ``input_ids``).
        tokenizer: ``"bytes"``, a path to a ``tokenizer.json``, or an object with ``encode_batch`` and ``eos_id``.
        keep_text: keep the text column beside ``input_ids``.
        shard_rows, compression, overwrite, progress: as in :func:`datapipe.write_dataset`.

    Returns:
        The dataset directory; its manifest records the tokenizer and EOS id.
    """
    tok = None if tokens_column else (tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer))

    def convert() -> Iterator[pa.RecordBatch]:
        for name, batch in _sources(sources):
            cols = dict(zip(batch.schema.names, batch.columns))
            if tokens_column:
                if tokens_column not in cols:
                    raise DatasetError(f"{name}: no column {tokens_column!r} (columns: {batch.schema.names})")
                ids = cols.pop(tokens_column).cast(pa.list_(pa.int32()))
            else:
                if text_column not in cols:
                    raise DatasetError(f"{name}: no text column {text_column!r} (columns: {batch.schema.names}); "
                                       "pass --text-column or --tokens-column")
                text = cols[text_column] if keep_text else cols.pop(text_column)
                if text.null_count:
                    raise DatasetError(f"{name}: column {text_column!r} has {text.null_count} null texts")
                r = tok.encode_batch(text.to_pylist())
                ids = pa.ListArray.from_arrays(pa.array(r.offsets.astype("int32")), pa.array(r.values))
            yield pa.record_batch({TOKEN_COLUMN: ids, **cols})

    stream = convert()
    try:
        first = next(stream)
    except StopIteration:
        raise DatasetError("the sources are empty: no documents to ingest") from None
    reader = pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], stream))
    params = {"tokenizer": getattr(tok, "name", type(tok).__name__) if tok else None,
              "eos_id": getattr(tok, "eos_id", None), "vocab_size": getattr(tok, "vocab_size", None)}
    return write_dataset(reader, out_dir, shard_rows=shard_rows, compression=compression, overwrite=overwrite,
                         params=params, progress=progress)
