"""Shared test helpers: exact resumption (after grain's ``assert_equal_output_after_checkpoint`` and torchdata's
``run_test_save_load_state``) and exactly-once checks across ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np


def to_plain(x):
    """Turn batches (tensors, arrays, dicts, lists) into nested Python/numpy values that compare with ==."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return ("tensor", str(x.dtype), tuple(x.shape), x.detach().cpu().numpy().tobytes())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, np.ndarray):
        return ("ndarray", str(x.dtype), x.shape, x.tobytes())
    if isinstance(x, dict) or hasattr(x, "keys") and hasattr(x, "__getitem__"):
        return {k: to_plain(x[k]) for k in x.keys()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


def assert_batches_equal(a: Iterable, b: Iterable, what: str = "") -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b), f"{what}: {len(a)} batches vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert to_plain(x) == to_plain(y), f"{what}: batch {i} differs"


def assert_sampler_resumes_exactly(make: Callable[[], object], *, epochs: int = 2, steps: Iterable[int] | None = None):
    """Save a sampler's state at every step of each epoch (and at the epoch's end), restore it into a fresh
    sampler, and check the rest of the epoch and the whole next epoch are identical to an uninterrupted run.

    Args:
        make: builds a fresh sampler with the same arguments.
        epochs: how many epochs to check (each resume also checks the epoch after it).
        steps: optional subset of steps to checkpoint at (default: every step).
    """
    ref = []
    s = make()
    for e in range(epochs + 1):
        s.set_epoch(e)
        ref.append([b.copy() for b in s])
        assert len(ref[-1]) == len(s), f"epoch {e}: yielded {len(ref[-1])} batches but len() is {len(s)}"
    for e in range(epochs):
        n = len(ref[e])
        for k in (range(n + 1) if steps is None else [k for k in steps if k <= n]):
            a = make()
            a.set_epoch(e)
            it = iter(a)
            for _ in range(k):
                next(it)
            state = a.state_dict()
            b = make()
            b.load_state_dict(state)
            rest = list(b)
            assert_batches_equal(rest, ref[e][k:], f"epoch {e}, resumed at step {k}")
            b.set_epoch(e + 1)
            assert_batches_equal(list(b), ref[e + 1], f"epoch {e + 1} after resuming epoch {e} at step {k}")


def assert_loader_resumes_exactly(make: Callable[[], object], *, epochs: int = 2, steps: Iterable[int] | None = None):
    """Like :func:`assert_sampler_resumes_exactly` for a ``datapipe.DataLoader``: the loader advances its epoch
    by itself at every new ``iter()``, so a run of ``epochs`` passes is compared with a run interrupted at
    every global step ``k`` (across epoch boundaries), checkpointed, and resumed in a fresh loader."""
    loader = make()
    ref, per_epoch = [], []
    for _ in range(epochs):
        got = list(loader)
        per_epoch.append(len(got))
        ref.extend(got)
    total = len(ref)
    for k in (range(total + 1) if steps is None else [k for k in steps if k <= total]):
        a = make()
        consumed = 0
        while consumed < k:
            for _batch in a:
                consumed += 1
                if consumed == k:
                    break
        state = a.state_dict()
        del a
        b = make()
        b.load_state_dict(state)
        rest = []
        while len(rest) < total - k:
            got = list(b)
            assert got or total - k == 0, f"resumed at {k}: an epoch yielded nothing"
            rest.extend(got)
        assert_batches_equal(rest, ref[k:], f"loader resumed at global step {k}")


def assert_exactly_once(batches_per_rank: list[list[np.ndarray]], num_rows: int, dropped: int = 0) -> None:
    """Every row appears once over all ranks (except ``dropped`` rows), and ranks yield equal batch counts."""
    counts = {len(b) for b in batches_per_rank}
    assert len(counts) == 1, f"ranks yield different batch counts: {[len(b) for b in batches_per_rank]}"
    allrows = np.concatenate([np.concatenate(b) if b else np.zeros(0, np.int64) for b in batches_per_rank])
    assert allrows.dtype == np.int64
    assert len(np.unique(allrows)) == len(allrows), "a row appears twice"
    assert len(allrows) == num_rows - dropped, f"{len(allrows)} rows seen, expected {num_rows - dropped}"
    assert allrows.min(initial=0) >= 0 and allrows.max(initial=-1) < num_rows


