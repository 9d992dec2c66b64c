"""The one loader of a variant inside a child process (training: harness.child.launch; the gate's
parity process: harness.child.parity_eval; NVE: harness.child.md_nve). Only this module edits sys.path.

A built variant lives at build/<variant>-<hash>/: its patch modules under patches/<name>/ and,
when its manifest names an engine, a frozen copy of that package under engines/. The child puts
the variant's upstream tree and that engines folder first on sys.path (so `import dpfast` is the
copy the build hash covers, never the working tree's), then imports the patch modules in chain
order (root first)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def engines_dir(module: str | Path) -> Path | None:
    """<build>/engines for a module at <build>/patches/<variant>/<file>, if that build froze one."""
    p = Path(module).resolve()
    if len(p.parents) < 3 or p.parents[1].name != "patches":
        return None
    d = p.parents[2] / "engines"
    return d if d.is_dir() else None


def put_on_path(tree: str | Path, modules: list[str]) -> None:
    """The upstream tree first, then every engines folder the modules' builds froze."""
    first = [str(Path(tree).resolve())]
    for m in modules:
        d = engines_dir(m)
        if d is not None and str(d) not in first:
            first.append(str(d))
    for entry in reversed(first):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def import_modules(modules: list[str]) -> None:
    """Import each patch module by file, in order, under a private name."""
    for i, m in enumerate(modules):
        spec = importlib.util.spec_from_file_location(f"dph_patch_{i}_{Path(m).stem}", m)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
