"""calibrate_batch_sizes (the OOMptimizer search) against probes that model a memory limit on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import DurationBucketSampler, calibrate_batch_sizes
from samplers.calibrate import BatchShape, BatchShape2D


class ModelledMemory:
    """A probe whose batch fits while ``batch_size * per_example(shape) + fixed <= budget``; it raises the
    given error otherwise, and records every call."""

    def __init__(self, budget: float, fixed: float = 0.0, error=MemoryError, quad: float = 30.0):
        self.budget, self.fixed, self.error, self.quad = budget, fixed, error, quad
        self.calls: list = []

    def per_example(self, shape) -> float:
        mem = shape.duration * (1 + shape.duration / self.quad)  # activations grow ~quadratically (attention)
        if isinstance(shape, BatchShape2D):
            mem += 0.2 * shape.tokens
        return mem

    def limit(self, shape) -> int:
        return int((self.budget - self.fixed) // self.per_example(shape))

    def __call__(self, shape) -> None:
        self.calls.append(shape)
        if shape.batch_size * self.per_example(shape) + self.fixed > self.budget:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")


@settings(max_examples=40, deadline=None)
@given(st.floats(200, 1e6), st.integers(1, 8), st.sampled_from([0.01, 0.05, 0.2]), st.integers(1, 300),
       st.integers(0, 2**31))
def test_finds_the_true_limit_within_tolerance(budget, nbins, tolerance, start, seed):
    bins = np.sort(np.random.default_rng(seed).uniform(0.5, 40, nbins)).tolist()
    probe = ModelledMemory(budget)
    truth = [min(probe.limit(BatchShape(1, b)), 1 << 20) for b in bins]  # capped by max_batch_size
    if min(truth) < 1:
        with pytest.raises(ValueError, match="even a batch of 1 runs out of memory"):
            calibrate_batch_sizes(probe, bins, start=start, tolerance=tolerance)
        return
    got = calibrate_batch_sizes(probe, bins, start=start, tolerance=tolerance)
    assert len(got) == len(bins)
    for g, t in zip(got, truth):
        assert 1 <= g <= t, (g, t)
        assert g >= (1 - tolerance) * t or t - g <= 1, (g, t)
    assert got == sorted(got, reverse=True)  # larger shapes, smaller batches


def test_largest_bucket_first_then_reuses_the_result():
    probe = ModelledMemory(10_000)
    bins = [2.0, 10.0, 35.0]
    got = calibrate_batch_sizes(probe, bins, start=32, tolerance=0.05)
    assert probe.calls[0] == BatchShape(32, 35.0)
    assert [c.duration for c in probe.calls] == sorted((c.duration for c in probe.calls), reverse=True)
    first_small = next(c for c in probe.calls if c.duration == 10.0)
    assert first_small.batch_size == got[2]  # a smaller bucket starts from the larger bucket's size
    # fewer probes than one per batch size (doubling + bisection)
    assert len(probe.calls) < 60


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, MemoryError])
def test_torch_oom_and_memory_error_are_caught(error):
    probe = ModelledMemory(5_000, fixed=1_000, error=error)
    got = calibrate_batch_sizes(probe, [5.0, 20.0])
    assert got[0] >= 0.95 * probe.limit(BatchShape(1, 5.0))


def test_other_errors_propagate():
    def probe(shape):
        raise KeyError("bug in the model")

    with pytest.raises(KeyError, match="bug in the model"):
        calibrate_batch_sizes(probe, [1.0])


def test_2d_bins_give_2d_shapes():
    probe = ModelledMemory(20_000)
    bins = [(5.0, 20), (5.0, 60), (20.0, 80), (20.0, 200)]
    got = calibrate_batch_sizes(probe, bins, tolerance=0.02)
    assert all(isinstance(c, BatchShape2D) for c in probe.calls)
    for g, b in zip(got, bins):
        t = probe.limit(BatchShape2D(1, *b))
        assert 0.98 * t <= g <= t


def test_never_oom_stops_at_max_batch_size():
    assert calibrate_batch_sizes(lambda s: None, [1.0, 2.0], max_batch_size=1000) == [1000, 1000]


@pytest.mark.parametrize("kw, match", [(dict(start=0), "start must be"), (dict(tolerance=1.5), "tolerance"),
                                       (dict(max_batch_size=0), "max_batch_size")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        calibrate_batch_sizes(lambda s: None, [1.0], **kw)


def test_bad_bins():
    with pytest.raises(ValueError, match=r"bins\[1\] must be a duration > 0"):
        calibrate_batch_sizes(lambda s: None, [1.0, -2.0])
    with pytest.raises(TypeError, match=r"bins\[0\]"):
        calibrate_batch_sizes(lambda s: None, [object()])
    assert calibrate_batch_sizes(lambda s: None, []) == []


def test_sizes_feed_the_sampler():
    rng = np.random.default_rng(0)
    d = rng.uniform(1, 30, 3000)
    shapes_from = DurationBucketSampler(d, max_duration=600.0, num_buckets=8)
    probe = ModelledMemory(3_000)
    sizes = calibrate_batch_sizes(probe, shapes_from.bucket_shapes)
    s = DurationBucketSampler(d, max_duration=None, bucket_bins=shapes_from.bins, bucket_batch_sizes=sizes)
    for b in s:  # every real batch fits the modelled memory
        probe(BatchShape(len(b), float(d[b].max())))
    short = s.stats()["batches_per_bucket"]
    assert sum(short) == len(s)
