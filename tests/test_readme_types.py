"""The README's Python examples type-check: every ``datapipe.X`` / ``samplers.X`` / ``mixtures.X`` / ``native.X``
they use resolves through the packages' ``__init__.pyi`` stubs, so an IDE follows them too (mypy and Pyright,
run on the examples as written; names a snippet takes from the reader's program are declared ``Any``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# names the README's snippets take from the reader's program (a model, a probe, ...)
PRELUDE = '''from typing import Any

import numpy as np
import pyarrow
import pyarrow.fs

import datapipe
import mixtures
import native
import samplers
from datapipe import DataLoader, collate

ds: datapipe.ArrowDataset
sampler: Any
table: Any
model: Any
probe: Any
epochs: int
Y: Any
'''

MYPY_INI = '''[mypy]
follow_imports = silent
ignore_missing_imports = True
warn_unused_configs = False
# the check is about names; `loader = DataLoader(...)` is generic over torch's (skipped) types
disable_error_code = var-annotated

[mypy-torch.*,pandas.*,scipy.*,sklearn.*,ray.*,datasets.*,matplotlib.*,lightgbm.*,faiss.*,numba.*,pyarrow.*]
follow_imports = skip
'''


def readme_examples() -> str:
    """The README's ```python blocks, each as the body of its own function (names do not leak between them)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no ```python examples"
    funcs = [f"def example_{i}() -> None:\n{textwrap.indent(b, '    ')}" for i, b in enumerate(blocks)]
    return PRELUDE + "\n\n" + "\n\n".join(funcs)


def run_mypy(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    src = tmp_path / "readme_examples.py"
    src.write_text(text)
    ini = tmp_path / "mypy.ini"
    ini.write_text(MYPY_INI)
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ini), "--cache-dir",
                          str(tmp_path / "cache"), "--no-error-summary", str(src)],
                         cwd=ROOT, capture_output=True, text=True, env={"MYPYPATH": str(ROOT), "PATH": ""})
    return out


def test_readme_examples_resolve_under_mypy(tmp_path):
    out = run_mypy(tmp_path, readme_examples())
    assert out.returncode == 0, (f"mypy on the README's examples:\n{out.stdout}{out.stderr}\n(a name the reader's "
                                 "program supplies goes into PRELUDE above)")
    # and the check bites: a name no package exports is an error
    bad = run_mypy(tmp_path, readme_examples() + "\n\ndef broken() -> None:\n    samplers.NoSuchSampler()\n")
    assert bad.returncode == 1 and 'has no attribute "NoSuchSampler"' in bad.stdout, bad.stdout



def run_pyright(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """Pyright (the basedpyright wheel of the dev extra, which carries its own Node.js) on ``text``: "basic" mode,
    the packages resolved from this checkout through their ``__init__.pyi`` stubs, third-party ones from this
    interpreter's environment."""
    exe = Path(sys.executable).with_name("basedpyright")
    if not exe.exists():
        pytest.skip("no basedpyright next to this interpreter: install the dev extra, `pip install -e '.[dev]'`")
    src = tmp_path / "readme_examples.py"
    src.write_text(text)
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({
        "typeCheckingMode": "basic", "pythonVersion": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "extraPaths": [str(ROOT)], "reportMissingModuleSource": False}))
    return subprocess.run([str(exe), "--pythonpath", sys.executable, str(src)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_readme_examples_resolve_under_pyright(tmp_path):
    out = run_pyright(tmp_path, readme_examples())
    assert out.returncode == 0, f"Pyright on the README's examples:\n{out.stdout}{out.stderr}"
    bad = run_pyright(tmp_path, readme_examples() + "\n\ndef broken() -> None:\n    samplers.NoSuchSampler()\n")
    assert bad.returncode == 1 and '"NoSuchSampler" is not a known attribute of module "samplers"' in bad.stdout, \
        bad.stdout
