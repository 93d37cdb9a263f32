"""The package layers, read from the source: every import points to a lower layer (or stays in its package).

    adselect (CLI)                       4
    server/  eval/                       3
    selection/ (pipeline, fusion, caps)  2
    retrieval/  agent/                   1
    kernel/ (types, errors, settings)    0
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"kernel": 0, "retrieval": 1, "agent": 1, "selection": 2, "server": 3, "eval": 3, "adselect": 4}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file, wherever it stands (functions included)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            out.append((node.lineno, "__import__"))
    return out


def violations() -> list[str]:
    bad = []
    for pkg, level in LAYERS.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, target in imports(path):
                where = f"{path.relative_to(ROOT)}:{line}"
                if target == "__import__":
                    bad.append(f"{where}: __import__ hides an import")
                elif target in LAYERS and target != pkg and LAYERS[target] >= level:
                    bad.append(f"{where}: {pkg} (layer {level}) imports {target} (layer {LAYERS[target]})")
    return bad


def test_every_import_points_down() -> None:
    assert violations() == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from server.app import create_app\nimport kernel.types\n")
    assert sorted(imports(f)) == [(2, "server"), (3, "kernel")]


@pytest.mark.parametrize("pkg", sorted(LAYERS))
def test_every_package_is_a_layer(pkg: str) -> None:
    assert (ROOT / pkg / "__init__.py").is_file()
