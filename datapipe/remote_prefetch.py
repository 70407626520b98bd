"""The prefetch thread of a remote dataset (``datapipe.remote_dataset.RemoteArrowDataset.prefetch_plan``): shards
downloaded into the cache in the order the batches will read them, a bounded number of bytes ahead."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from datapipe.remote_cache import ShardCache

__all__ = ["Wanted", "prefetch_loop"]

#: a shard to prefetch: ``(cache name, bytes, what (for messages), fetch(part path))``
Wanted = tuple[str, int, str, Callable[[Path], None]]


def prefetch_loop(cache: ShardCache, wanted: Iterable[Wanted], stop: threading.Event, timeout: float) -> None:
    """Download each ``wanted`` shard into ``cache`` in order, keeping at most ``cache.limit / 2`` bytes of shards
    not read yet ahead (a prefetched shard is never evicted by this loop before it was read); return when ``stop``
    is set or nothing is left. Errors are left to the reads (which retry and report them); the first is noted in
    ``cache.stats["prefetch_error"]``."""
    budget = None if cache.limit is None else cache.limit // 2
    ahead: deque[tuple[Path, int]] = deque()  # prefetched, maybe not read yet
    ahead_bytes = 0
    try:
        for name, size, what, fetch in wanted:
            if budget is not None and size > budget:
                continue
            path = cache.dir / name
            while True:
                if stop.is_set():
                    return
                while ahead and not ShardCache.unread(ahead[0][0]):  # read or evicted since
                    ahead_bytes -= ahead.popleft()[1]
                if budget is None or ahead_bytes + size <= budget:
                    break
                stop.wait(0.01)
            if path.exists():
                continue
            while not stop.is_set():
                before = cache.stats["prefetched"]
                cache.acquire(name, size, fetch, deadline=time.monotonic() + timeout, what=what, prefetch=True)
                if cache.stats["prefetched"] > before:
                    ahead.append((path, size))
                    ahead_bytes += size
                    break
                if path.exists():
                    break
                stop.wait(0.01)  # no room without evicting unread shards: wait for reads
    except Exception as e:  # noqa: BLE001  the reads retry and raise with context
        cache.stats["prefetch_error"] = str(e)
