"""The cluster file of :class:`samplers.NGAMEBatchSampler` (``save_clusters``/``load_clusters``): an ``.npz`` of
named arrays that carries an xxh3 checksum of its own content, written atomically (temp file, fsync, rename)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

__all__ = ["clusters_digest", "read_cluster_file", "write_cluster_file"]


def clusters_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """xxh3 of a cluster file's arrays (name, dtype, shape, bytes; sorted by name): the file's own checksum."""
    import xxhash

    h = xxhash.xxh3_64()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return f"xxh3_64:{h.hexdigest()}"


def write_cluster_file(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` and their checksum to ``path`` (an ``.npz``), atomically: a crash leaves the old file."""
    arrays = dict(arrays)
    arrays["checksum"] = np.array(clusters_digest(arrays))  # read_cluster_file refuses a changed file
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_cluster_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays :func:`write_cluster_file` wrote to ``path`` (without the checksum), checked.

    Raises:
        ValueError: naming ``path`` when the file is unreadable or its content does not match its checksum.
    """
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{os.fspath(path)}: not a readable cluster file ({type(e).__name__}: {e}); it is "
                         "truncated or corrupt: save the clusters again") from None
    stored = str(arrays.pop("checksum", ""))
    if stored and stored != clusters_digest(arrays):
        raise ValueError(f"{os.fspath(path)}: content does not match the checksum the file carries "
                         f"({stored}); the cluster file is corrupt: save the clusters again")
    return arrays
