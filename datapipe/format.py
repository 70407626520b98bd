"""The dataset directory format: manifest, checksums, and writes that cannot half-happen or race.

A dataset directory is ``manifest.json`` + ``shards/NNNNN.arrow`` (Arrow IPC files, one record batch each) +
``index.arrow`` (the small per-row metadata columns). The manifest is written last, atomically, and carries its
own digest (``manifest_checksum``), so an edited or damaged manifest is refused; a directory without one is an
unfinished build and is never read as data.

Every file the library writes has one integrity story: it is listed with its size and checksum in a manifest
that is itself digested (dataset shards, ``index.arrow``, extra files such as ``pairs.arrow``, decomposition
files), or, for standalone files (pair tables, cluster files), carries a digest of its content in its own
metadata (:func:`write_sealed_table`).

Writes: an output is written under a temporary sibling name while an exclusive lock (``flock`` on
``.<name>.lock`` beside it) is held, so of two concurrent writers exactly one wins and the other gets a
:class:`DatasetError`; temporaries left by dead writers are removed by the next write under the lock; the
finished directory is published by ``rename`` (new path) or an atomic exchange (``renameat2(RENAME_EXCHANGE)``,
falling back to two renames where the kernel or filesystem lacks it), so an overwrite never leaves the path
without a valid dataset. Files are created with the user's umask.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

FORMAT_NAME = "datapipe.dataset"
FORMAT_VERSION = 2  # 2: the manifest carries its own digest (version 1 manifests, without one, are still read)
MANIFEST = "manifest.json"
INDEX_FILE = "index.arrow"
SHARD_DIR = "shards"
DIGEST_KEY = "manifest_checksum"
SEALED_KEY = b"datapipe.content_checksum"


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


def new_hash(algo: str | None = None, where: object = "the manifest"):
    """``(algo, hasher)``: a fresh hasher of ``algo`` (default: xxh3_64 when installed, else blake2b).

    Raises:
        DatasetError: naming ``where`` when ``algo`` is not one datapipe knows.
    """
    if algo is None:
        return _hasher()
    if algo == "xxh3_64":
        import xxhash

        return algo, xxhash.xxh3_64()
    if algo == "blake2b":
        import hashlib

        return algo, hashlib.blake2b(digest_size=16)
    raise DatasetError(f"{where}: unknown checksum algorithm {algo!r} (datapipe knows xxh3_64 and blake2b)")


def file_checksum(path: str | os.PathLike, algo: str | None = None) -> str:
    """``"<algo>:<hex>"`` of a file's bytes, read in 8 MiB blocks."""
    name, h = new_hash(algo)
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return f"{name}:{h.hexdigest()}"


def buffer_checksum(buf, algo: str | None = None) -> str:
    """``"<algo>:<hex>"`` of a buffer (bytes, memoryview, ``pyarrow.Buffer`` of a memory map: no copy)."""
    name, h = new_hash(algo)
    h.update(buf)
    return f"{name}:{h.hexdigest()}"


def _mismatch(path, expected: str, got: str) -> DatasetError:
    return DatasetError(f"{path}: checksum mismatch (manifest says {expected}, file has {got}); the file changed "
                        "or is corrupt: rebuild it (or restore it from a copy)")


def verify_checksum(path: Path, expected: str) -> None:
    """Raise :class:`DatasetError` naming ``path`` unless its bytes hash to ``expected``."""
    got = file_checksum(path, expected.split(":", 1)[0])
    if got != expected:
        raise _mismatch(path, expected, got)


def verify_buffer(buf, expected: str, path) -> None:
    """As :func:`verify_checksum`, over a buffer already mapped (the file is not read twice)."""
    got = buffer_checksum(buf, expected.split(":", 1)[0])
    if got != expected:
        raise _mismatch(path, expected, got)


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_b64(text: str, where: object = MANIFEST) -> pa.Schema:
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text, validate=True)))
    except Exception as e:  # binascii.Error, ArrowInvalid, TypeError: all mean a damaged manifest
        raise DatasetError(f"{where}: the 'schema' entry is not a serialized Arrow schema ({type(e).__name__}: "
                           f"{e}); the manifest is damaged: rebuild the dataset") from None


