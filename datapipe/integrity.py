"""One integrity check for everything the library writes into a dataset directory (``datapipe verify``).

Checked: the dataset manifest (its own digest and shape), every file it lists (shards, ``index.arrow``, extra
files such as a TAS ``pairs.arrow``: size, checksum, and Arrow structure for shards and the index), the
decomposition (its manifest's digest, pieces, sequences, materialized buckets), and standalone files kept in the
directory that carry their own content digest (cluster files, pair tables; see
``datapipe.format.write_sealed_table``). Every bad file is reported, not only the first.
"""

from __future__ import annotations

import os
from pathlib import Path

from datapipe.format import MANIFEST, DatasetError, SEALED_KEY, read_sealed_table

__all__ = ["verify_tree"]


def _sealed(path: Path) -> bool:
    import pyarrow as pa

    try:
        schema = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema
    except (pa.ArrowException, OSError):
        return True  # unreadable: let read_sealed_table name the problem
    return SEALED_KEY in (schema.metadata or {})


def verify_tree(path: str | os.PathLike) -> dict:
    """Check every file of a dataset directory the library wrote (or one standalone ``.arrow`` file: a cluster
    file or pair table, against the digest it carries).

    Returns:
        ``{"ok": bool, "files": n checked, "bytes": bytes checked, "problems": [(file, message), ...],
        "unchecked": [names of entries nothing vouches for]}``.
    """
    from datapipe.dataset import ArrowDataset, check_shard
    from datapipe.decomposition import DECOMPOSITION_DIR, verify_decomposition
    from datapipe.format import verify_buffer, verify_checksum

    import pyarrow as pa

    root = Path(path)
    if root.is_file():  # a standalone file that carries its own digest (cluster file, pair table)
        try:
            read_sealed_table(root)
            if not _sealed(root):
                return {"ok": True, "files": 0, "bytes": 0, "problems": [], "unchecked": [root.name]}
            return {"ok": True, "files": 1, "bytes": root.stat().st_size, "problems": [], "unchecked": []}
        except DatasetError as e:
            return {"ok": False, "files": 1, "bytes": 0, "problems": [(str(root), str(e))], "unchecked": []}
    problems: list[tuple[str, str]] = []
    files = nbytes = 0
    listed: set[str] = {MANIFEST, DECOMPOSITION_DIR}
    try:
        ds = ArrowDataset.open(root, verify="never")
    except DatasetError as e:
        problems.append((str(root / MANIFEST), str(e)))
        ds = None
    if ds is not None:
        for meta in ds.files():
            p = ds._local_file(meta)
            listed.add(meta["file"].split("/", 1)[0])
            files += 1
            try:
                if not p.exists():
                    raise DatasetError(f"{p}: file is missing; rebuild the dataset")
                if p.stat().st_size != meta["bytes"]:
                    raise DatasetError(f"{p}: {p.stat().st_size} bytes but the manifest says {meta['bytes']} "
                                       "(truncated or replaced)")
                verify_buffer(pa.memory_map(str(p), "r").read_buffer(), meta["checksum"], p)
                nbytes += meta["bytes"]
            except DatasetError as e:
                problems.append((str(p), str(e)))
        bad = {f for f, _ in problems}
        for meta in ds.manifest["shards"]:  # structure too: a consistent manifest over a foreign file
            p = ds._local_file(meta)
            if str(p) not in bad:
                try:
                    check_shard(p, meta, ds.schema)
                except DatasetError as e:
                    problems.append((str(p), str(e)))
        imeta = ds.manifest.get("index")
        if imeta and str(ds._local_file(imeta)) not in bad:
            try:
                ds.index  # noqa: B018
            except DatasetError as e:
                problems.append((str(ds._local_file(imeta)), str(e)))
    dec = root / DECOMPOSITION_DIR
    if dec.is_dir():
        problems.extend(verify_decomposition(root))
        files += sum(1 for p in dec.rglob("*") if p.is_file())
    unchecked = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name in listed:
                continue
            if p.is_file() and p.suffix == ".arrow" and _sealed(p):
                files += 1
                try:
                    t = read_sealed_table(p)
                except DatasetError as e:
                    problems.append((str(p), str(e)))
                    continue
                meta = t.schema.metadata or {}
                if b"centroids_file" in meta:  # a cluster file vouches for its centroids file
                    cpath = p.with_name(meta[b"centroids_file"].decode())
                    listed.add(cpath.name)
                    if cpath.exists():
                        files += 1
                        try:
                            verify_checksum(cpath, meta[b"centroids_checksum"].decode())
                        except DatasetError as e:
                            problems.append((str(cpath), str(e)))
            else:
                unchecked.append(p.name)
    unchecked = [n for n in unchecked if n not in listed]
    return {"ok": not problems, "files": files, "bytes": nbytes, "problems": problems, "unchecked": unchecked}
