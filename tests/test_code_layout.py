"""The codebase's shape, read from its source: imports go down the layers and never in a circle,
functions stay short, and task names live in resources/tasks.yaml and the dataset adapters."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "m4cxr"

# Lower layers first; a module may import from its own layer or any layer below it.
LAYERS = [
    {"config", "tasks", "boxes", "labeler", "report_grounding", "ray_cluster", "tracking"},
    {"model"},
    {"data"},
    {"train", "eval"},
    {"serve", "sweep"},
    {"quickstart", "cli"},
]
MAX_FUNCTION_LINES = 80
MAX_MODULES_NAMING_TASKS = 6


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(("m4cxr",) + tuple(p for p in parts if p != "__init__"))] = path
    return out


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "m4cxr"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules a module imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("m4cxr"):
            for alias in node.names:  # `from m4cxr.data import boxes_preview` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("m4cxr")}
    return {m for m in found if m in known and m != "m4cxr"}


def test_imports_only_go_down_the_layers():
    known = modules()
    upward = [f"{m} -> {dep}" for m, path in known.items() if m != "m4cxr"
              for dep in imports_of(path, known) if layer_of(dep) > layer_of(m)]
    assert upward == []


def test_no_import_cycles():
    known = modules()
    graph = {m: imports_of(p, known) for m, p in known.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing its own submodules is not a cycle of layers
    cycles = [c for c in cycles if not re.fullmatch(r"(m4cxr\.\w+) -> \1\.\w+ -> \1", c)]
    assert cycles == []


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_task_names_live_in_tasks_yaml_and_the_adapters():
    tasks = yaml.safe_load((PACKAGE / "resources" / "tasks.yaml").read_text())["tasks"]
    # a task name as a string literal (the route and result section "vqa" share the VQA task's
    # name, so it is left out of the search)
    literal = re.compile(r"""["'](%s)["']""" % "|".join(t for t in tasks if t != "vqa"))
    naming = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                    if "sources" not in p.parts and literal.search(p.read_text()))
    assert len(naming) <= MAX_MODULES_NAMING_TASKS, naming
