"""Every DPH_* name in the code is declared in harness/core/envvars.py, and every declared one is used."""
from __future__ import annotations

import re
from pathlib import Path

from harness.core import envvars

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["harness", "engines", "patches", "tools", "tests", ".ci", "Makefile"]
NAME = re.compile(r"\bDPH_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def _used() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for top in SOURCES:
        p = REPO / top
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            if f.suffix not in (".py", ".sh", "") or "__pycache__" in f.parts or f.name == "envvars.py" \
                    or f.name == "test_envvars.py":
                continue
            for n in NAME.findall(f.read_text(errors="replace")):
                used.setdefault(n, set()).add(str(f.relative_to(REPO)))
    return used


def test_every_dph_variable_in_the_code_is_declared():
    undeclared = {n: sorted(fs) for n, fs in _used().items() if n not in envvars.VARS}
    assert not undeclared, f"declare these in harness/core/envvars.py: {undeclared}"


def test_every_declared_variable_is_still_used():
    unused = sorted(set(envvars.VARS) - set(_used()))
    assert not unused, f"declared but used nowhere (dead): {unused}"


def test_get_falls_back_to_the_declared_default(monkeypatch):
    monkeypatch.delenv("DPH_FUSED_GROUPED", raising=False)
    assert envvars.get("DPH_FUSED_GROUPED") == "1"
    monkeypatch.setenv("DPH_FUSED_GROUPED", "nets")
    assert envvars.get("DPH_FUSED_GROUPED") == "nets"
    monkeypatch.setenv("DPH_COMPILE_DISABLE", "0")
    assert not envvars.flag("DPH_COMPILE_DISABLE")
