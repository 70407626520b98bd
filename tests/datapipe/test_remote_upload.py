"""The order of an upload over an existing dataset (``datapipe.remote.upload_dataset``), seen from the store: the old
manifest goes first, the new manifest comes last, and the old version's leftovers are deleted in between, a
directory the new version does not use with one ``delete_dir``.

The store here is a real local directory behind ``pyarrow.fs.PyFileSystem``, whose handler passes every call to
``pyarrow.fs.LocalFileSystem`` and writes down the ones that change the store. The same uploads against the S3 server
are in test_remote.py and test_remote_decompose.py."""

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

import datapipe
from datapipe.remote import upload_dataset
from tests.datapipe.conftest import make_rows


class Recording(pafs.FileSystemHandler):
    """``LocalFileSystem``, with a log of the calls that change the store: ``(op, path relative to root)``."""

    def __init__(self, root: Path):
        self.fs, self.root, self.log = pafs.LocalFileSystem(), str(root), []

    def _note(self, op, path):
        self.log.append((op, path[len(self.root):].lstrip("/")))

    def get_type_name(self):
        return "recording"

    def equals(self, other):
        return other is self

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._note("delete_dir", path)
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._note("delete_dir_contents", path)
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise AssertionError("never called by an upload")

    def delete_file(self, path):
        self._note("delete_file", path)
        self.fs.delete_file(path)

    def move(self, src, dest):
        raise AssertionError("never called by an upload")

    def copy_file(self, src, dest):
        raise AssertionError("never called by an upload")

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._note("write", path)
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        raise AssertionError("never called by an upload")


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    rec = Recording(root)
    return rec, pafs.PyFileSystem(rec), root


def build(tmp_path, name, n, *, extra=None):
    out = datapipe.write_dataset(make_rows(n, seed=n), tmp_path / name, shard_rows=10)
    for rel, data in (extra or {}).items():  # files beside the dataset (a decomposition, say)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return out


def test_overwrite_order_manifest_first_out_last_in(store, tmp_path):
    rec, fs, root = store
    old = build(tmp_path, "old", 60, extra={"extra/a.bin": b"a", "extra/deep/b.bin": b"b"})
    upload_dataset(old, str(root), fs)
    assert rec.log[-1] == ("write", "manifest.json") and ("write", "extra/deep/b.bin") in rec.log
    rec.log.clear()

    new = build(tmp_path, "new", 30)
    upload_dataset(new, str(root), fs, overwrite=True)
    ops = rec.log
    assert ops[0] == ("delete_file", "manifest.json")  # before anything of the old version is replaced
    assert ops[-1] == ("write", "manifest.json")
    writes = [p for op, p in ops[1:-1] if op == "write"]
    assert sorted(writes) == ["index.arrow", "shards/00000.arrow", "shards/00001.arrow", "shards/00002.arrow"]
    deletes = [(op, p) for op, p in ops[1:-1] if op != "write"]
    # a directory the new version does not use goes whole; the other leftovers one by one, never all of a directory
    assert sorted(deletes) == [("delete_dir", "extra")] + [("delete_file", f"shards/0000{i}.arrow") for i in (3, 4, 5)]
    assert ops.index(deletes[0]) > max(ops.index(("write", w)) for w in writes)  # deletes after the new files
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "index.arrow", "manifest.json", "shards", "shards/00000.arrow", "shards/00001.arrow", "shards/00002.arrow"]
    ds = datapipe.ArrowDataset.open(str(root), filesystem=fs, cache_dir=tmp_path / "c")
    want = datapipe.ArrowDataset.open(new)
    assert len(ds) == 30 and ds.verify() == want.verify()
    assert np.array_equal(ds.__getitems__(np.arange(30))["input_ids"].values,
                          want.__getitems__(np.arange(30))["input_ids"].values)


def test_what_an_interrupted_upload_left_is_removed_and_nothing_is_deleted_without_overwrite(store, tmp_path):
    rec, fs, root = store
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "00009.arrow").write_bytes(b"half an upload")  # no manifest: an unfinished upload
    new = build(tmp_path, "new", 20)
    upload_dataset(new, str(root), fs)
    assert ("delete_file", "shards/00009.arrow") in rec.log and rec.log[-1] == ("write", "manifest.json")
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["00000.arrow", "00001.arrow"]
    rec.log.clear()
    with pytest.raises(datapipe.DatasetError, match=r"store: a dataset already exists \(pass overwrite=True"):
        upload_dataset(build(tmp_path, "other", 40), str(root), fs)
    assert rec.log == []  # refused before touching the store
    (new / "manifest.json").unlink()
    with pytest.raises(datapipe.DatasetError, match=r"new: no manifest.json to upload: the local build is unfinished"):
        upload_dataset(new, str(root), fs, overwrite=True)
    assert rec.log == [] and (root / "manifest.json").exists()  # the dataset in the store is untouched
