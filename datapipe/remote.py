"""Datasets on object storage: URL resolution, a bounded on-disk shard cache, plan-ordered prefetch, retries.

``ArrowDataset.open("s3://bucket/ds", filesystem=..., cache_dir=..., cache_limit=...)`` returns a
:class:`RemoteArrowDataset`: the manifest and ``index.arrow`` (small) are read from the store into memory; payload
shards are downloaded on demand into ``cache_dir`` and memory-mapped from there.

* **Bound**: the files in ``cache_dir`` (partial downloads included: a download first reserves its full size as a
  sparse ``.part`` file) never add up to more than ``cache_limit`` bytes. Room is made by evicting the least
  recently used shard that no reader holds. The cache is shared by every process on the node that uses the same
  ``cache_dir`` (DataLoader workers included): a ``flock`` on ``cache_dir/.lock`` serialises the bookkeeping, and
  a reader holds a shared ``flock`` on the shard it reads, so an evictor never deletes a shard being read.
* **Open shards**: a process keeps the shards it reads open, memory-mapped from the cache; the map holds the
  reader's shared ``flock``, so a mapped file is never evicted, and it stays counted until the last batch that
  reads it is gone. They are gathered by the local dataset's kernels (a warm cache reads at the local copy's
  speed), within a budget (``keep_open``; default ``cache_limit / 2`` shared by the DataLoader workers, or every
  shard when the cache is unbounded) so that the rest of the cache still turns over.
* **Streaming**: the shards of a batch beyond that budget have their rows copied out and are released at once;
  when no room can be made (the cache is smaller than one shard, or every cached shard is pinned), the shard is
  read into memory instead, its rows taken, and the bytes dropped: the bound still holds when the cache is smaller
  than the shards one batch touches, and one batch never needs all its shards on disk at once.
* **Checksums** are checked on arrival against the manifest (the bytes are hashed as they are downloaded).
* **Retries**: transient errors (connection refused, timeouts, 5xx) are retried with exponential backoff until
  ``timeout`` seconds have passed, then a :class:`DatasetError` names the object and the store; a missing object
  fails at once. Every wait is bounded: a store that is down never hangs a reader.
* **Prefetch**: :meth:`RemoteArrowDataset.prefetch_plan` walks the batches the sampler will request on a
  background thread and downloads their shards ahead, in plan order, never more than ``cache_limit / 2`` bytes
  of not-yet-read shards ahead. A prefetched shard is marked "not read yet" (a modification time in the far
  future) so LRU eviction takes it last; the first read stamps it with the current time.
* **Pickling** (spawned DataLoader workers) carries the URL, the filesystem's configuration, the manifest and the
  cache settings, never an open handle.

``write_dataset`` and ``decompose`` accept a URL too: the files are built in a local temporary directory and
uploaded (manifest last, after the previous manifest was removed: readers never see a half-uploaded dataset as
data). See :func:`upload_dataset`.

Note for S3-compatible servers that do not accept the AWS SDK's streaming checksums on uploads (``rclone serve
s3`` answers HTTP 411): set ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` before creating the filesystem.

The code is split by job; this module re-exports the public names of all of them:

* :mod:`datapipe.urls`: URLs, filesystem resolution, and the opener ``ArrowDataset.open`` calls for a URL;
* :mod:`datapipe.remote_io`: retries with backoff, whole-object reads, downloads checked on arrival;
* :mod:`datapipe.remote_cache`: :class:`ShardCache`, the bounded LRU cache shared through ``flock``;
* :mod:`datapipe.remote_dataset`: :class:`RemoteArrowDataset`;
* :mod:`datapipe.remote_upload`: :func:`upload_dataset`, :func:`write_remote`, :func:`remote_exists`.
"""

from __future__ import annotations

from datapipe.remote_cache import ShardCache
from datapipe.remote_dataset import RemoteArrowDataset
from datapipe.remote_io import DEFAULT_TIMEOUT, read_object, with_retries
from datapipe.remote_upload import remote_exists, upload_dataset, write_remote
from datapipe.urls import is_remote, join_key, local_path, resolve

__all__ = ["DEFAULT_TIMEOUT", "RemoteArrowDataset", "ShardCache", "is_remote", "join_key", "local_path",
           "read_object", "remote_exists", "resolve", "upload_dataset", "with_retries", "write_remote"]
