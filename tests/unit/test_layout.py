"""The package layout's rules: no import circle between the harness's modules (lazy imports inside
functions count too), and only the child-process entry points touch sys.path."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "harness"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    files = [p for p in HARNESS.rglob("*.py") if "__pycache__" not in p.parts]
    known = {_module(p) for p in files}
    return {_module(p): _imports(p, known) - {_module(p)} for p in files}


def test_no_import_circle_between_harness_modules():
    g = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_graph_sees_lazy_imports():
    # the bench -> profile import is inside a function: the check above must see it
    assert "harness.analyse.profile" in _graph()["harness.run.bench"]


def test_only_child_entry_points_edit_sys_path():
    editors = set()
    for p in HARNESS.rglob("*.py"):
        if "__pycache__" in p.parts:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "remove") and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "path" and \
                    isinstance(node.value.value, ast.Name) and node.value.value.id == "sys":
                editors.add(str(p.relative_to(REPO)))
    assert editors <= {"harness/child/patch_loader.py"}, editors


def test_test_module_basenames_are_unique():
    # tests/ folders have no __init__.py, so pytest's default import mode refuses two files of one
    # name in a fresh checkout (a stale __pycache__ hides it locally).
    names: dict[str, list[str]] = {}
    for p in (REPO / "tests").rglob("test_*.py"):
        names.setdefault(p.name, []).append(str(p.relative_to(REPO)))
    assert not {n: ps for n, ps in names.items() if len(ps) > 1}
