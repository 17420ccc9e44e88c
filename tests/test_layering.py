"""The package's dependency rule, checked on the source: imports only point down the
layer list in ``wanquant/__init__.py``, and only the model adapter imports diffusers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wanquant"

# Layer of each top-level part; a module may import its own part and lower layers.
# Utilities (layer 0) import only other utilities.
LAYERS = {
    "media": 0, "distributed": 0, "testbed": 0, "evaluation": 0,
    "formats": 1, "numerics": 2, "method": 3, "kernels": 4, "artifacts": 4, "runtime": 5,
    "model": 6, "loading": 7, "lora": 7, "validate": 7, "calibration": 8,
    "api": 9, "demo": 10, "cli": 10,
}
DIFFUSERS_HOME = "model"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts == ("__init__",):
            continue
        yield path, rel.parts[0]


def _imports(path: Path) -> list[str]:
    """Every module name imported anywhere in the file (function-level imports too)."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "wanquant"]
    return names


def _part(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "wanquant" and len(parts) > 1 and parts[1] != "__version__" else None


@pytest.mark.parametrize("path,part", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else v.name)
def test_imports_point_down(path, part):
    assert part in LAYERS, f"{part!r} has no layer: add it to LAYERS here and to the list in wanquant/__init__.py"
    for name in _imports(path):
        if name.split(".")[0] == "diffusers":
            assert part == DIFFUSERS_HOME, f"{path}: imports {name}; only wanquant/{DIFFUSERS_HOME}/ may import diffusers"
        target = _part(name)
        if target is None or target == part:
            continue
        assert target in LAYERS, f"{path}: imports unknown part {target!r}"
        if LAYERS[part] == 0:
            assert LAYERS[target] == 0, f"{path}: utility {part!r} imports {name} (layer {LAYERS[target]})"
        else:
            assert LAYERS[target] <= LAYERS[part], (
                f"{path}: {part!r} (layer {LAYERS[part]}) imports {name} (layer {LAYERS[target]}), an upward import")


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from wanquant.api import quantize\n")
    assert "wanquant.api" in _imports(bad) and LAYERS[_part("wanquant.api")] > LAYERS["numerics"]
