"""Dataset locations: local paths and URLs of object stores, and the opener that reads a dataset at a URL.

``ArrowDataset.open`` asks :func:`is_remote` whether a location must be read through a ``pyarrow.fs``
filesystem, and then hands it to :func:`open_remote`, which calls the opener registered here. The opener lives
in ``datapipe.remote`` (``RemoteArrowDataset``, a subclass of ``ArrowDataset``): this module imports neither, so
``datapipe.dataset`` does not import ``datapipe.remote`` and the two form no import cycle. ``datapipe/__init__.py``
registers the opener, so it is in place whatever module of ``datapipe`` a program imports first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = ["is_remote", "join_key", "local_path", "open_remote", "register_remote_opener", "resolve", "scheme"]

#: the callable that opens a dataset on object storage: ``opener(url, filesystem=, cache_dir=, cache_limit=,
#: timeout=)`` returning an ``ArrowDataset``; set by :func:`register_remote_opener`
_OPENER: list[Callable] = []


def scheme(s: str) -> str | None:
    """The lower-cased scheme of a URL (``"s3"`` for ``s3://bkt/ds``), or None for a plain path."""
    head, sep, _ = s.partition("://")
    return head.lower() if sep and head.replace("+", "").replace("-", "").isalnum() else None


def is_remote(url_or_path, filesystem: pafs.FileSystem | None = None) -> bool:
    """True when ``url_or_path`` must be read through a ``pyarrow.fs`` filesystem (a URL other than
    ``file://``, or any path with ``filesystem=``)."""
    if filesystem is not None:
        return True
    return isinstance(url_or_path, str) and scheme(url_or_path) not in (None, "file")


def local_path(url_or_path) -> str | os.PathLike:
    """A ``file://`` URL as a local path; anything else unchanged."""
    if isinstance(url_or_path, str) and scheme(url_or_path) == "file":
        return url_or_path.split("://", 1)[1]
    return url_or_path


def resolve(url_or_path, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it.

    Args:
        url_or_path: a URL any ``pyarrow.fs`` filesystem understands (``s3://bucket/ds``, ``gs://...``,
            ``hdfs://...``, ``file://...``), or a path inside ``filesystem``.
        filesystem: a configured ``pyarrow.fs.FileSystem``; the URL's scheme is then dropped and the rest is the
            path.

    Raises:
        TypeError: ``filesystem`` is not a ``pyarrow.fs.FileSystem``.
        DatasetError: the URL names no filesystem pyarrow knows.
    """
    # imported here: `import datapipe` registers the opener below and stays cheap (pyarrow.fs costs ~0.1 s)
    import pyarrow as pa
    import pyarrow.fs as pafs

    from datapipe.format import DatasetError

    s = os.fspath(url_or_path)
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem must be a pyarrow.fs.FileSystem, e.g. pyarrow.fs.S3FileSystem(...) "
                            f"(got {type(filesystem).__name__})")
        path = s.split("://", 1)[1] if scheme(s) else s
        return filesystem, path.rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as e:
        raise DatasetError(f"{s}: cannot resolve the URL ({e}); pass filesystem=pyarrow.fs.S3FileSystem(...) "
                           "(or another pyarrow.fs filesystem) configured for the store") from None
    return fs, path.rstrip("/")


def join_key(root: str, name: str) -> str:
    """``root/name`` inside a store (``name`` alone at the store's root)."""
    return f"{root}/{name}" if root else name


def register_remote_opener(opener: Callable) -> None:
    """Set the callable :func:`open_remote` uses (replacing any earlier one).

    Args:
        opener: ``opener(url, *, filesystem, cache_dir, cache_limit, timeout)`` returning an ``ArrowDataset``.

    Raises:
        TypeError: ``opener`` is not callable.
    """
    if not callable(opener):
        raise TypeError(f"opener must be callable, e.g. datapipe.remote.RemoteArrowDataset (got {opener!r})")
    _OPENER[:] = [opener]


def open_remote(url, **options):
    """Open the dataset at ``url`` with the registered opener (``options`` as ``ArrowDataset.open`` takes them).

    Raises:
        RuntimeError: no opener is registered (``datapipe/__init__.py`` registers one; import ``datapipe``).
    """
    if not _OPENER:
        raise RuntimeError(f"{os.fspath(url)}: no opener for datasets on object storage is registered; "
                           "`import datapipe` (its __init__ registers datapipe.remote's) before opening a URL")
    return _OPENER[0](url, **options)
