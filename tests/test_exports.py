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