# ---- manifests ------------------------------------------------------------------------------------------------
def manifest_digest(manifest: dict, algo: str | None = None) -> str:
    """Digest of a manifest's canonical JSON (sorted keys, no spaces), its own digest entry left out."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return buffer_checksum(text.encode("ascii"), algo)


def seal_manifest(manifest: dict) -> str:
    """The manifest as JSON text with its digest added (what :func:`write_manifest` writes)."""
    sealed = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    sealed[DIGEST_KEY] = manifest_digest(sealed)
    return json.dumps(sealed, indent=1)


def check_manifest_digest(manifest: dict, mpath, *, required: bool) -> None:
    """Raise :class:`DatasetError` naming ``mpath`` when the manifest's digest is missing (and required) or wrong."""
    expected = manifest.get(DIGEST_KEY)
    if expected is None:
        if required:
            raise DatasetError(f"{mpath}: no {DIGEST_KEY}: the manifest was edited or damaged; rebuild the dataset")
        return
    if not isinstance(expected, str) or ":" not in expected:
        raise DatasetError(f"{mpath}: {DIGEST_KEY} is not '<algo>:<hex>' (got {expected!r}); the manifest is damaged")
    got = manifest_digest(manifest, expected.split(":", 1)[0])
    if got != expected:
        raise DatasetError(f"{mpath}: the manifest does not match its own digest ({DIGEST_KEY} {expected}, content "
                           f"{got}): it was edited or is corrupt (shard entries reordered, sizes changed, ...); "
                           "rebuild the dataset")


def parse_json(data: bytes, where: object) -> dict:
    """``data`` (a manifest's bytes, read from ``where``) as a JSON object.

    Raises:
        DatasetError: naming ``where``: not JSON, or not an object.
    """
    try:
        out = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: not valid JSON ({e}); the manifest is damaged: rebuild") from None
    if not isinstance(out, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(out).__name__}; the manifest is damaged")
    return out


def load_json(mpath: Path) -> dict:
    """The JSON object in the file ``mpath`` (see :func:`parse_json`)."""
    return parse_json(Path(mpath).read_bytes(), mpath)


def check_file_entry(entry, mpath, where: str, *, rows: bool = True) -> dict:
    """Check one ``{file, rows, bytes, checksum}`` manifest entry (a relative path inside the directory)."""
    def bad(what):
        return DatasetError(f"{mpath}: {where}: {what}; the manifest is damaged: rebuild")

    if not isinstance(entry, dict):
        raise bad(f"expected an object, got {type(entry).__name__}")
    f = entry.get("file")
    if not isinstance(f, str) or not f or os.path.isabs(f) or ".." in Path(f).parts:
        raise bad(f"'file' must be a relative path inside the directory (got {f!r})")
    keys = ("rows", "bytes") if rows else ("bytes",)
    for k in keys:
        v = entry.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(f"{k!r} must be an integer >= 0 (got {v!r})")
    c = entry.get("checksum")
    if not isinstance(c, str) or c.split(":", 1)[0] not in ("xxh3_64", "blake2b") or ":" not in c:
        raise bad(f"'checksum' must be 'xxh3_64:<hex>' or 'blake2b:<hex>' (got {c!r})")
    return entry



def shard_starts(manifest: dict, where: object) -> NDArray[np.int64]:
    """int64 ``[shards + 1]``: the first global row of each shard of ``manifest``, then ``num_rows``.

    Raises:
        DatasetError: naming ``where`` (the manifest) when the shards' rows do not sum to ``num_rows``.
    """
    starts = np.zeros(len(manifest["shards"]) + 1, dtype=np.int64)
    np.cumsum([s["rows"] for s in manifest["shards"]], out=starts[1:])
    if starts[-1] != manifest["num_rows"]:
        raise DatasetError(f"{where}: shard rows sum to {starts[-1]} but num_rows is {manifest['num_rows']}; the "
                           "manifest is damaged: rebuild the dataset")
    return starts

def corrupt_file(path, what: str) -> DatasetError:
    """The error for a damaged file: ``path``, what is wrong, and the fix."""
    return DatasetError(f"{path}: {what}; the file is truncated or corrupt: rebuild the dataset (or restore the file)")


