"""Counting passes of windowed samplers kept on disk: a resume in a fresh interpreter skips the pass, a stale entry
is refused (issue 15: a resume reaches its first batch within seconds at 1e9 rows)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import samplers, samplers.token_budget as tb, samplers.duration as du, samplers.duration_windowed as dw
    tb.EXACT_MAX_ROWS = du.EXACT_MAX_ROWS = 1000   # windowed plans on a small file
    kind, path, mode, out = sys.argv[1:5]
    if mode == "resume":  # the counting kernels must not run: the pass comes from the disk cache
        def refuse(*a, **k):
            raise AssertionError("counting pass recomputed")
        tb.window_sizes = dw.duration_window_sizes = refuse
    meta = np.load(path, mmap_mode="r")
    kw = dict(seed=3, rank=1, world_size=2)
    if kind == "token_budget":
        s = samplers.TokenBudgetBatchSampler(meta, max_tokens=4096, **kw)
    else:
        s = samplers.DurationBucketSampler(meta, max_duration=60.0, num_buckets=6, **kw)
    assert s.windowed
    if mode == "first":
        it = iter(s)
        for _ in range(5):
            next(it)
        state = s.state_dict()
        json.dump({"state": state, "next": next(it).tolist()}, open(out, "w"))
    else:
        saved = json.load(open(out))
        s.load_state_dict(saved["state"])
        got = next(iter(s)).tolist()
        assert got == saved["next"], (got, saved["next"])
        print("RESUMED", len(got))
""")


def run(kind, path, mode, out, cache, check=True):
    env = {**os.environ, "DATAPIPE_PLAN_CACHE": str(cache), "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", SCRIPT, kind, str(path), mode, str(out)], env=env,
                          capture_output=True, text=True, timeout=300, check=check)


def metadata(tmp_path, kind, n=40_000):
    rng = np.random.default_rng(0)
    if kind == "token_budget":
        arr = (np.minimum(rng.lognormal(5.0, 1.0, n), 4000) + 1).astype(np.int32)
    else:
        arr = np.clip(rng.lognormal(1.5, 0.6, n), 0.5, 30.0).astype(np.float32)
    path = tmp_path / f"{kind}.npy"
    np.save(path, arr)
    return path


@pytest.mark.parametrize("kind", ["token_budget", "duration"])
def test_a_fresh_process_resumes_from_the_cached_counting_pass(tmp_path, kind):
    path, out, cache = metadata(tmp_path, kind), tmp_path / "state.json", tmp_path / "cache"
    run(kind, path, "first", out, cache)
    assert any(cache.glob(f"{kind}-*.npz")), "the first process left no counting pass on disk"
    r = run(kind, path, "resume", out, cache)
    assert "RESUMED" in r.stdout


@pytest.mark.parametrize("kind", ["token_budget", "duration"])
def test_a_file_rewritten_with_the_same_size_and_time_is_counted_again(tmp_path, kind):
    path, out, cache = metadata(tmp_path, kind), tmp_path / "state.json", tmp_path / "cache"
    run(kind, path, "first", out, cache)
    st = os.stat(path)
    mm = np.load(path, mmap_mode="r+")
    mm[:] = np.roll(np.asarray(mm), 7)  # other values, same size
    mm.flush()
    del mm
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same modification time
    r = run(kind, path, "resume", out, cache, check=False)  # the cached pass must not be used
    assert r.returncode != 0 and "counting pass recomputed" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("kind", ["token_budget", "duration"])
def test_a_damaged_cache_entry_is_refused_and_removed(tmp_path, kind):
    path, out, cache = metadata(tmp_path, kind), tmp_path / "state.json", tmp_path / "cache"
    run(kind, path, "first", out, cache)
    (entry,) = [p for p in cache.glob(f"{kind}-*.npz")]
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files}
    col = "by_window" if kind == "token_budget" else "size"
    sizes = arrays[col]
    i = int(np.flatnonzero(sizes != sizes[0])[0])
    sizes[[0, i]] = sizes[[i, 0]]  # two windows' batch sizes swapped: same totals, wrong plan
    np.savez(entry, **arrays)
    r = run(kind, path, "first", tmp_path / "state2.json", cache, check=False)
    assert r.returncode != 0 and "StalePlanCache" in r.stderr and str(entry) in r.stderr, r.stderr[-2000:]
    assert not entry.exists()
    run(kind, path, "first", tmp_path / "state2.json", cache)  # planned afresh
    assert json.load(open(tmp_path / "state2.json")) == json.load(open(out))


def test_the_disk_cache_can_be_turned_off(tmp_path):
    path, out = metadata(tmp_path, "token_budget"), tmp_path / "state.json"
    env = {**os.environ, "DATAPIPE_PLAN_CACHE": "0", "PYTHONPATH": ROOT, "HOME": str(tmp_path / "home"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "DATAPIPE_NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    subprocess.run([sys.executable, "-c", SCRIPT, "token_budget", str(path), "first", str(out)], env=env,
                   check=True, capture_output=True, timeout=300)
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_arrays_in_memory_are_never_written(tmp_path, monkeypatch):
    import samplers
    import samplers.token_budget as tb

    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tb, "EXACT_MAX_ROWS", 1000)
    lengths = (np.arange(20_000) % 700 + 1).astype(np.int32)
    s = samplers.TokenBudgetBatchSampler(lengths, max_tokens=4096, seed=1)
    assert s.windowed and len(list(iter(s))) == len(s)
    assert not (tmp_path / "cache").exists()
