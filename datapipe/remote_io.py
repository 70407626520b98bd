"""Talking to an object store: bounded retries with backoff, whole-object reads, and checked downloads.

Every call to the store goes through :func:`with_retries`: transient errors (connection refused, timeouts, 5xx)
are retried with exponential backoff for up to ``timeout`` seconds, a missing object fails at once, and a
download whose size or checksum differs from the manifest is fetched once more before a :class:`DatasetError`.
Part of ``datapipe.remote`` (see its docstring for the whole design).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from datapipe.format import DatasetError, verify_buffer

__all__ = ["BLOCK_BYTES", "DEFAULT_TIMEOUT", "ChecksumMismatch", "download", "read_object", "with_retries"]

DEFAULT_TIMEOUT = 60.0
#: bytes per read or write call on a store's stream (a bare read() of a whole object is ~3x slower)
BLOCK_BYTES = 8 << 20


class ChecksumMismatch(Exception):
    """A download whose size or checksum differs from the manifest (retried once by :func:`with_retries`)."""


def with_retries(fn: Callable, what: str, *, timeout: float, backoff: float = 0.05, max_backoff: float = 2.0,
                 retry_checksum: int = 1, min_attempts: int = 3):
    """Call ``fn()``; retry transient store errors with exponential backoff for up to ``timeout`` seconds, and at
    least ``min_attempts`` times (one stalled request that ends in an error after most of ``timeout``, such as a
    dropped connection, still gets its retries; the wait stays bounded by the filesystem's request timeout).

    Raises:
        DatasetError: the object does not exist (at once), its checksum differs twice, or the store kept failing
            for ``timeout`` seconds (naming ``what``, the attempts and the last error).
    """
    start = time.monotonic()
    delay, attempt = backoff, 0
    while True:
        attempt += 1
        try:
            return fn()
        except FileNotFoundError as e:
            raise DatasetError(f"{what}: not found in the store ({e}); check the URL, or rebuild/re-upload the "
                               "dataset") from None
        except ChecksumMismatch as e:  # maybe a transfer error: download once more before giving up
            if retry_checksum <= 0:
                raise DatasetError(str(e)) from None
            retry_checksum -= 1
        except OSError as e:
            elapsed = time.monotonic() - start
            if attempt >= min_attempts and elapsed + delay > timeout:
                raise DatasetError(f"{what}: the store did not answer after {attempt} attempts over {elapsed:.1f} s "
                                   f"({e}); check that the endpoint is up and reachable and the credentials, or "
                                   f"raise timeout= (now {timeout} s)") from None
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)


def read_object(fs: pafs.FileSystem, path: str, what: str, timeout: float) -> bytes:
    """The whole object at ``path`` in ``fs``, retried for ``timeout`` seconds (errors name ``what``)."""

    def go():
        with fs.open_input_stream(path) as f:
            return f.read()

    return with_retries(go, what, timeout=timeout)


def download(fs: pafs.FileSystem, path: str, meta: dict, what: str, timeout: float, sink_path: Path | None):
    """Download one file of the manifest into ``sink_path`` (overwritten from 0) or memory (returned as a
    ``pyarrow.Buffer``), and check its size and checksum on arrival."""

    def go():
        got = 0
        chunks: list[bytes] = []
        out = open(sink_path, "r+b") if sink_path is not None else None
        try:
            with fs.open_input_stream(path) as f:
                while block := f.read(BLOCK_BYTES):
                    got += len(block)
                    if got > meta["bytes"]:
                        break
                    if out is not None:
                        out.write(block)
                    else:
                        chunks.append(block)
        finally:
            if out is not None:
                out.close()
        if got != meta["bytes"]:
            raise ChecksumMismatch(f"{what}: {got if got <= meta['bytes'] else 'more than ' + str(meta['bytes'])} "
                                    f"bytes downloaded but the manifest says {meta['bytes']}; the object is "
                                    "truncated or was replaced: rebuild or re-upload the dataset")
        buf = pa.memory_map(str(sink_path), "r").read_buffer() if out is not None else pa.py_buffer(b"".join(chunks))
        try:
            verify_buffer(buf, meta["checksum"], what)
        except DatasetError as e:
            raise ChecksumMismatch(str(e)) from None
        return None if out is not None else buf

    return with_retries(go, what, timeout=timeout)

