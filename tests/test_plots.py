"""Every plotting function of the library draws on its own ``matplotlib.figure.Figure``: it leaves the process's
pyplot backend (a notebook's inline backend, say) as it was and never imports pyplot. Checked in a fresh
process whose backend is set first, on a real dataset with a real decomposition."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys
import matplotlib
matplotlib.use("svg")  # stands for a notebook's backend: no plot below may change it
import numpy as np
import datapipe
from datapipe.decomposition import plot_buckets
from datapipe.inspect import plot_summary
from mixtures import Constant
from mixtures.regmix_io import plot_mixture, plot_predictions
from mixtures.schedules import plot

out = sys.argv[1]
rng = np.random.default_rng(0)
docs = [{"input_ids": rng.integers(1, 200, int(n)).astype(np.int32).tolist()} for n in rng.integers(20, 600, 60)]
path = datapipe.write_dataset(docs, f"{out}/ds", shard_rows=30)
datapipe.decompose(path, min_log2=4, max_log2=8)
ax = plot_buckets(path)
ax.figure.savefig(f"{out}/buckets.png")
plot_summary(path, f"{out}/summary.png")
plot(Constant({"a": 0.3, "b": 0.7}), 100, f"{out}/schedule.png")
plot_predictions(np.arange(5.0), np.arange(5.0) + 0.1, f"{out}/pred.png")
plot_mixture(np.array([0.2, 0.8]), ["a", "b"], f"{out}/mix.png", prior=np.array([1.0, 1.0]))
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
'''


@pytest.mark.slow  # ~16 s on the shared 2-core machine: a fresh process imports matplotlib and numba
def test_plots_leave_the_backend_alone_and_write_images(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["svg", "False"]
    for name in ("buckets", "summary", "schedule", "pred", "mix"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
