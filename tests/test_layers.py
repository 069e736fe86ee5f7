"""The layers import in one direction only: shm <- client <- service.  shm (the arena) imports
nothing of client or service; client (the worker library and the wire format) nothing of
service.  Every module is parsed with `ast`, so an import inside a function counts too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("shm", "client", "service")  # lowest first


def imported(path, root):
    """(line, top-level package) of every import in the module at `path`.  A relative import
    cannot leave its own top-level package: it names the module's own layer."""
    layer = path.relative_to(root).parts[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, layer if node.level else node.module.split(".")[0]


def upward_imports(layer, root=ROOT):
    above = LAYERS[LAYERS.index(layer) + 1 :]
    return [
        f"{path.relative_to(root)}:{line} imports {top}"
        for path in sorted((root / layer).rglob("*.py"))
        for line, top in imported(path, root)
        if top in above
    ]


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_higher_one(layer):
    assert len(list((ROOT / layer).rglob("*.py"))) >= 3, f"no modules found in {layer}/"
    assert upward_imports(layer) == []


def test_the_check_sees_an_upward_import(tmp_path):
    # The check must be able to fail: inside a function, in a subpackage, with `from`.
    (tmp_path / "shm" / "sub").mkdir(parents=True)
    (tmp_path / "shm" / "ok.py").write_text("import os\nfrom . import layout\nfrom shm.errors import X\n")
    (tmp_path / "shm" / "bad.py").write_text("import os\n\n\ndef f():\n    import client.protocol\n")
    (tmp_path / "shm" / "sub" / "worse.py").write_text("from service.daemon import Daemon\n")
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "c.py").write_text("import shm\nfrom service import handlers\n")
    assert upward_imports("shm", tmp_path) == [
        "shm/bad.py:5 imports client",
        "shm/sub/worse.py:1 imports service",
    ]
    assert upward_imports("client", tmp_path) == ["client/c.py:2 imports service"]
    assert upward_imports("service", tmp_path) == []
