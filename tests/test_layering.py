"""DESIGN.md's import rules, read from the source of every library module (function-local imports included):
``native`` imports nothing of ours; ``samplers`` and ``mixtures`` import only ``native``; nothing in ``datapipe``
outside ``datapipe/cli`` imports the CLI; no import cycle among ``datapipe`` modules; no ``_name`` imported from
another module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datapipe", "mixtures", "native", "samplers")
#: the one allowed exception: the deprecated alias module of what moved to datapipe.immiscible (one release)
ALLOWED = {("samplers.immiscible", "datapipe.immiscible")}
#: import cycles present in the tree (none: ``ArrowDataset.open`` reaches ``datapipe.remote``, whose
#: ``RemoteArrowDataset`` subclasses ``ArrowDataset``, through the opener registered in ``datapipe.urls``).
KNOWN_CYCLES: set[str] = set()
TYPE_ONLY: dict[str, set[int]] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def type_only_lines(tree: ast.AST) -> set[int]:
    """Lines of the imports under ``if TYPE_CHECKING:`` (read by type checkers, never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def imports_of(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every import statement of ``path``, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text(), str(path))
    TYPE_ONLY[name] = type_only_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full, None, node.lineno) if is_module(full) else (base, a.name, node.lineno))
    return out


def ours(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in PACKAGES else None


MODULES = library_modules()
EDGES = {name: imports_of(name, path) for name, path in MODULES.items()}


def violations(rule) -> list[str]:
    return [f"{MODULES[src].relative_to(ROOT)}:{line}: imports {dst}" for src, edges in EDGES.items()
            for dst, _, line in edges if ours(dst) and (src, dst) not in ALLOWED and rule(src, dst)]


def test_the_walk_sees_the_imports():
    # guards the test itself: a walk that found nothing would pass every rule below
    assert len(MODULES) > 50
    assert ("native.rng", "mix_step") in {(d, n) for d, n, _ in EDGES["native.feistel"]}
    assert any(d == "datapipe.decomposition" for d, _, _ in EDGES["datapipe.decomposed_dataset"])  # module level
    assert any(d == "datapipe.decomposed_dataset" for d, _, _ in EDGES["datapipe.collate"])  # function-local


def test_native_imports_nothing_of_ours_but_native():
    assert violations(lambda s, d: s.startswith("native") and ours(d) != "native") == []


@pytest.mark.parametrize("pkg", ["samplers", "mixtures"])
def test_samplers_and_mixtures_import_only_native(pkg):
    assert violations(lambda s, d: ours(s) == pkg and ours(d) not in (pkg, "native")) == []


def test_only_the_cli_imports_the_cli():
    assert violations(lambda s, d: (d == "datapipe.cli" or d.startswith("datapipe.cli."))
                      and not (s == "datapipe.cli" or s.startswith("datapipe.cli."))) == []


def test_no_import_cycle_among_datapipe_modules():
    graph: dict[str, set[str]] = {}
    for src, edges in EDGES.items():
        if ours(src) != "datapipe":
            continue
        for dst, _, line in edges:
            if ours(dst) != "datapipe" or line in TYPE_ONLY[src]:
                continue
            graph.setdefault(src, set()).add(dst)
            # importing a.b.c first runs a.b's __init__: an edge unless the importer lives inside a.b
            parts = dst.split(".")
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if not (src == pkg or src.startswith(pkg + ".")):
                    graph[src].add(pkg)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                ring = stack[stack.index(nxt):]
                ring = ring[ring.index(min(ring)):] + ring[: ring.index(min(ring))]  # one spelling per cycle
                cycles.append(" -> ".join(ring + [ring[0]]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert set(cycles) == KNOWN_CYCLES, "\n".join(cycles)


def test_no_private_name_imported_across_modules():
    bad = [f"{MODULES[src].relative_to(ROOT)}:{line}: from {dst} import {name}" for src, edges in EDGES.items()
           for dst, name, line in edges
           if name and name.startswith("_") and not name.startswith("__") and ours(dst) and dst != src]
    assert bad == []
