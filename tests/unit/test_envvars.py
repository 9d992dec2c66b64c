"""Every DPH_* name in the code is declared in harness/core/envvars.py, and every declared one is used."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.core import envvars

REPO = Path(__file__).resolve().parents[2]
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


# a read of a DPH_* variable straight from the process environment: os.environ[...], .get/.pop/
# .setdefault(...), os.getenv(...), with the name as a literal or as a constant
DIRECT_READ = re.compile(r"""(?:\benviron\s*(?:\[|\.\s*(?:get|pop|setdefault)\s*\()|\bgetenv\s*\()"""
                         r"""\s*(?:f?["']|envvars\s*\.\s*)?DPH_""")
# engines/ is the exception: a build freezes a copy of the engine, which also runs without the
# harness (tests drive it directly), so it reads os.environ itself (its names are still declared)
READS_THROUGH_ENVVARS = ["harness", "patches", "tools"]


def test_the_direct_read_pattern_sees_every_spelling():
    for src in ('os.environ["DPH_X"]', "os.environ.get('DPH_X', '1')", 'environ.pop("DPH_X")',
                "os.getenv('DPH_X')", "os.environ.get(envvars.DPH_X)", "os.environ[DPH_X]",
                'os.environ.setdefault( "DPH_X", "")'):
        assert DIRECT_READ.search(src), src
    for src in ('envvars.get(envvars.DPH_X)', 'env[envvars.DPH_X] = "1"', 'os.environ.get("PYTHONPATH")',
                '{**os.environ, "DPH_X": "1"}'):
        assert not DIRECT_READ.search(src), src


def test_code_reads_dph_variables_only_through_envvars():
    direct = []
    for top in READS_THROUGH_ENVVARS:
        for f in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" in f.parts or f == REPO / "harness" / "core" / "envvars.py":
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if DIRECT_READ.search(line):
                    direct.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not direct, "read these through harness.core.envvars (get/get_str/flag):\n" + "\n".join(direct)


def test_each_declaration_is_a_constant_of_its_own_name():
    # code writes env[envvars.DPH_RUN_DIR]: the constant must spell the variable
    for name in envvars.VARS:
        assert getattr(envvars, name) == name


def test_typed_accessors(monkeypatch):
    monkeypatch.delenv("DPH_GPU_BUDGET_S", raising=False)
    assert envvars.get_float(envvars.DPH_GPU_BUDGET_S) == 270.0
    monkeypatch.setenv("DPH_GPU_BUDGET_S", "12.5")
    assert envvars.get_float(envvars.DPH_GPU_BUDGET_S) == 12.5
    monkeypatch.delenv("DPH_RUN_DIR", raising=False)
    assert envvars.get_str(envvars.DPH_RUN_DIR) == "."
    monkeypatch.delenv("DPH_PROFILE", raising=False)
    with pytest.raises(KeyError, match="no default"):
        envvars.get_str(envvars.DPH_PROFILE)
    with pytest.raises(KeyError):
        envvars.get("DPH_NOT_DECLARED")
