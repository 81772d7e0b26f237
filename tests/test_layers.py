"""The package's floors (ARCHITECTURE.md), enforced.

- Every import in ``python/masktrain`` goes down the floors of :data:`FLOORS` or stays on its
  floor: errors -> tiers, atomic -> catalog, device, distributed -> config -> data, masks, loss,
  models -> cache, inspect, denoiser -> sample, tools -> train -> demo -> cli.
- No import loop between modules, counting every import statement: at module level, inside a
  function (a lazy import only hides a loop) and under ``TYPE_CHECKING``.
- No two top-level parts (subpackages or modules) import each other, even through different files.
- No ``crate::`` loop between the modules of the Rust core crate.

The walks read the source (Python's AST, the Rust files' text). Each check is also run on small
trees written here with a loop injected, so the checks cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import masktrain

PACKAGE = Path(masktrain.__file__).parent
CORE_CRATE = Path(__file__).resolve().parent.parent / "crates" / "masktrain-core" / "src"

# Floor of each top-level part of the package (a module, or a subpackage with everything in it).
FLOORS: dict[str, int] = {
    "masktrain": 0,  # the package itself: the version and the error classes
    "errors": 0,
    "_native": 1,
    "atomic": 1,
    "tiers": 1,
    "released_configs": 1,
    "catalog": 2,
    "device": 2,
    "distributed": 2,
    "config": 3,
    "data": 4,
    "masks": 4,
    "loss": 4,
    "models": 4,
    "region_scores": 4,
    "cache": 5,
    "inspect": 5,
    "denoiser": 5,
    "sample": 6,
    "tools": 6,
    "plan": 6,
    "train": 7,
    "demo": 8,
    "cli": 9,
}


# --- the Python walk -----------------------------------------------------------------------------


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (the folder of a package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, modules: Iterable[str], root: str = "masktrain") -> list[tuple[str, bool]]:
    """(imported module of `root`, whether it runs when the module is imported) of every import
    statement; ``from package import x`` counts as ``package.x`` when x is a module."""
    known = set(modules)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def ours(name: str) -> bool:
        return name == root or name.startswith(root + ".")

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
                found.extend((alias.name, at_import) for alias in child.names if ours(alias.name))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if ours(child.module):
                    for alias in child.names:
                        candidate = f"{child.module}.{alias.name}"
                        found.append((candidate if candidate in known else child.module, at_import))
            else:
                visit(child, at_import)

    visit(tree, True)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports, by any import statement."""
    modules = all_modules(package)
    root = package.name
    return {
        name: {imported for imported, _ in imports(path, modules, root) if imported in modules}
        for name, path in modules.items()
    }


def part(module: str) -> str:
    """The top-level part of a dotted module name (``masktrain.train.loop`` -> ``train``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor(module: str) -> int:
    return FLOORS[part(module)]


def loops(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The cycles a depth-first walk of `graph` closes (each as the path that closes it)."""
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep == node:
                continue
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return found


