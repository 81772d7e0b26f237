"""The package's floors (ARCHITECTURE.md): every import in ``python/masktrain`` goes down the order
errors -> config and catalog -> data -> models -> loss -> cache and train -> demo and tools ->
cli, or stays on its floor; and no module-level imports form a loop. The walk reads the source
(AST), so a lazy import inside a function counts for the order too."""

from __future__ import annotations

import ast
from pathlib import Path

import masktrain

PACKAGE = Path(masktrain.__file__).parent

# Floor of each top-level part of the package (a module, or a subpackage with everything in it).
FLOORS: dict[str, int] = {
    "masktrain": 0,  # the package itself: the version and the error classes
    "errors": 0,
    "config": 1,
    "catalog": 1,
    "_native": 2,
    "atomic": 2,
    "data": 2,
    "distributed": 2,
    "models": 3,
    "loss": 4,
    "cache": 5,
    "train": 5,
    "sample": 5,
    "tiers": 1,
    "masks": 6,
    "inspect": 6,
    "demo": 6,
    "tools": 6,
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS[parts[1]] if len(parts) > 1 else FLOORS["masktrain"]


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported masktrain module, whether it runs when the module is imported) of every import
    statement; ``from package import x`` counts as ``package.x`` when x is a module."""
    modules = set(all_modules()) | {"masktrain._native"}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False)
            elif isinstance(child, ast.If) and is_type_checking(child):
                for sub in child.body:
                    visit(ast.Module(body=[sub], type_ignores=[]), False)
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), at_import)
            elif isinstance(child, ast.Import):
                found.extend(
                    (alias.name, at_import) for alias in child.names if alias.name.startswith("masktrain")
                )
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.startswith("masktrain"):
                    for alias in child.names:
                        candidate = f"{child.module}.{alias.name}"
                        found.append((candidate if candidate in modules else child.module, at_import))
            else:
                visit(child, at_import)

    visit(tree, True)
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_part_has_a_floor() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    parts = {p for p in parts if (PACKAGE / p).is_dir() or (PACKAGE / f"{p}.py").is_file()}
    parts.add("_native")
    assert parts <= FLOORS.keys(), (
        f"give these a floor in FLOORS and ARCHITECTURE.md: {parts - FLOORS.keys()}"
    )


def test_imports_go_down_the_floors() -> None:
    wrong = []
    for module, path in all_modules().items():
        for imported, _ in imports(path):
            if floor(imported) > floor(module):
                wrong.append(f"{module} (floor {floor(module)}) imports {imported} (floor {floor(imported)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_loop() -> None:
    modules = all_modules()
    graph = {
        name: {imported for imported, at_import in imports(path) if at_import and imported in modules}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}
    loops: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                loops.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not loops, "\n".join(" -> ".join(loop) for loop in loops)


def test_the_walk_sees_imports() -> None:
    """The walker finds module-level, lazy and package-relative imports (so the tests above
    cannot pass by seeing nothing)."""
    found = dict(imports(PACKAGE / "cli" / "cache.py"))
    assert found["masktrain.cli.options"] is True
    assert found["masktrain.cache"] is False  # imported inside the command
    assert ("masktrain.catalog", True) in imports(PACKAGE / "models" / "wan.py")
    assert floor("masktrain.cli.train") == 7 and floor("masktrain.errors") == 0
