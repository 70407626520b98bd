"""Writing datasets to object storage: build locally, then upload every file and the manifest last.

An upload over an existing dataset runs in this order, so that a reader that opens the URL sees the old dataset,
an unfinished upload (no manifest: refused as data), or the new dataset, never a manifest with missing or other
shards:

1. the old manifest is deleted (from here on the URL reads as an unfinished upload);
2. every file of the new version is uploaded (a PUT replaces an object of the same name);
3. the objects of the old version the new one does not have are deleted: one ``delete_dir`` for each directory
   the new version no longer uses, one ``delete_file`` for each other file;
4. the new manifest is uploaded: it appears when the store holds exactly the new version.

A crash after step 1 leaves no manifest (an unfinished upload); the next upload to the URL removes what it left.

Deletes and "directories": pyarrow's S3 filesystem puts a zero-byte ``dir/`` marker for the parent after every
delete (its directory emulation), and raises if that fails. Servers that map keys to files, such as ``rclone serve
s3``, refuse that marker (HTTP 500, after the object is already gone) and, until their directory cache expires, list
``dir`` as an empty file and answer "not found" for the objects in it. After an error :func:`_delete` therefore
waits until an object known to exist in that directory (the probe: for leftovers, a file of the new version)
reads back again, bounded by ``timeout``, and only then checks that the deleted object is gone; the next request
sees a sane store. No delete here empties a directory object by object either: such a server removes the emptied
directory, and the marker would then create a zero-byte *file* in its place. A directory the new version does not
use goes with one ``delete_dir`` (its parent keeps files of the new version). Part of ``datapipe.remote`` (see its
docstring).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
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


def _settle(fs: pafs.FileSystem, probe: str, what: str, timeout: float) -> None:
    """Wait until ``probe``, an object known to exist beside (or below) what was deleted, reads as a file again:
    after a refused directory marker some servers report the objects of that directory as missing until their
    directory cache expires (see the module docstring)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        info = with_retries(lambda: fs.get_file_info(probe), what, timeout=timeout)
        if info.type == pafs.FileType.File:
            return
        if time.monotonic() + delay > deadline:
            raise DatasetError(f"{what}: after this delete the store reports {probe!r}, which exists, as missing for "
                               f"more than {timeout} s (a server without directory markers whose directory cache "
                               "does not expire?); shorten the server's directory cache time, or raise timeout=")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _delete(fs: pafs.FileSystem, path: str, what: str, timeout: float, *, probe: str | None,
            directory: bool = False) -> None:
    """Delete the object (or, with ``directory``, everything under the prefix) at ``path``; retried like every
    call to the store, and done when the object is gone even if the store refused pyarrow's directory marker.

    ``probe`` is an object that exists in the same directory as ``path`` (or below it), read back after an error
    to know when the store answers for that directory again; None when there is none.
    """

    def go():
        try:
            fs.delete_dir(path) if directory else fs.delete_file(path)
        except FileNotFoundError:
            return  # already gone (a retry after a delete whose answer was lost)
        except OSError:
            # either the delete failed, or it succeeded and the parent's directory marker was refused: wait until
            # the store answers for the directory again, then look
            if probe is not None:
                _settle(fs, probe, what, timeout)
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                raise

    with_retries(go, what, timeout=timeout)


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if root else path


def _leftovers(infos: list[pafs.FileInfo], root: str, keep: set[str]) -> tuple[list[str], list[str]]:
    """What to delete so that ``root`` holds only ``keep`` (paths relative to ``root``): the topmost directories
    that hold no kept file (one ``delete_dir`` each), and the other files not kept. Relative paths."""
    kept_dirs = {"/".join(k.split("/")[:i]) for k in keep for i in range(1, k.count("/") + 1)}
    rel = {_relative(i.path, root): i.type for i in infos}
    dirs = sorted(p for p, t in rel.items() if t == pafs.FileType.Directory and p not in kept_dirs
                  and p.rpartition("/")[0] in kept_dirs | {""})
    files = sorted(p for p, t in rel.items() if t == pafs.FileType.File and p not in keep
                   and not any(p.startswith(d + "/") for d in dirs))
    return dirs, files


