"""The README's Python examples type-check: every ``datapipe.X`` / ``samplers.X`` / ``mixtures.X`` / ``native.X``
they use resolves through the packages' ``__init__.pyi`` stubs, so an IDE follows them too (mypy, run on the
examples as written; names a snippet takes from the reader's program are declared ``Any``)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

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

