"""``datapipe.urls``: which locations are read through a ``pyarrow.fs`` filesystem, ``file://`` URLs, resolution,
and the opener registry (the opener itself is tested in test_remote.py, in a fresh interpreter)."""

from pathlib import Path

import pyarrow.fs as pafs
import pytest

import datapipe
from datapipe import urls


@pytest.mark.parametrize("location, filesystem, remote", [
    ("s3://bkt/ds", None, True),
    ("GS://bkt/ds", None, True),
    ("hdfs://host:8020/ds", None, True),
    ("file:///tmp/ds", None, False),
    ("/tmp/ds", None, False),
    ("relative/ds", None, False),
    (Path("/tmp/ds"), None, False),
    ("/tmp/ds", pafs.LocalFileSystem(), True),
    ("file:///tmp/ds", pafs.LocalFileSystem(), True),
])
def test_is_remote(location, filesystem, remote):
    assert urls.is_remote(location, filesystem) is remote


def test_scheme_and_local_path():
    assert urls.scheme("S3://bkt/ds") == "s3" and urls.scheme("/tmp/a://b") is None and urls.scheme("ds") is None
    assert urls.local_path("file:///tmp/ds") == "/tmp/ds"
    assert urls.local_path("s3://bkt/ds") == "s3://bkt/ds"
    assert urls.local_path(Path("/tmp/ds")) == Path("/tmp/ds")


def test_resolve():
    fs = pafs.LocalFileSystem()
    assert urls.resolve("s3://bkt/ds/", fs) == (fs, "bkt/ds")  # with a filesystem the scheme is dropped
    got, path = urls.resolve("file:///tmp/ds/")
    assert isinstance(got, pafs.LocalFileSystem) and path == "/tmp/ds"
    assert urls.join_key("bkt/ds", "manifest.json") == "bkt/ds/manifest.json" and urls.join_key("", "x") == "x"
    with pytest.raises(TypeError, match="filesystem must be a pyarrow.fs.FileSystem"):
        urls.resolve("s3://bkt/ds", "s3")
    with pytest.raises(datapipe.DatasetError, match=r"nope://x: cannot resolve the URL .*pass filesystem="):
        urls.resolve("nope://x")


def test_register_remote_opener_refuses_what_it_cannot_call():
    with pytest.raises(TypeError, match="opener must be callable"):
        urls.register_remote_opener("datapipe.remote.RemoteArrowDataset")