def check_list_offsets(path, name: str, offsets: NDArray, num_values: int, rows: int) -> None:
    """Offsets of a list column must be ``rows + 1`` non-decreasing positions inside the values buffer: checked
    before any kernel reads through them, so a damaged file is an error and never an out-of-bounds read."""
    if len(offsets) != rows + 1:
        raise corrupt_file(path, f"column {name!r}: {len(offsets)} list offsets for {rows} rows")
    if rows == 0:
        return
    if offsets[0] < 0 or offsets[-1] > num_values:
        raise corrupt_file(path, f"column {name!r}: list offsets span [{int(offsets[0])}, {int(offsets[-1])}] outside "
                             f"the {num_values} values")
    drops = np.flatnonzero(offsets[1:] < offsets[:-1])
    if len(drops):
        raise corrupt_file(path, f"column {name!r}, row {int(drops[0])}: list offsets decrease")


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check a dataset directory's manifest: JSON, format, its own digest, the shape of every entry.

    Raises:
        DatasetError: naming ``manifest.json`` and what is wrong.
    """
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if not mpath.exists():
        raise DatasetError(f"{root}: no {MANIFEST}: not a datapipe dataset, or an unfinished build (rebuild it)")
    return check_manifest(load_json(mpath), mpath)


def check_manifest(manifest: dict, mpath: object) -> dict:
    """Check a dataset manifest read from ``mpath`` (a local file or a store's URL): format, version, its own
    digest, the shape of every entry. Returns ``manifest``.

    Raises:
        DatasetError: naming ``mpath`` and what is wrong.
    """
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DatasetError(f"{mpath}: format_version {version!r} is newer than this datapipe ({FORMAT_VERSION}); "
                           "upgrade datapipe")
    check_manifest_digest(manifest, mpath, required=version >= 2)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DatasetError(f"{mpath}: no 'shards' list; the manifest is damaged: rebuild the dataset")
    for i, s in enumerate(shards):
        check_file_entry(s, mpath, f"shards[{i}]")
    n = manifest.get("num_rows")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DatasetError(f"{mpath}: 'num_rows' must be an integer >= 0 (got {n!r}); the manifest is damaged")
    if manifest.get("index") is not None:
        check_file_entry(manifest["index"], mpath, "index")
    for i, e in enumerate(manifest.get("files") or []):
        check_file_entry(e, mpath, f"files[{i}]", rows=False)
    if not isinstance(manifest.get("schema"), str):
        raise DatasetError(f"{mpath}: no 'schema' string; the manifest is damaged: rebuild the dataset")
    return manifest


# ---- writes ---------------------------------------------------------------------------------------------------
def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and ``os.replace``.

    The file gets the mode any new file gets under the user's umask (``mkstemp``'s 0600 would hide a dataset
    from the other users of shared storage).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_manifest(path: Path, manifest: dict) -> None:
    """Write a manifest with its digest, atomically."""
    atomic_write_text(path, seal_manifest(manifest))


def temp_name(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` (``.<name>.tmp-<pid>-<random>``), removed by the next locked write."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(6).hex()}"


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporaries of earlier writes of ``out`` (call with the lock held: no live writer owns them)."""
    gone = []
    if not out.parent.is_dir():
        return gone
    for p in out.parent.iterdir():
        if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            gone.append(p)
    return gone


@contextlib.contextmanager
def exclusive_output(out: Path, what: str = "dataset") -> Iterator[None]:
    """Hold the write lock of ``out`` (``flock`` on ``.<name>.lock`` beside it) and remove stale temporaries.

    Raises:
        DatasetError: another process holds the lock (it is writing ``out`` now).
    """
    import fcntl

    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DatasetError(f"{out}: another process is writing this {what} now (it holds {lock}); wait for "
                                   "it to finish, or write to another path") from None
            raise
        try:  # the holder we raced with may have unlinked the lock file before we got it: take a fresh one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        remove_stale(out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # unlinked while held: a waiter that opened it retries on a fresh file
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out`` (call with the lock held).

    A new ``out`` is one ``rename``. An existing one is swapped atomically with ``renameat2(RENAME_EXCHANGE)``
    (readers see the old dataset or the new one, never none), then the old copy (now at ``tmp``) is removed.
    Without that call (not Linux, or a filesystem that refuses it) two renames are used: a crash between them
    leaves the old dataset at ``.<name>.old-*``, which the next write removes.
    """
    fsync_path(tmp)
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(6).hex()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        fsync_path(out.parent)


# ---- standalone files: a digest of the content in the file's own metadata -----------------------------------
def _table_digest(table: pa.Table, algo: str | None = None) -> str:
    name, h = new_hash(algo)
    for col_name, col in zip(table.column_names, table.columns):
        h.update(col_name.encode() + b"\0" + str(col.type).encode() + b"\0")
        for chunk in col.chunks:
            import numpy as np

            h.update(np.ascontiguousarray(chunk.to_numpy(zero_copy_only=False)).view(np.uint8))
    return f"{name}:{h.hexdigest()}"


def write_sealed_table(path: str | os.PathLike, table: pa.Table) -> Path:
    """Write a table of numeric columns as an Arrow IPC file that carries a digest of its content, atomically.

    :func:`read_sealed_table` recomputes the digest, so a changed value is an error, not data.
    """
    path = Path(path)
    meta = dict(table.schema.metadata or {})
    meta[SEALED_KEY] = _table_digest(table).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def read_sealed_table(path: str | os.PathLike, what: str = "file") -> pa.Table:
    """Read (memory-map) an Arrow IPC file and check it: structure, and the content digest when it has one.

    Raises:
        DatasetError: naming ``path`` when the file cannot be parsed, is structurally invalid, or its content
            does not match its digest.
    """
    path = Path(path)
    try:
        t = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        t.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: cannot read this {what} ({e}); the file is truncated or corrupt: rebuild it") from None
    expected = (t.schema.metadata or {}).get(SEALED_KEY)
    if expected is not None:
        expected = expected.decode("ascii", "replace")
        try:
            got = _table_digest(t, expected.split(":", 1)[0])
        except DatasetError:
            got = "<unknown algorithm>"
        if got != expected:
            raise DatasetError(f"{path}: content does not match the checksum the file carries ({expected} vs {got}); "
                               f"the {what} is corrupt: rebuild it")
    return t
