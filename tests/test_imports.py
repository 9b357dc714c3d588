"""The house rule: imports run one way and never in a circle.

The wings, highest first; a module may import from its own wing or any wing below it, never above:

    cli -> report -> tools -> tracking -> run -> data, models -> the recipe registry -> config -> callbacks -> engine

Imports are read with ``ast`` from every module, at module level and inside functions alike (an import
hidden in a function is still a dependency); ``if TYPE_CHECKING:`` imports are annotations, not
dependencies, and are left out. A new module must belong to a wing: the test names it otherwise.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "callbacks", "recipes")

#: (wing, members), highest first. ``name.*`` is a package and everything in it; a bare name is one module.
WINGS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("recipes.cli.*", "recipes.__main__")),
    ("report", ("recipes.report.*",)),
    ("tools", ("recipes.tools.*",)),
    ("tracking", ("recipes.tracking.*",)),
    ("run", ("recipes.run.*",)),
    ("data, models", ("recipes.data.*", "recipes.models", "recipes.pretrained")),
    ("recipe registry", ("recipes", "recipes.digits", "recipes.cifar10", "recipes.synthetic", "recipes.imagefolder",
                         "recipes.fashion_mnist", "recipes.mnist", "recipes.recipe_files")),
    ("config", ("recipes.config", "recipes.config.*", "recipes.words", "recipes.timm_models", "recipes.lr_rule")),
    ("callbacks", ("callbacks.*",)),
    ("engine", ("engine.*",)),
]


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def import_edges(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, str]]:
    """``{module: {imported project module: "path:line"}}`` for every import in the project's packages."""
    modules = _modules(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, dict[str, str]] = {m: {} for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in `base`
            else:
                continue
            for target in targets:
                resolved = resolve(target)
                if resolved is not None and resolved != module:
                    edges[module].setdefault(resolved, f"{path.relative_to(root)}:{node.lineno}")
    return edges


def wing_of(module: str, wings: list[tuple[str, tuple[str, ...]]] = WINGS) -> int | None:
    """The index in ``wings`` of the wing ``module`` belongs to (None: no wing names it)."""
    best, best_length = None, -1
    for index, (_, members) in enumerate(wings):
        for member in members:
            prefix = member[:-2] if member.endswith(".*") else None
            matches = module == member or (prefix is not None and (module == prefix or module.startswith(prefix + ".")))
            if matches and len(member) > best_length:
                best, best_length = index, len(member)
    return best


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def import_problems(root: Path, packages: tuple[str, ...] = PACKAGES,
                    wings: list[tuple[str, tuple[str, ...]]] = WINGS) -> list[str]:
    """Every broken rule, one line each: a cycle, an import against the wings' direction, a module in no wing."""
    edges = import_edges(root, packages)
    problems = []
    for module in sorted(edges):
        if wing_of(module, wings) is None:
            problems.append(f"{module} belongs to no wing: add it to WINGS in tests/test_imports.py")
    for component in _cycles(edges):
        lines = [f"{edges[a][b]} ({a} imports {b})" for a in component for b in component if b in edges[a]]
        problems.append("import cycle among " + ", ".join(component) + ": " + "; ".join(lines))
    for module in sorted(edges):
        here = wing_of(module, wings)
        for target, where in sorted(edges[module].items()):
            there = wing_of(target, wings)
            if here is not None and there is not None and there < here:
                problems.append(f"{where}: {module} ({wings[here][0]}) imports {target} ({wings[there][0]}), "
                                "against the direction of the wings")
    return problems


def test_the_project_imports_run_one_way_without_cycles():
    problems = import_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_engine_imports_neither_callbacks_nor_recipes_and_callbacks_never_recipes():
    edges = import_edges(ROOT)
    for module, targets in edges.items():
        if module.startswith("engine"):
            assert not [t for t in targets if t.split(".")[0] in ("callbacks", "recipes")], module
        if module.startswith("callbacks"):
            assert not [t for t in targets if t.split(".")[0] == "recipes"], module


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


PLANTED_WINGS = [("top", ("shop.top.*",)), ("bottom", ("shop.bottom.*", "shop"))]


def test_a_planted_cycle_is_found_even_when_hidden_inside_a_function(tmp_path):
    root = _plant(tmp_path, {
        "shop/__init__.py": "",
        "shop/bottom/__init__.py": "",
        "shop/bottom/a.py": "from shop.bottom.b import helper\n",
        "shop/bottom/b.py": "def helper():\n    from shop.bottom import a\n    return a\n",
    })
    problems = import_problems(root, ("shop",), PLANTED_WINGS)
    assert len(problems) == 1
    assert problems[0].startswith("import cycle among shop.bottom.a, shop.bottom.b")
    assert "shop/bottom/b.py:2" in problems[0] and "shop/bottom/a.py:1" in problems[0]


def test_a_planted_upward_import_is_named_with_its_line(tmp_path):
    root = _plant(tmp_path, {
        "shop/__init__.py": "",
        "shop/top/__init__.py": "from shop.bottom import low\n",
        "shop/bottom/__init__.py": "",
        "shop/bottom/low.py": "import os\n\n\ndef borrow():\n    from shop.top import table\n    return table\n",
        "shop/top/table.py": "ROWS = 1\n",
    })
    assert import_problems(root, ("shop",), PLANTED_WINGS) == [
        "shop/bottom/low.py:5: shop.bottom.low (bottom) imports shop.top.table (top), against the direction of the wings"]


def test_type_checking_imports_are_annotations_not_dependencies(tmp_path):
    root = _plant(tmp_path, {
        "shop/__init__.py": "",
        "shop/top/__init__.py": "from shop.bottom import low\n",
        "shop/bottom/__init__.py": "",
        "shop/bottom/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shop.top import x\n",
        "shop/top/x.py": "",
    })
    assert import_problems(root, ("shop",), PLANTED_WINGS) == []


@pytest.mark.parametrize("module, wing", [("recipes.cli.jobs", "cli"), ("recipes", "recipe registry"),
                                          ("recipes.models", "data, models"), ("recipes.data.imagefolder", "data, models")])
def test_modules_are_placed_in_their_wing(module, wing):
    assert WINGS[wing_of(module)][0] == wing
