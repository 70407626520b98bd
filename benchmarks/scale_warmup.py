"""bench_scale's warm-up: each sampler's kernels compiled on a tiny input of the case's dtypes, through both its exact
and its windowed path, so a case measures its plan, not the JIT (nor numba's own memory)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

KW = dict(seed=1, rank=3, world_size=8)
#: the ``shaped`` kind's domains and their shares of the rows
SHAPED_SHARES = {"web": 0.4, "code": 0.4, "math": 0.2}


def read_only(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)  # typed as the read-only memory maps of the cases are


def both_paths(module, build, threshold: str = "EXACT_MAX_ROWS") -> None:
    """The first batch of ``build()`` with ``module.<threshold>`` at 0 (windowed) and at 2**62 (exact); restored."""
    saved = getattr(module, threshold)
    try:
        for limit in (0, 1 << 62):
            setattr(module, threshold, limit)
            next(iter(build()))
    finally:
        setattr(module, threshold, saved)


def _durations(n: int = 5000) -> np.ndarray:
    d = (np.arange(n, dtype=np.float32) % 30 + 1).astype(np.float32)
    read_only(d)
    return d


def _random():
    import samplers
    import samplers.random as sr

    both_paths(sr, lambda: samplers.RandomBatchSampler(5000, 64, **KW))


def _token_budget():
    import samplers
    import samplers.token_budget as tb

    lengths = np.arange(5000, dtype=np.int32) % 300 + 1
    read_only(lengths)
    both_paths(tb, lambda: samplers.TokenBudgetBatchSampler(lengths, max_tokens=4096, **KW))


def _topic():
    import samplers
    import samplers.topic_aware as ta

    ids = (np.arange(5000) % 37).astype(np.int32)
    read_only(ids)
    both_paths(ta, lambda: samplers.TopicAwareBatchSampler(ids, batch_size=64, **KW))


def _packed():
    import samplers
    import samplers.packing as sp

    d = _durations()
    both_paths(sp, lambda: samplers.PackedDurationSampler(d, max_duration=600.0, **KW))


def _duration(two_d: bool):
    import samplers
    import samplers.duration as sd

    d = _durations()
    tok = None
    if two_d:
        tok = (np.arange(5000, dtype=np.int32) % 97 + 1).astype(np.int32)
        read_only(tok)
    both_paths(sd, lambda: samplers.DurationBucketSampler(d, max_duration=600.0, num_buckets=30, output_lengths=tok,
                                                          **KW))


def _shaped():
    import samplers
    import samplers.shaped_scale as ssc
    from mixtures.schedules import Constant

    lengths = [(np.arange(3000, dtype=np.int32) * (d + 7)) % 500 + 1 for d in range(3)]
    read_only(*lengths)
    both_paths(ssc, lambda: samplers.ShapedMixtureBatchSampler.from_lengths(
        lengths, Constant(SHAPED_SHARES), max_tokens=4096, total_steps=100, **KW))


def _decomposed():
    import samplers
    import samplers.decomposed as sdec

    log2 = (np.arange(20000) % 6 + 8).astype(np.int8)
    read_only(log2)
    index = SimpleNamespace(sequence_log2=log2, max_log2=13)
    both_paths(sdec, lambda: samplers.DecomposedBatchSampler(index, tokens_per_batch=2**17, **KW),
               threshold="EXACT_MAX_SEQUENCES")


WARM_UPS = {"random": _random, "token_budget": _token_budget, "topic": _topic, "packed": _packed,
            "duration": lambda: _duration(False), "duration2d": lambda: _duration(True), "shaped": _shaped,
            "decomposed": _decomposed}


def warm_up(kind: str) -> None:
    """Compile ``kind``'s kernels (both paths) on a tiny input before its case is timed."""
    if kind.startswith("ngame"):
        from scale_ngame import warm_up_ngame

        warm_up_ngame(kind)
    elif kind == "topic_pairs":
        from scale_topic_pairs import warm_up_topic_pairs

        warm_up_topic_pairs()
    else:
        WARM_UPS[kind]()
