"""The package's shape: every submodule importable by its name, public names at the top, one
idea per module (no private name crossing modules, no module past about 500 lines)."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import flexmask as fm

PACKAGE = Path(fm.__file__).parent
MODULES = [
    info.name
    for info in pkgutil.walk_packages(fm.__path__, "flexmask.")
    if not info.name.endswith("__main__")  # runs the command
]


@pytest.mark.filterwarnings("ignore:flexmask.convert is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODULES)
def test_every_submodule_is_importable_by_its_name(name):
    module = importlib.import_module(name)
    parent, _, leaf = name.rpartition(".")
    # `import flexmask.x.y as m` reads the attribute: a function of the same name would win.
    assert getattr(importlib.import_module(parent), leaf) is module
    assert (module.__doc__ or "").strip(), f"{name} opens with no docstring saying its idea"


def test_every_public_name_is_importable_from_flexmask():
    for name in fm.__all__:
        assert getattr(fm, name) is not None
    assert inspect.isfunction(fm.tree) and inspect.isclass(fm.Tree)


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_private_name_is_imported_across_modules():
    crossing = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                crossing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    assert crossing == []


def test_no_module_is_past_about_500_lines():
    long = {p.relative_to(PACKAGE).as_posix(): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > 500}  # fmt: skip
    assert long == {}


def test_the_old_convert_module_is_a_deprecated_alias():
    import sys

    sys.modules.pop("flexmask.convert", None)
    with pytest.warns(DeprecationWarning, match="flexmask.convert is deprecated"):
        convert = importlib.import_module("flexmask.convert")
    assert convert.to_dense is fm.to_dense and convert.block_kinds is fm.evaluation.block_kinds