def part_pairs(graph: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """Pairs of top-level parts that import each other (through any of their files)."""
    arrows = {(part(a), part(b)) for a, deps in graph.items() for b in deps if part(a) != part(b)}
    return sorted((a, b) for a, b in arrows if (b, a) in arrows and a < b)


# --- the Rust walk -------------------------------------------------------------------------------

_CRATE_PATH = re.compile(r"\bcrate::(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def rust_graph(src: Path) -> dict[str, set[str]]:
    """Top-level module of a crate's ``src`` -> the crate's top-level modules its files name with
    ``crate::`` (``use crate::x``, ``use crate::{x, y}``, ``crate::x::f()``); comments ignored.
    A folder module (``resize/``) is one node with its files."""
    graph: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.rs")):
        module = path.relative_to(src).parts[0].removesuffix(".rs")
        if module in ("lib", "main"):
            continue
        code = "\n".join(line.split("//", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
        named = graph.setdefault(module, set())
        for group, single in _CRATE_PATH.findall(code):
            targets = [item.strip().split("::")[0] for item in group.split(",")] if group else [single]
            named.update(t for t in targets if t and t not in ("self", module))
    return graph


# --- the house ------------------------------------------------------------------------------------


def test_every_top_level_part_has_a_floor() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    parts = {p for p in parts if (PACKAGE / p).is_dir() or (PACKAGE / f"{p}.py").is_file()}
    parts.add("_native")
    assert parts <= FLOORS.keys(), (
        f"give these a floor in FLOORS and ARCHITECTURE.md: {parts - FLOORS.keys()}"
    )


def test_imports_go_down_the_floors() -> None:
    wrong = []
    for module, deps in import_graph().items():
        for imported in sorted(deps):
            if floor(imported) > floor(module):
                wrong.append(f"{module} (floor {floor(module)}) imports {imported} (floor {floor(imported)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_loop_even_through_lazy_imports() -> None:
    found = loops(import_graph())
    assert not found, "\n".join(" -> ".join(loop) for loop in found)


def test_no_two_parts_import_each_other() -> None:
    pairs = part_pairs(import_graph())
    assert not pairs, "\n".join(f"{a} <-> {b}" for a, b in pairs)


def test_sample_imports_nothing_from_train() -> None:
    graph = import_graph()
    reaching = sorted(f"{a} -> {b}" for a, deps in graph.items() if part(a) == "sample" for b in deps)
    assert not [arrow for arrow in reaching if ".train" in arrow.split(" -> ")[1]], reaching


def test_no_module_loop_in_the_rust_core() -> None:
    graph = rust_graph(CORE_CRATE)
    assert {"geometry", "error", "prepare"} <= graph.keys()  # the walk found the crate
    found = loops(graph)
    assert not found, "\n".join(" -> ".join(loop) for loop in found)


# --- the checks catch what they are for ------------------------------------------------------------


def write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_the_walk_sees_imports() -> None:
    """Module-level, lazy and ``from package import module`` imports are all seen."""
    modules = all_modules()
    found = dict(imports(PACKAGE / "cli" / "cache.py", modules))
    assert found["masktrain.cli.options"] is True
    assert found["masktrain.cache"] is False  # imported inside the command
    assert ("masktrain.catalog", True) in imports(PACKAGE / "models" / "wan.py", modules)
    assert floor("masktrain.cli.train") == 9 and floor("masktrain.errors") == 0
    assert "masktrain.denoiser.lora" in import_graph()["masktrain.denoiser.experts"]


def test_an_injected_function_level_loop_is_found(tmp_path: Path) -> None:
    package = write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "from pkg import b\n",
            "b.py": "def late() -> None:\n    from pkg.a import x\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
            "d.py": "import pkg.c\n",
        },
    )
    found = loops(import_graph(package))
    assert ["pkg.a", "pkg.b", "pkg.a"] in found and ["pkg.c", "pkg.d", "pkg.c"] in found
    write(package, {"b.py": "def late() -> None:\n    pass\n"})  # the lazy import gone, its loop goes
    assert loops(import_graph(package)) == [["pkg.c", "pkg.d", "pkg.c"]]


def test_an_injected_package_pair_is_found(tmp_path: Path) -> None:
    """Two parts importing each other through different files: no file-level loop, still a pair."""
    package = write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "train/__init__.py": "",
            "train/loop.py": "from pkg.sample.sampler import Sampler\n",
            "train/experts.py": "",
            "sample/__init__.py": "",
            "sample/sampler.py": "from pkg.train.experts import Experts\n",
        },
    )
    graph = import_graph(package)
    assert not loops(graph)
    assert part_pairs(graph) == [("sample", "train")]


def test_an_injected_rust_loop_is_found(tmp_path: Path) -> None:
    src = write(
        tmp_path / "src",
        {
            "lib.rs": "pub mod error;\npub mod geometry;\npub mod resize;\n",
            "error.rs": "use crate::geometry::Media; // crate::nothing in a comment\n",
            "geometry.rs": "use crate::{plane::Plane, error::Result};\n",
            "resize/mod.rs": "pub fn f() { crate::geometry::cover_crop(); }\n",
            "resize/area.rs": "use crate::resize::Window;\n",
        },
    )
    graph = rust_graph(src)
    assert graph == {
        "error": {"geometry"},
        "geometry": {"plane", "error"},
        "resize": {"geometry"},
    }
    assert loops(graph) == [["error", "geometry", "error"]]
