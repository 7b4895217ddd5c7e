"""The import contract: packages stand on lower layers only, and no module reaches into another
module's private names (each seam between modules is a public function, class or attribute)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gradood"

#: a package may import packages of strictly lower layers (and itself)
LAYERS = {
    "core": 0,
    "seeding": 0,
    "config": 1,
    "data": 2,
    "models": 2,
    "stats": 2,
    "report": 2,
    "features": 3,
    "train": 3,
    "pipeline": 4,
    "evaluation": 5,
    "analysis": 5,
}

#: private attributes of other libraries read on purpose, each for want of a public equivalent
FOREIGN_PRIVATE = {
    # torch's padding for a conv's non-zeros padding modes and autograd's saved tensors of a node
    ("features/rules.py", "_reversed_padding_repeated_twice"),
    ("features/rules.py", "_saved_result1"),
    ("features/rules.py", "_saved_result2"),
}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "pretrained" not in p.parts)


def package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_packages(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "gradood":
                names = [f"gradood.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out += [(node.lineno, n.split(".")[1]) for n in names if n.startswith("gradood.")]
    return out


def test_every_package_has_a_layer():
    assert {package_of(p) for p in modules()} - {"__init__"} == set(LAYERS)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    own = package_of(path)
    if own == "__init__":
        return
    upward = [
        f"line {line}: gradood.{target} (layer {LAYERS[target]})"
        for line, target in imported_packages(ast.parse(path.read_text()))
        if target != own and LAYERS[target] >= LAYERS[own]
    ]
    assert not upward, f"{own} (layer {LAYERS[own]}) imports {upward}"


def defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines or assigns to an attribute of: its own privates."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize(
    "path", [*modules(), *sorted((REPO / "jobs").glob("*.py")), *sorted((REPO / "benchmarks").glob("*.py"))],
    ids=lambda p: str(p.relative_to(REPO)),
)  # fmt: skip
def test_no_module_uses_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    own = defined_names(tree)
    rel = str(path.relative_to(PACKAGE)) if PACKAGE in path.parents else str(path.relative_to(REPO))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradood"):
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            on = node.value
            if isinstance(on, ast.Name) and on.id in ("self", "cls"):
                continue
            if node.attr in own or (rel, node.attr) in FOREIGN_PRIVATE:
                continue
            found.append(f"line {node.lineno}: {ast.unparse(on)}.{node.attr}")
    assert not found, found
