import gc
import random
import threading
import time

import numpy as np
import pytest
import torch

from datapipe import collate
from datapipe.prefetch import DevicePrefetcher, PinnedPool, ThreadPrefetcher, in_prefetch_thread, pin


def test_results_come_in_source_order_whatever_the_finish_order():
    rng = random.Random(0)
    delays = [rng.random() * 0.004 for _ in range(40)]

    def fetch(i):
        time.sleep(delays[i])  # later items often finish first
        return i * i

    assert list(ThreadPrefetcher(fetch, range(40), depth=4, num_threads=3)) == [i * i for i in range(40)]


def test_fetch_runs_on_pool_threads_and_kernels_there_run_serially():
    seen = []
    out = list(ThreadPrefetcher(lambda i: seen.append((threading.get_ident(), in_prefetch_thread())) or i, range(5)))
    assert out == list(range(5))
    assert all(flag for _, flag in seen) and threading.get_ident() not in {t for t, _ in seen}
    assert not in_prefetch_thread()


def test_an_error_is_raised_at_its_item_and_iteration_goes_on():
    def fetch(i):
        if i in (2, 5):
            raise KeyError(f"bad {i}")
        return i

    it = ThreadPrefetcher(fetch, range(7), depth=3)
    got = []
    for _ in range(7):
        try:
            got.append(next(it))
        except KeyError as e:
            got.append(str(e))
    assert got == [0, 1, "'bad 2'", 3, 4, "'bad 5'", 6]
    with pytest.raises(StopIteration):
        next(it)


def test_a_failing_source_raises_after_the_items_before_it():
    def source():
        yield from range(3)
        raise RuntimeError("sampler broke")

    it = ThreadPrefetcher(lambda i: i, source(), depth=5)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="sampler broke"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_depth_bounds_the_items_pulled_ahead_and_close_drops_them():
    pulled, fetched = [], []
    gate = threading.Event()

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    def fetch(i):
        if i > 0:
            gate.wait(10)  # item 1 blocks the only thread; items 2 and 3 wait in the queue
        fetched.append(i)
        return i

    it = ThreadPrefetcher(fetch, source(), depth=3, num_threads=1)
    assert next(it) == 0
    assert pulled == [0, 1, 2, 3]  # the delivered item and 3 ahead
    threading.Timer(0.05, gate.set).start()
    it.close()  # the running fetch finishes, the queued ones are dropped
    assert fetched == [0, 1] and pulled == [0, 1, 2, 3]
    with pytest.raises(StopIteration):
        next(it)
    assert not [t for t in threading.enumerate() if t.name.startswith("datapipe-prefetch")]


@pytest.mark.parametrize("kwargs, match", [({"depth": 0}, "depth must be"), ({"num_threads": 0}, "num_threads must"),
                                          ({"depth": 1.5}, "depth must be")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThreadPrefetcher(lambda i: i, [], **kwargs)


def test_gives_the_same_batches_as_the_plain_loop(small_ds):
    f = collate.packed()
    idx = [np.arange(i, i + 9) for i in range(0, 90, 9)]
    with ThreadPrefetcher(lambda rows: f(small_ds.__getitems__(rows)), idx, depth=3, num_threads=2) as it:
        got = list(it)
    for rows, out in zip(idx, got, strict=True):
        ref = f(small_ds.__getitems__(rows))
        for k in ("input_ids", "position_ids", "labels", "cu_seqlens"):
            assert torch.equal(out[k], ref[k])


def test_pin_is_a_no_op_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: pin copies")
    b = {"x": torch.arange(3)}
    assert pin(b) is b


def test_pinned_pool_recycles_a_buffer_only_when_every_view_is_gone():
    made = []

    def allocate(n):
        made.append(n)
        return torch.empty(n, dtype=torch.uint8)

    pool = PinnedPool(allocate=allocate)
    batch = {"ids": torch.arange(12).view(3, 4), "meta": ["a"], "pair": (torch.ones(2, dtype=torch.int32), 7)}
    out = pin(batch, pool=pool)
    assert torch.equal(out["ids"], batch["ids"]) and out["ids"].dtype == torch.int64 and out["meta"] == ["a"]
    assert out["pair"][1] == 7 and torch.equal(out["pair"][0], batch["pair"][0])
    assert made == [96, 8]
    keep = out["ids"][1:]  # a view keeps the buffer out of the pool
    del out
    gc.collect()
    assert pool.idle_bytes == 8
    again = pin(batch, pool=pool)
    assert made == [96, 8, 96]  # the int64 [3, 4] buffer was still in use: a new one
    assert torch.equal(keep, torch.arange(4, 12).view(2, 4))
    del again, keep
    gc.collect()
    pin(batch, pool=pool)
    assert made == [96, 8, 96]  # now both came back and are reused


def test_device_prefetcher_copies_one_step_ahead_on_cpu():
    pulled = []

    def source():
        for i in range(4):
            pulled.append(i)
            yield {"x": torch.full((2,), i), "n": i}

    it = DevicePrefetcher(source(), "cpu")
    first = next(it)
    assert first["n"] == 0 and pulled == [0, 1]
    rest = list(it)
    assert [b["n"] for b in rest] == [1, 2, 3] and all(b["x"].device.type == "cpu" for b in rest)
    assert torch.equal(rest[-1]["x"], torch.full((2,), 3))


def test_device_prefetcher_raises_a_source_error_in_order_and_keeps_len():
    def source():
        yield {"x": torch.zeros(1)}
        raise OSError("shard gone")

    it = DevicePrefetcher(source(), torch.device("cpu"))
    assert torch.equal(next(it)["x"], torch.zeros(1))
    with pytest.raises(OSError, match="shard gone"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert len(DevicePrefetcher([1, 2, 3], "cpu")) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pin_and_device_prefetch():
    batches = [{"ids": torch.arange(i, i + 1000)} for i in range(5)]
    pinned = [pin(b) for b in batches]
    assert all(p["ids"].is_pinned() for p in pinned)
    out = list(DevicePrefetcher(iter(pinned), "cuda"))
    assert all(o["ids"].is_cuda and torch.equal(o["ids"].cpu(), b["ids"]) for o, b in zip(out, batches))
