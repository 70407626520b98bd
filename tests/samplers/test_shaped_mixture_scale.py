"""ShapedMixtureBatchSampler above EXACT_MAX_ROWS (issue 15): memory-mapped metadata read in chunked passes, rows by
group in memory-mapped files, and the same plans as the in-RAM path; exact resume, also in a fresh process."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import samplers.shaped_scale as scale
from mixtures.schedules import Constant, DomainUpsampling
from samplers import ShapedMixtureBatchSampler as S
from samplers.plan_cache import StalePlanCache
from tests.helpers import assert_batches_equal, assert_sampler_resumes_exactly

ROOT = str(Path(__file__).resolve().parents[2])
BASE = {"web": 0.5, "code": 0.3, "math": 0.2}
UP = {"web": 0.2, "code": 0.3, "math": 0.5}
SIZES = (12_000, 8_000, 5_000)
SCHED = DomainUpsampling(BASE, UP, final_fraction=0.2)


@pytest.fixture(autouse=True)
def _quiet_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPIPE_PLAN_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # drops of over-budget rows are announced; counted in the tests
        yield


@pytest.fixture
def files(tmp_path):
    """Per domain: int32 lengths, float32 durations, int8 2^k buckets with float32 tokens, int16 groups with -1,
    written as .npy and opened as memory maps."""
    rng = np.random.default_rng(0)
    for d, n in enumerate(SIZES):
        arrays = {
            "len": np.minimum(rng.lognormal(5.0 + 0.3 * d, 1.0, n), 9000).astype(np.int32),
            "dur": rng.lognormal(1.5, 0.6, n).astype(np.float32),
            "log2": np.clip(np.round(rng.normal(6.0 + 0.5 * d, 1.3, n)), 5, 9).astype(np.int8),
            "grp": rng.integers(-1, 7, n).astype(np.int16),
        }
        arrays["tok"] = (np.exp2(arrays["log2"]) * rng.uniform(0.5, 1.0, n)).astype(np.float32)
        for k, a in arrays.items():
            np.save(tmp_path / f"{k}{d}.npy", a)
    return lambda k: [np.load(tmp_path / f"{k}{d}.npy", mmap_mode="r") for d in range(len(SIZES))]


def build(kind, mm, rank=0, world_size=2, **kw):
    kw = {"total_steps": 150, "seed": 3, "rank": rank, "world_size": world_size, "max_passes": 100.0} | kw
    if kind == "lengths":
        return S.from_lengths(mm("len"), SCHED, max_tokens=8192, num_buckets=6, **kw)
    if kind == "durations":
        return S.from_durations(mm("dur"), SCHED, max_duration=120.0, num_buckets=8, quadratic_duration=30.0, **kw)
    if kind == "rows":
        return S.from_rows(list(SIZES), SCHED, batch_size=24, **kw)
    if kind == "rows_tokens":
        return S.from_rows(list(SIZES), SCHED, batch_size=24, lengths=mm("len"), **kw)
    if kind == "decomposed":
        ixs = [SimpleNamespace(sequence_log2=lg, sequence_tokens=tok, max_log2=9)
               for lg, tok in zip(mm("log2"), mm("tok"))]
        return S.from_decomposed(ixs, SCHED, tokens_per_batch=4096, **kw)
    assert kind == "groups"
    return S(mm("grp"), SCHED, batch_sizes={k: 5 + k for k in range(7)}, sizes=mm("dur"), **kw)


KINDS = ["lengths", "durations", "rows", "rows_tokens", "decomposed", "groups"]


def both_paths(monkeypatch, make):
    """``make()`` in RAM (threshold above the rows) and chunked (threshold 0, chunks of 777 rows so every
    domain is read in many chunks)."""
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 1 << 62)
    exact = make()
    assert exact._sources is None
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 0)
    monkeypatch.setattr(scale, "SCAN_ROWS", 777)
    return exact, make()


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_path_gives_the_in_ram_plan(files, monkeypatch, kind):
    for rank in range(2):
        exact, big = both_paths(monkeypatch, lambda rank=rank: build(kind, files, rank))
        assert big._sources is not None
        assert_batches_equal(list(big), list(exact), f"{kind}, rank {rank}")
        assert big.stats() == exact.stats()
        assert json.dumps(big.stats())
        assert big.state_dict() == exact.state_dict()
        np.testing.assert_array_equal(big.avail, exact.avail)
        np.testing.assert_array_equal(big.units, exact.units)  # bitwise: units added in row order
    big.set_epoch(1)
    exact.set_epoch(1)
    assert_batches_equal(list(big), list(exact), f"{kind}, epoch 1")


def test_metadata_stays_memory_mapped_and_rows_come_from_files(files, monkeypatch, tmp_path):
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 0)
    s = build("lengths", files)
    for src, mm in zip(s._sources, files("len")):
        assert isinstance(src.values, np.memmap) and src.values.dtype == np.int32
        assert np.shares_memory(src.values, mm) or src.values.filename == mm.filename
    next(iter(s))
    cache = tmp_path / "cache"
    assert len(list(cache.glob("shaped_groups-*.bin"))) == 1
    assert len(list(cache.glob("topic_rows-*.bin"))) == 1  # the counting sort of samplers.topic_windowed
    assert s._index.rows is not None and s._index.path.startswith(str(cache))
    r = build("rows", files)
    next(iter(r))
    assert r._index.rows is None  # one group, every row: no file at all


def test_resume_exactly_in_the_chunked_path(files, monkeypatch):
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 0)
    assert_sampler_resumes_exactly(lambda: build("durations", files, 1, total_steps=30), epochs=1,
                                   steps=[0, 1, 17, 30])


FRESH = """
import json, sys, warnings
import numpy as np
import samplers.shaped_scale as scale
import samplers.topic_windowed as tw
from tests.samplers.test_shaped_mixture_scale import build
warnings.simplefilter("ignore")
scale.EXACT_MAX_ROWS = 0

