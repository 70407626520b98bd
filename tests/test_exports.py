"""Every name a package exports resolves, is the object named (not a submodule that shadows it), and stays so
after every submodule has been imported."""

import importlib
import pkgutil

import pytest

PACKAGES = ["datapipe", "samplers", "mixtures", "native"]


@pytest.mark.parametrize("pkg_name", PACKAGES)
def test_exports_resolve_and_are_not_shadowed_by_submodules(pkg_name):
    pkg = importlib.import_module(pkg_name)
    present = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    for mod in present:
        importlib.import_module(f"{pkg_name}.{mod}")
    assert pkg.__all__ == sorted(pkg.__all__)
    for name in pkg.__all__:
        src = pkg._WHERE.get(name)
        if src is not None and src.rsplit(".", 1)[1] not in present:
            continue  # a module of an issue not built in this checkout
        obj = getattr(pkg, name)
        if name not in getattr(pkg, "_MODULES", ()):
            assert not isinstance(obj, type(pkg)), f"{pkg_name}.{name} is a module, not the exported object"


@pytest.mark.parametrize("pkg_name", PACKAGES)
def test_stub_lists_exactly_the_exports(pkg_name):
    """``__init__.pyi`` (what readers and type checkers see) names exactly ``__all__``, each re-exported, and is
    what ``python -m native._stubgen`` writes from the package's tables (so it cannot drift)."""
    import ast

    from native._stubgen import package_stub

    pkg = importlib.import_module(pkg_name)
    path, expected = package_stub(pkg_name)
    assert path.exists(), f"{path} is missing; run `python -m native._stubgen`"
    text = path.read_text()
    tree = ast.parse(text)
    stub_all = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    reexported = sorted(a.asname for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names
                        if a.asname == a.name)
    assert stub_all == pkg.__all__
    assert reexported == pkg.__all__
    assert text == expected, f"{path} is stale; run `python -m native._stubgen`"


def test_importing_the_packages_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, datapipe, samplers, mixtures, native; "
            "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
