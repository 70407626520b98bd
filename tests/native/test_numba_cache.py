"""The kernels' disk cache never serves stale machine code: a kernel calling a kernel of another module is recompiled
when that module changes (numba alone keys a cached function by its own file only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import native._config as config

ROOT = Path(__file__).resolve().parents[2]

CALLEE = '''from native._config import njit


@njit
def step(x):
    return x + {add}
'''
CALLER = '''from native._config import njit
from native.zz_callee import step


@njit
def twice(x):
    return 2 * step(x)
'''


def run(pkg_root: Path, cache: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(pkg_root), "DATAPIPE_NUMBA_CACHE_DIR": str(cache),
           "DATAPIPE_NUMBA_CACHE": "1"}
    code = ("import native._config as c, native.zz_caller as m; print(m.twice(1), c.CACHE_DIR, "
            "m.twice.stats.cache_hits.get(m.twice.signatures[0], 0))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=pkg_root,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    value, where, hits = out.stdout.split()
    return int(value), where, int(hits)


def test_a_changed_callee_module_recompiles_its_callers(tmp_path):
    pkg = tmp_path / "src" / "native"
    shutil.copytree(ROOT / "native", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "zz_callee.py").write_text(CALLEE.format(add=1))
    (pkg / "zz_caller.py").write_text(CALLER)
    cache = tmp_path / "cache"
    first = run(pkg.parent, cache)
    assert first[0] == 4 and first[2] == 0 and Path(first[1]).parent == cache
    again = run(pkg.parent, cache)
    assert again == (4, first[1], 1)  # the second process loads the cached code
    (pkg / "zz_callee.py").write_text(CALLEE.format(add=2))  # the caller's file is unchanged
    changed = run(pkg.parent, cache)
    assert changed[0] == 6 and changed[1] != first[1]


def test_our_cache_directory_is_ours_only():
    import numba

    saved = numba.config.CACHE_DIR
    config.njit(lambda x: x + 1)
    assert numba.config.CACHE_DIR == saved  # a user's own numba functions keep their cache location
    assert config.source_digest() == config.source_digest() and len(config.source_digest()) == 16