def remote_exists(url, filesystem: pafs.FileSystem | None = None, name: str = MANIFEST,
                  timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when ``url/name`` exists in the store."""
    fs, root = resolve(url, filesystem)
    info = with_retries(lambda: fs.get_file_info(join_key(root, name)), f"{os.fspath(url)}/{name}", timeout=timeout)
    return info.type == pafs.FileType.File


def upload_dataset(local_dir: str | os.PathLike, url, filesystem: pafs.FileSystem | None = None, *,
                   overwrite: bool = False, manifest: str = MANIFEST, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Upload a dataset directory built locally: every file, then the manifest last.

    An existing dataset at ``url`` is replaced only with ``overwrite``, in the order of the module docstring: its
    manifest is deleted first (readers that open the URL meanwhile see an unfinished upload, never a mix), the new
    files are uploaded, the old version's objects the new one does not have are deleted, and the new manifest is
    uploaded last. Objects under ``url`` that the new version does not list are removed in any case (what an
    interrupted upload left), as a local ``write_dataset`` replaces the whole directory.

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
        DatasetError: a dataset exists at ``url`` and ``overwrite`` is false; the local build has no manifest; the
            store kept failing.
    """
    local_dir = Path(local_dir)
    fs, root = resolve(url, filesystem)
    url = os.fspath(url)
    if not (local_dir / manifest).exists():
        raise DatasetError(f"{local_dir}: no {manifest} to upload: the local build is unfinished")
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != manifest)
    rels = [p.relative_to(local_dir).as_posix() for p in files]
    exists = remote_exists(url, filesystem, manifest, timeout)
    if exists and not overwrite:
        raise DatasetError(f"{url}: a dataset already exists (pass overwrite=True to replace it)")
    # the old version (or what an interrupted upload left), and what of it the new version does not have
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    before = with_retries(lambda: fs.get_file_info(sel), url, timeout=timeout)
    dirs, stale = _leftovers(before, root, set(rels) | {manifest})

    def probe(rel: str, candidates: list[str]) -> str | None:  # an object in the directory of `rel`, or below
        parent = rel.rpartition("/")[0]
        return next((join_key(root, c) for c in candidates
                     if c != rel and (not parent or c.startswith(parent + "/"))), None)

    if exists:  # from here on, readers that open the URL see an unfinished upload
        old = sorted(_relative(i.path, root) for i in before if i.type == pafs.FileType.File)
        _delete(fs, join_key(root, manifest), f"{url}/{manifest}", timeout, probe=probe(manifest, old))
    if fs.type_name not in ("s3", "gcs"):  # object stores have no directories (a marker could become a file)
        for d in [""] + sorted({r.rpartition("/")[0] for r in rels} - {""}):
            with contextlib.suppress(OSError):  # the uploads below report a real error
                fs.create_dir(join_key(root, d) if d else root, recursive=True)
    for p, rel in zip(files, rels):
        _upload_file(fs, p, join_key(root, rel), f"{url}/{rel}", timeout)
    # the old version's objects the new one does not have go before the new manifest appears (a crash leaves no
    # manifest); every directory they are deleted from keeps files of the new version (the probes)
    for d in dirs:
        _delete(fs, join_key(root, d), f"{url}/{d}", timeout, probe=probe(d, rels), directory=True)
    for rel in stale:
        _delete(fs, join_key(root, rel), f"{url}/{rel}", timeout, probe=probe(rel, rels))
    _upload_file(fs, local_dir / manifest, join_key(root, manifest), f"{url}/{manifest}", timeout)
    return url


def write_remote(write_local: Callable, source, url, *, filesystem: pafs.FileSystem | None = None,
                 overwrite: bool = False, **options) -> str:
    """``write_dataset`` to a URL: build in a local temporary directory, then :func:`upload_dataset`."""
    if remote_exists(url, filesystem) and not overwrite:
        raise DatasetError(f"{os.fspath(url)}: a dataset already exists (pass overwrite=True to replace it)")
    with tempfile.TemporaryDirectory(prefix="datapipe-upload-") as tmp:
        local = write_local(source, Path(tmp) / "ds", **options)
        return upload_dataset(local, url, filesystem, overwrite=overwrite)
