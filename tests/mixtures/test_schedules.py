"""Domain-weight schedules (Blakeney et al., 2024 domain up-sampling; RegMix mixtures as dicts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtures.schedules import Constant, DomainUpsampling, Linear, Piecewise, plot, start_step

BASE = {"web": 0.7, "code": 0.2, "math": 0.1}
UP = {"web": 0.3, "code": 0.3, "math": 0.4}


def all_schedules():
    return [
        Constant(BASE),
        Piecewise([(0.0, BASE), (0.5, {"web": 1.0}), (0.75, UP)]),
        DomainUpsampling(BASE, UP, final_fraction=0.2),
        Linear(BASE, UP, start_fraction=0.1, end_fraction=0.9),
    ]


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("total", [1, 7, 100, 1001])
def test_weights_are_float64_non_negative_sum_to_one_and_pure(sched, total):
    assert sched.domains == ("web", "code", "math")
    for step in sorted({0, total // 3, total // 2, total - 1}):
        w = sched.weights_at(step, total)
        assert w.dtype == np.float64 and w.shape == (3,)
        assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-12
        w[:] = 0  # the caller owns the array: mutating it changes nothing
        np.testing.assert_array_equal(sched.weights_at(step, total), sched.weights_at(step, total))
        assert sched.weights_at(step, total).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("total", [1, 3, 10, 99, 100, 101, 1000, 12345])
@pytest.mark.parametrize("final", [0.1, 0.15, 0.2, 0.3])
def test_domain_upsampling_switches_exactly_at_the_phase_step(total, final):
    s = DomainUpsampling(BASE, UP, final_fraction=final)
    switch = math.ceil(round((1 - final) * total, 9))
    assert start_step(1 - final, total) == switch
    base = np.array([0.7, 0.2, 0.1])
    up = np.array([0.3, 0.3, 0.4])
    for step in {0, switch - 1, switch, total - 1}:
        if 0 <= step < total:
            np.testing.assert_allclose(s.weights_at(step, total), base if step < switch else up)
    assert sum(np.allclose(s.weights_at(k, total), up) for k in range(total)) == total - switch


def test_start_step_is_ceil_without_float_noise():
    assert start_step(0.9, 100) == 90  # 0.9 * 100 = 90.00000000000001 in floats
    assert start_step(0.7, 10) == 7
    assert start_step(0.25, 10) == 3
    assert start_step(0.0, 10) == 0


def test_piecewise_phase_lookup_and_omitted_domains():
    s = Piecewise([(0.0, BASE), (0.5, {"web": 1.0}), (0.75, UP)])
    assert s.phase_starts(8) == [0, 4, 6]
    assert [s.phase_at(k, 8) for k in range(8)] == [0, 0, 0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(s.weights_at(4, 8), [1.0, 0.0, 0.0])


def test_linear_interpolates_between_fractions():
    s = Linear(BASE, UP, start_fraction=0.2, end_fraction=0.6)
    np.testing.assert_allclose(s.weights_at(0, 10), [0.7, 0.2, 0.1])
    np.testing.assert_allclose(s.weights_at(2, 10), [0.7, 0.2, 0.1])
    np.testing.assert_allclose(s.weights_at(4, 10), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(s.weights_at(6, 10), [0.3, 0.3, 0.4])
    np.testing.assert_allclose(s.weights_at(9, 10), [0.3, 0.3, 0.4])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6).filter(lambda v: sum(v) > 1e-3),
       st.floats(0.01, 0.99), st.integers(1, 5000), st.data())
def test_property_schedules_sum_to_one(raw, final, total, data):
    names = [f"d{i}" for i in range(len(raw))]
    base = dict(zip(names, np.array(raw) / sum(raw)))
    up = dict(zip(names, np.roll(np.array(raw) / sum(raw), 1)))
    step = data.draw(st.integers(0, total - 1))
    for s in (DomainUpsampling(base, up, final), Linear(base, up), Constant(base)):
        w = s.weights_at(step, total)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9


@pytest.mark.parametrize("make, match", [
    (lambda: Constant({"a": 0.5, "b": 0.4}), "must sum to 1"),
    (lambda: Constant({"a": 1.2, "b": -0.2}), "finite and >= 0"),
    (lambda: Constant({"a": float("nan"), "b": 1.0}), "finite and >= 0"),
    (lambda: Constant({}), "non-empty dict"),
    (lambda: DomainUpsampling(BASE, {"web": 0.5, "books": 0.5}), "unknown domains"),
    (lambda: DomainUpsampling(BASE, {"web": 0.5, "code": 0.4}), "must sum to 1"),
    (lambda: DomainUpsampling(BASE, UP, final_fraction=0.0), "final_fraction"),
    (lambda: DomainUpsampling(BASE, UP, final_fraction=1.0), "final_fraction"),
    (lambda: Piecewise([(0.1, BASE)]), "first phase must start at 0.0"),
    (lambda: Piecewise([(0.0, BASE), (0.5, UP), (0.4, UP)]), "increase strictly"),
    (lambda: Piecewise([(0.0, BASE), (1.0, UP)]), "increase strictly"),
    (lambda: Linear(BASE, UP, start_fraction=0.5, end_fraction=0.5), "start_fraction"),
    (lambda: Linear(BASE, {"other": 1.0}), "unknown domains"),
])
def test_bad_schedules(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("step, total", [(-1, 10), (10, 10), (0, 0), (1.5, 10)])
def test_bad_steps(step, total):
    with pytest.raises(ValueError, match="step"):
        Constant(BASE).weights_at(step, total)


def test_plot_writes_an_image(tmp_path):
    path = tmp_path / "schedule.png"
    plot(DomainUpsampling(BASE, UP, final_fraction=0.2), 1000, path)
    assert path.stat().st_size > 1000
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_constant_from_json(tmp_path):
    import json

    p = tmp_path / "best.json"
    p.write_text(json.dumps({"weights": {"web": 0.6, "code": 0.3999}, "target": "metric/x", "n": 10}))
    sched = Constant.from_json(p)  # RegMix search output; rounded weights within 1e-3 are renormalised
    assert sched.domains == ("web", "code")
    np.testing.assert_allclose(sched.weights_at(0, 5), [0.6 / 0.9999, 0.3999 / 0.9999])
    p.write_text(json.dumps(BASE))  # a bare object domain -> weight
    assert Constant.from_json(p).weights_dict(3, 5) == pytest.approx(BASE)
    for text, match in [("{not json", r"best\.json: line 1: not JSON"), ("[1, 2]", "expected a JSON object"),
                        (json.dumps({"a": 0.5, "b": 0.2}), r"best\.json: weights must sum to 1"),
                        (json.dumps({"a": "x"}), "must be a number"),
                        (json.dumps({"a": 1.2, "b": -0.2}), r"weights\['b'\] must be finite and >= 0")]:
        p.write_text(text)
        with pytest.raises(ValueError, match=match):
            Constant.from_json(p)
