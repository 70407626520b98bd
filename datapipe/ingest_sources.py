"""Sources of ``datapipe.ingest``: paths and globs (an existing path taken literally first), binary-file
detection (NUL bytes or a known magic number), JSON lines read with a block that grows to fit the longest line,
Hugging Face ``save_to_disk`` folders and ``datasets`` objects; and the plan: the sources cut into tasks (a group
of text files, one table file, a row range of a Hugging Face dataset, one batch of an in-memory source) that
tokenize independently, listed in output order.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from datapipe.format import DatasetError
from datapipe.writer import iter_source

__all__ = ["BINARY_MAGIC", "FILES_PER_TASK", "HF_ROWS_PER_TASK", "binary_reason", "expand_sources", "plan_tasks",
           "portable_task", "read_json_lines"]

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
FILES_PER_TASK = 256  # plain text files tokenized by one task
HF_ROWS_PER_TASK = 65_536  # rows of a Hugging Face dataset per task
_PROBE_BYTES = 8192  # the head of a file checked for binary content (as git does)
_JSON_MAX_BLOCK = 2**31 - 1  # Arrow's block size is an int32

# leading bytes of common binary formats (see binary_reason for those spelled in printable ASCII)
BINARY_MAGIC: dict[bytes, str] = {
    b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"PK\x05\x06": "zip", b"PK\x07\x08": "zip",
    b"RIFF": "RIFF (WAV/AVI/WebP)", b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF",
    b"GIF89a": "GIF", b"%PDF-": "PDF", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
    b"7z\xbc\xaf\x27\x1c": "7z", b"\x7fELF": "ELF executable", b"OggS": "Ogg", b"fLaC": "FLAC", b"ID3": "MP3",
    b"\xff\xfb": "MP3", b"PAR1": "Parquet", b"ARROW1": "Arrow IPC", b"\x93NUMPY": "NumPy .npy",
    b"SQLite format 3\x00": "SQLite", b"\x00\x00\x00\x18ftyp": "MP4", b"\x00\x00\x00\x20ftyp": "MP4",
}


# ---------------------------------------------------------------------------------------------------------------
# paths
def expand_sources(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Paths from command-line style patterns: an existing path is taken literally (``doc[1].txt`` is that file,
    not ``doc1.txt``); otherwise a pattern with ``*``, ``?`` or ``[`` is expanded (``**`` recursive, sorted).

    Raises:
        FileNotFoundError: a pattern that is neither an existing path nor matches any file (named in the message).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    for s in patterns:
        s = os.fspath(s)
        if os.path.exists(s):
            out.append(Path(s))
            continue
        hits = sorted(glob.glob(s, recursive=True)) if any(c in s for c in "*?[") else []
        if not hits:
            raise FileNotFoundError(f"{s}: no such file or directory, and no file matches it as a glob pattern; "
                                    "check the path (quote patterns so the shell leaves them to datapipe)")
        out.extend(Path(h) for h in hits)
    return out


_CONTROL = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])
_TEXTLIKE = frozenset(range(0x20, 0x7F))


def binary_reason(head: bytes) -> str | None:
    """Why the file starting with ``head`` is binary (a known magic number, or NUL bytes), or None for text.

    A magic number spelled in printable ASCII (``RIFF``, ``ID3``, ``%PDF-``, ...) counts only with a control byte
    in ``head`` too, so a text that starts with such a word stays text.
    """
    for magic, kind in BINARY_MAGIC.items():
        if head.startswith(magic):
            if set(magic) <= _TEXTLIKE and not any(c in _CONTROL for c in head):
                continue
            return f"{kind} magic number"
    if b"\x00" in head:
        return (f"NUL bytes in the first {len(head)} bytes (binary data, or UTF-16/32 text: convert it to UTF-8 "
                "first)")
    return None


def _is_table_file(p: Path) -> bool:
    return "".join(p.suffixes[-2:]).lower().endswith(TABLE_SUFFIXES) or p.suffix.lower() in TABLE_SUFFIXES


def _is_hf_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def read_json_lines(path: str) -> pa.Table:
    """JSON lines, with a block size that grows until the longest line fits (Arrow needs a whole object in one
    block)."""
    import pyarrow.json as pajson

    block = 1 << 20
    while True:
        try:
            return pajson.read_json(path, read_options=pajson.ReadOptions(block_size=block))
        except pa.ArrowInvalid as e:
            if "straddl" in str(e) and block < _JSON_MAX_BLOCK:
                block = min(block * 4, _JSON_MAX_BLOCK)
                continue
            raise DatasetError(f"{path}: cannot read as JSON lines ({e})") from None


def _hf_tasks(obj, name: str) -> Iterator[tuple]:
    splits = list(obj.items()) if isinstance(obj, dict) else [(None, obj)]
    for i, (split, ds) in enumerate(splits):
        label = name if split is None else f"{name} (split {split!r})"
        last_split = i == len(splits) - 1
        n = len(ds)
        if not ds.cache_files:  # in memory: a task would pickle the whole table, so hand out its batches
            row = 0
            batches = [b for t in ds.with_format("arrow").iter(batch_size=HF_ROWS_PER_TASK) for b in t.to_batches()]
            for j, b in enumerate(batches):
                yield ("batch", label, row, b, int(last_split and j == len(batches) - 1))
                row += b.num_rows
            continue
        # memory-mapped (save_to_disk / load_from_disk): a task pickles only the file paths
        edges = list(range(0, n, HF_ROWS_PER_TASK)) + [n]
        for j, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            yield ("hf", ds, label, a, b, last_split and j == len(edges) - 2)


def portable_task(task: tuple) -> tuple:
    """``task`` ready to leave the process: a batch that is a slice of a larger one is copied compactly (Arrow
    pickles a slice with its parent's whole buffers)."""
    if task[0] != "batch":
        return task
    kind, name, row0, b, done = task
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, b.schema) as w:
        w.write_batch(b)
    return kind, name, row0, pa.ipc.open_stream(sink.getvalue()).read_next_batch(), done