def free_port() -> int:
    """A free TCP port on loopback, for a test's torch.distributed rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks_with_queue(target, world_size: int = 2, timeout: float = 120):
    """Start ``world_size`` spawned processes ``target(rank, world_size, port, queue)`` (a real gloo group is the
    target's to make), return the first object put on the queue, and check every process exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world_size, port, q)) for r in range(world_size)]
    for p in procs:
        p.start()
    got = q.get(timeout=timeout)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    return got


def elastic_resume(make: Callable[[int, int], object], old: int, new: int, *, epoch: int = 1, share: int = 3,
                   state_rank: int = 1):
    """Run ``old`` ranks of ``make(rank, world_size)`` for ``1/share`` of ``epoch``, then resume ``new`` ranks from
    one old rank's state and run them to the end of the epoch. Returns ``(olds, news, consumed, rest)``: the old
    and new samplers, the batches the old ranks delivered, and each new rank's batches."""
    olds = [make(r, old) for r in range(old)]
    for s in olds:
        s.set_epoch(epoch)
    k = len(olds[0]) // share
    consumed = []
    for s in olds:
        it = iter(s)
        consumed += [next(it) for _ in range(k)]
    state = olds[state_rank % old].state_dict()  # any rank's state: they agree on everything but the rank
    news = [make(r, new) for r in range(new)]
    for s in news:
        s.load_state_dict(state)
    return olds, news, consumed, [list(s) for s in news]


# ---- windowed plans against the base class's materialised plan -------------------------------------------------
def materialised(s, epoch: int, segments: tuple = ()):
    """The base class's materialised plan of sampler ``s`` at ``epoch`` after elastic ``segments``: ``(global plan,
    this rank's batches as lists)`` (``_build_plan`` + even_out / group_steps / regroup_in_order)."""
    from samplers.base import BatchSamplerBase

    s._position(epoch, 0, segments)
    glob, mine = BatchSamplerBase._plans(s)
    return glob, [mine.indices[mine.offsets[b]:mine.offsets[b + 1]].tolist() for b in range(mine.num_batches)]


def elastic_segments(make: Callable[[int, int], object], epoch: int, cut) -> tuple:
    """A valid chain of elastic segments ``((w, batches per rank consumed), ...)`` from ``cut`` (``(w, k)`` pairs,
    ``k`` clipped to the epoch's length at that point)."""
    segments: list = []
    for w_old, k in cut:
        s0 = make(0, w_old)
        s0._position(epoch, 0, tuple(segments))
        segments.append((w_old, min(k, len(s0))))
    return tuple(segments)


def lazy_plan_ranks(make: Callable[[int, int], object], world_size: int, epoch: int, segments: tuple = ()):
    """Each rank's sampler and batches of the lazily computed plan, each checked equal to the materialised plan
    (:func:`materialised`). Returns ``[(sampler, global plan, batches), ...]``."""
    out = []
    for r in range(world_size):
        s = make(r, world_size)
        glob, want = materialised(s, epoch, segments)
        s._position(epoch, 0, segments)
        got = [np.asarray(b).tolist() for b in s]
        assert got == want and len(s) == len(want)
        out.append((s, glob, got))
    return out


def assert_every_row_accounted(make: Callable[[int, int], object], world_size: int, epoch: int, seen: list,
                               num_rows: int, reason: str, dropped_for_reason: int) -> None:
    """Rows seen once at most, and the rows seen plus the rows ``stats()`` reports dropped *for that epoch* are all
    ``num_rows`` (an epoch's uneven tail may differ from another epoch's)."""
    assert len(seen) == len(set(seen))
    s0 = make(0, world_size)
    s0.set_epoch(epoch)
    st_ = s0.stats()
    assert len(seen) + st_["dropped_rows"] == num_rows
    assert st_["dropped"].get(reason, 0) == dropped_for_reason