def no_pass(*a, **k):
    raise AssertionError("a fresh process read the metadata again instead of the plan cache")

scale._pass = no_pass  # the counting pass and the group file come from the cache directory
tw._scatter = no_pass  # and the rows-by-group file too
mm = lambda k: [np.load(f"{sys.argv[1]}/{k}{d}.npy", mmap_mode="r") for d in range(3)]
out = {}
for kind, state in json.loads(sys.argv[2]).items():
    s = build(kind, mm, rank=1)
    s.load_state_dict(state)
    out[kind] = [b.tolist() for b in s]
print(json.dumps(out))
"""


def test_resume_in_a_fresh_process_reads_the_cache(files, monkeypatch, tmp_path):
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 0)
    states, rest = {}, {}
    # two samplers: the cache directory keeps the newest two rows-by-group files (plan_cache.KEEP_BIG_FILES)
    for kind, at in (("lengths", 40), ("decomposed", 149)):
        s = build(kind, files, rank=1)
        it = iter(s)
        for _ in range(at):
            next(it)
        states[kind] = s.state_dict()
        rest[kind] = [b.tolist() for b in it]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path), json.dumps(states)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == rest


def test_a_damaged_group_file_is_an_error_naming_it(files, monkeypatch, tmp_path):
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 0)
    next(iter(build("lengths", files)))
    path = next((tmp_path / "cache").glob("shaped_groups-*.bin"))
    ids = np.memmap(path, dtype=np.uint8, mode="r+")
    ids[:] = (ids + 1) % 7
    ids.flush()
    del ids
    scale._INDEXES.clear()  # as a fresh process: the file is opened again
    with pytest.raises(StalePlanCache, match="shaped_groups-.*does not match the metadata"):
        next(iter(build("lengths", files)))
    assert not path.exists()
    next(iter(build("lengths", files)))  # rebuilt


def test_errors_name_the_domain_array_and_row(files, monkeypatch, tmp_path):
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 0)
    dur = [np.array(d) for d in files("dur")]
    dur[1][4321] = np.nan
    with pytest.raises(ValueError, match=r"durations\[1\] must be finite and > 0: row 4321 has nan"):
        S.from_durations(dur, SCHED, max_duration=120.0, duration_bins=[2.0, 4.0, 8.0], total_steps=50)
    grp = [np.array(g) for g in files("grp")]
    grp[2][77] = -3
    with pytest.raises(ValueError, match=r"groups\[2\] \(domain 'math'\) has -3 at row 77"):
        S(grp, SCHED, batch_sizes={k: 4 for k in range(7)}, total_steps=50)
    grp = [g.astype(np.int32) for g in grp]
    grp[2][77] = scale.MAX_GROUP + 1
    with pytest.raises(ValueError, match=r"groups\[2\] \(domain 'math'\) has group 1048576 at row 77.*renumber"):
        S(grp, SCHED, batch_sizes={k: 4 for k in range(7)}, total_steps=50)
    sizes = [np.ones(n) for n in SIZES]
    sizes[0][9] = 0.0
    with pytest.raises(ValueError, match=r"sizes\[0\] \(domain 'web'\) must be finite and > 0: row 9 has 0.0"):
        S(files("grp"), SCHED, batch_sizes={k: 4 for k in range(7)}, sizes=sizes, total_steps=50)


def test_through_the_data_loader_with_an_arrow_dataset(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import datapipe
    from tests.helpers import assert_loader_resumes_exactly

    rng = np.random.default_rng(2)
    n = 3000
    lens = rng.integers(1, 40, n)
    table = pa.table({"input_ids": [list(range(k)) for k in lens], "row": np.arange(n)})
    datapipe.write_dataset(table, tmp_path / "ds", shard_rows=500)
    ds = datapipe.ArrowDataset.open(tmp_path / "ds")
    length = ds.index["length"]
    cuts = [0, 1400, 2300, n]  # three domains: contiguous row ranges of one dataset
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 0)

    def make(workers=0):
        s = S.from_lengths([length[a:b] for a, b in itertools.pairwise(cuts)], Constant(BASE), max_tokens=256,
                           num_buckets=4, total_steps=25, seed=5, max_passes=100.0)
        return datapipe.DataLoader(ds, batch_sampler=s, num_workers=workers)

    loader = make()
    want = list(loader.batch_sampler)
    for b, rows in zip(loader, want):
        np.testing.assert_array_equal(np.asarray(b["row"]), rows)
        assert lens[rows].max() * len(rows) <= 256  # within the bucket's token budget
    assert_loader_resumes_exactly(lambda: make(2), epochs=1, steps=[0, 9, 25])


MEMORY = """
import re, sys, threading, time, warnings
import numpy as np
import samplers.shaped_scale as scale
from mixtures.schedules import Constant
from samplers import ShapedMixtureBatchSampler as S
warnings.simplefilter("ignore")