def _is_hf_dataset(obj) -> bool:
    mod = type(obj).__module__
    return mod.startswith("datasets.") and type(obj).__name__ in ("Dataset", "DatasetDict")


def _text_or_skip(paths: Sequence[Path], skip_binary: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Plain-text paths to ingest, and the (path, reason) of binary ones skipped; a binary one raises unless
    ``skip_binary``. Checked here, before any work starts, so a refusal costs nothing."""
    keep, skipped = [], []
    for p in paths:
        try:
            with open(p, "rb") as f:
                head = f.read(_PROBE_BYTES)
        except OSError as e:
            raise DatasetError(f"{p}: cannot read ({e.strerror or e})") from None
        reason = binary_reason(head)
        if reason is None:
            keep.append(str(p))
        elif skip_binary:
            skipped.append((str(p), reason))
        else:
            raise DatasetError(f"{p}: looks binary ({reason}), not text; remove it from the sources, or pass "
                               "skip_binary=True to skip and count such files")
    return keep, skipped


def plan_tasks(sources, skip_binary: bool) -> tuple[Iterator[tuple], int | None, list[tuple[str, str]]]:
    """Tasks for ``sources`` in output order, the number of files/folders they cover (None: unknown), and the
    binary files skipped."""
    if _is_hf_dataset(sources):
        return _hf_tasks(sources, f"<datasets.{type(sources).__name__}>"), 1, []
    if isinstance(sources, (str, os.PathLike)) or (
            isinstance(sources, (list, tuple)) and sources and all(isinstance(s, (str, os.PathLike)) for s in sources)):
        paths = expand_sources(sources)
        texts = [p for p in paths if p.is_file() and not _is_table_file(p)]
        others = [p for p in paths if p not in texts]
        for p in others:
            if p.is_dir() and not _is_hf_folder(p):
                raise DatasetError(f"{p}: is a directory, not a file or a Hugging Face save_to_disk folder (no "
                                   "state.json or dataset_dict.json); pass its files, e.g. 'DIR/**/*.txt'")
        if texts and others:
            raise DatasetError(f"mixing tables ({others[0]}) and plain text files ({texts[0]}) in one ingest; "
                               "ingest them separately")
        if texts:
            strs, skipped = _text_or_skip(texts, skip_binary)
            tasks = (("text", strs[i : i + FILES_PER_TASK]) for i in range(0, len(strs), FILES_PER_TASK))
            return tasks, len(strs), skipped

        def table_tasks():
            for p in others:
                if p.is_dir():
                    import datasets

                    yield from _hf_tasks(datasets.load_from_disk(str(p)), str(p))
                else:
                    yield ("table", str(p))

        return table_tasks(), len(others), []

    def batch_tasks():
        rows: dict[str, int] = {}
        for name, b in iter_source(sources):
            r = rows.get(name, 0)
            rows[name] = r + b.num_rows
            yield ("batch", name, r, b, 0)

    return batch_tasks(), None, []
