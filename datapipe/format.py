"""The dataset directory format: manifest, checksums, atomic writes.

A dataset directory is ``manifest.json`` + ``shards/NNNNN.arrow`` (Arrow IPC files, one record batch each) +
``index.arrow`` (the small per-row metadata columns). The manifest is written last, atomically: a directory
without one is an unfinished build and is never read as data.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa

FORMAT_NAME = "datapipe.dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.arrow"
SHARD_DIR = "shards"


class DatasetError(ValueError):
    """A dataset directory or a source is malformed; the message names the file, row and column."""


try:  # xxh3 hashes at memory speed; blake2b is the always-available fallback
    import xxhash

    def _hasher():
        return "xxh3_64", xxhash.xxh3_64()
except ImportError:  # pragma: no cover
    import hashlib

    def _hasher():
        return "blake2b", hashlib.blake2b(digest_size=16)


def file_checksum(path: str | os.PathLike, algo: str | None = None) -> str:
    """``"<algo>:<hex>"`` of a file's bytes, read in 8 MiB blocks."""
    if algo is None:
        name, h = _hasher()
    elif algo == "xxh3_64":
        import xxhash

        name, h = algo, xxhash.xxh3_64()
    elif algo == "blake2b":
        import hashlib

        name, h = algo, hashlib.blake2b(digest_size=16)
    else:
        raise DatasetError(f"unknown checksum algorithm {algo!r} in the manifest")
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return f"{name}:{h.hexdigest()}"


def verify_checksum(path: Path, expected: str) -> None:
    algo = expected.split(":", 1)[0]
    got = file_checksum(path, algo)
    if got != expected:
        raise DatasetError(f"{path}: checksum mismatch (manifest says {expected}, file has {got}); the file changed "
                           "or is corrupt: rebuild the dataset")


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_b64(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check a dataset directory's manifest."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if not mpath.exists():
        raise DatasetError(f"{root}: no {MANIFEST}: not a datapipe dataset, or an unfinished build (rebuild it)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DatasetError(f"{mpath}: format_version {manifest['format_version']} is newer than this datapipe "
                           f"({FORMAT_VERSION}); upgrade datapipe")
    return manifest