def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

mm = [np.load(f"{sys.argv[1]}/big{d}.npy", mmap_mode="r") for d in range(3)]
sched = Constant({"web": 0.4, "code": 0.4, "math": 0.2})
small = [np.load(f"{sys.argv[1]}/small{d}.npy", mmap_mode="r") for d in range(3)]
scale.EXACT_MAX_ROWS = 0  # compile the kernels first: their memory is not the plan's
next(iter(S.from_lengths(small, sched, max_tokens=2**16, total_steps=50, rank=3, world_size=8)))
scale.EXACT_MAX_ROWS = 1 << 22
base, peak, done = anon(), [0], [False]

def poll():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)

threading.Thread(target=poll, daemon=True).start()
s = S.from_lengths(mm, sched, max_tokens=2**16, total_steps=2000, rank=3, world_size=8)
assert s._sources is not None
next(iter(s))
done[0] = True
print((max(peak[0], anon()) - base) / 2**20)
"""


@pytest.mark.slow
def test_anonymous_memory_stays_small_at_60m_rows(tmp_path):
    """6e7 memory-mapped int32 lengths (240 MB): the in-RAM path would hold > 1.5 GB (float64 copies, argsort); the
    chunked path holds what does not grow with the rows: the bins' sample (SAMPLE_ROWS float64 values and the sorts
    of bin estimation, ~200 MiB at the peak), chunk temporaries and small tables (1e9 rows: 195 MiB in bench_scale)."""
    rng = np.random.default_rng(0)
    for d, n in enumerate((24_000_000, 24_000_000, 12_000_000)):
        big = np.lib.format.open_memmap(tmp_path / f"big{d}.npy", mode="w+", dtype=np.int32, shape=(n,))
        for a in range(0, n, 1 << 22):
            k = min(n, a + (1 << 22)) - a
            big[a:a + k] = np.minimum(rng.lognormal(6.0, 1.0, k), 9000).astype(np.int32) + 1
        big.flush()
        del big
        np.save(tmp_path / f"small{d}.npy", np.arange(1, 3001, dtype=np.int32))
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth_mib = float(proc.stdout.strip().splitlines()[-1])
    assert growth_mib < 320, f"anonymous memory grew by {growth_mib:.0f} MiB"


RANK = """
import json, sys, warnings
import numpy as np
import samplers.shaped_scale as scale
from tests.samplers.test_shaped_mixture_scale import build
warnings.simplefilter("ignore")
scale.EXACT_MAX_ROWS = 0
mm = lambda k: [np.load(f"{sys.argv[1]}/{k}{d}.npy", mmap_mode="r") for d in range(3)]
s = build("durations", mm, rank=int(sys.argv[2]), world_size=2)
print(json.dumps([b.tolist() for b in s]))
"""


@pytest.mark.slow
def test_ranks_starting_together_write_the_files_once(files, monkeypatch, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path), str(r)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    cache = tmp_path / "cache"
    assert len(list(cache.glob("shaped_groups-*.bin"))) == 1
    assert len(list(cache.glob("topic_rows-*.bin"))) == 1
    monkeypatch.setattr(scale, "EXACT_MAX_ROWS", 1 << 62)  # the in-RAM plan, for comparison
    for r, (out, _) in enumerate(outs):
        want = [b.tolist() for b in build("durations", files, rank=r, world_size=2)]
        assert json.loads(out.strip().splitlines()[-1]) == want
