"""Writing datasets to object storage: build locally, then upload every file and the manifest last.

Readers never see a half-uploaded dataset as data: an existing manifest is removed before anything else is
replaced, and the new one is uploaded after every other file. Part of ``datapipe.remote`` (see its docstring).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from datapipe.format import MANIFEST, DatasetError
from datapipe.remote_io import BLOCK_BYTES, DEFAULT_TIMEOUT, with_retries
from datapipe.urls import join_key, resolve

__all__ = ["remote_exists", "upload_dataset", "write_remote"]


def _upload_file(fs: pafs.FileSystem, local: Path, dest: str, what: str, timeout: float) -> None:
    def go():
        with open(local, "rb") as src, fs.open_output_stream(dest) as out:
            while block := src.read(BLOCK_BYTES):
                out.write(block)

    with_retries(go, what, timeout=timeout)


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        # pyarrow's S3 filesystem re-creates the parent "directory" marker after a delete, which some
        # S3-compatible servers refuse: the object is gone all the same
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise


def remote_exists(url, filesystem: pafs.FileSystem | None = None, name: str = MANIFEST,
                  timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when ``url/name`` exists in the store."""
    fs, root = resolve(url, filesystem)
    info = with_retries(lambda: fs.get_file_info(join_key(root, name)), f"{os.fspath(url)}/{name}", timeout=timeout)
    return info.type == pafs.FileType.File


def upload_dataset(local_dir: str | os.PathLike, url, filesystem: pafs.FileSystem | None = None, *,
                   overwrite: bool = False, manifest: str = MANIFEST, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Upload a dataset directory built locally: every file, then the manifest last.

    An existing dataset at ``url`` is replaced only with ``overwrite``: its manifest is removed first (so readers
    see an unfinished upload, never a mix), and objects of the old dataset that the new one does not list are
    removed after the new manifest is in place.

    Args:
        local_dir: the local directory (``write_dataset`` output, or a subdirectory such as ``decomposition``).
        url: where it goes (``s3://bucket/ds``, or a path inside ``filesystem``).
        filesystem: a configured ``pyarrow.fs.FileSystem``.
        overwrite: replace an existing dataset.
        manifest: the file uploaded last.
        timeout: seconds of retries per object before a :class:`DatasetError`.

    Returns:
        ``url`` as a string.

    Raises:
        DatasetError: a dataset exists at ``url`` and ``overwrite`` is false; the store kept failing.
    """
    local_dir = Path(local_dir)
    fs, root = resolve(url, filesystem)
    url = os.fspath(url)
    if remote_exists(url, filesystem, manifest, timeout):
        if not overwrite:
            raise DatasetError(f"{url}: a dataset already exists (pass overwrite=True to replace it)")
        with_retries(lambda: _delete(fs, join_key(root, manifest)), f"{url}/{manifest}", timeout=timeout)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != manifest)
    if not (local_dir / manifest).exists():
        raise DatasetError(f"{local_dir}: no {manifest} to upload: the local build is unfinished")
    dirs = sorted({p.parent.relative_to(local_dir).as_posix() for p in files} - {"."})
    if fs.type_name not in ("s3", "gcs"):  # object stores have no directories (a marker could become a file)
        for d in [""] + dirs:
            with contextlib.suppress(OSError):  # the uploads below report a real error
                fs.create_dir(join_key(root, d) if d else root, recursive=True)
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        _upload_file(fs, p, join_key(root, rel), f"{url}/{rel}", timeout)
    _upload_file(fs, local_dir / manifest, join_key(root, manifest), f"{url}/{manifest}", timeout)
    keep = {p.relative_to(local_dir).as_posix() for p in files} | {manifest}
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in with_retries(lambda: fs.get_file_info(sel), url, timeout=timeout):  # the old dataset's leftovers
        rel = info.path[len(root):].lstrip("/") if root else info.path
        if info.type == pafs.FileType.File and rel not in keep:
            with contextlib.suppress(OSError):
                _delete(fs, info.path)
    return url


def write_remote(write_local: Callable, source, url, *, filesystem: pafs.FileSystem | None = None,
                 overwrite: bool = False, **options) -> str:
    """``write_dataset`` to a URL: build in a local temporary directory, then :func:`upload_dataset`."""
    if remote_exists(url, filesystem) and not overwrite:
        raise DatasetError(f"{os.fspath(url)}: a dataset already exists (pass overwrite=True to replace it)")
    with tempfile.TemporaryDirectory(prefix="datapipe-upload-") as tmp:
        local = write_local(source, Path(tmp) / "ds", **options)
        return upload_dataset(local, url, filesystem, overwrite=overwrite)

