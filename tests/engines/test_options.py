"""dpfast's EngineOptions (issue 37): one typed, validated set, read in one place, whose code
defaults are what the `fused` variant runs -- so an engine built without settings (the engine
tests') is the benchmarked one, and a manifest that drifts from them fails here."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from _upstream_fixtures import data, knobs  # noqa: F401 (fixtures)
from dpfast import options
from dpfast.options import EngineOptions
from harness.core import envvars
from harness.prepare import variants

REPO = Path(__file__).resolve().parents[2]


def _dpfast_variants() -> list[str]:
    return sorted(v for v in variants.list_variant_names() if variants.chain_engine(variants.chain(v)) == "dpfast")


def test_the_code_defaults_are_what_fused_runs():
    assert options.from_env(variants.chain_env(variants.chain("fused"))) == EngineOptions()


def test_every_dpfast_manifest_sets_valid_options_and_the_set_is_what_differs_from_fused():
    names = _dpfast_variants()
    assert {"graph", "fused", "fused-predict", "fused-nets", "fused-blocks", "fused-onthefly", "fused-kernels"} <= set(names)
    seen = {}
    for v in names:
        seen[v] = options.from_env(variants.chain_env(variants.chain(v)))  # raises on a bad value
    assert seen["fused-predict"].compile_step is False and seen["fused-predict"].flat_adam_compile is False
    assert seen["graph"].flat_adam_compile is False  # graph's eager Adam, as before the defaults moved
    assert seen["fused-nets"].grouped == "nets" and seen["fused-blocks"].grouped == "0"
    assert seen["fused-onthefly"].geom == "onthefly"
    assert seen["fused-kernels"].kernels is True and not any(o.kernels for v, o in seen.items() if v != "fused-kernels")
    assert seen["fused-3xtf32"].split_tf32 and not seen["fused-3xtf32"].split_tf32_kernel
    assert seen["fused-3xtf32-kernel"].split_tf32 and seen["fused-3xtf32-kernel"].split_tf32_kernel
    assert {v for v, o in seen.items() if o.split_tf32} == {"fused-3xtf32", "fused-3xtf32-kernel"}


def test_declared_defaults_equal_the_code_defaults():
    code = EngineOptions()
    for f in fields(EngineOptions):
        declared = envvars.VARS[options.ENV[f.name]].default
        mine = getattr(code, f.name)
        if isinstance(mine, bool):
            assert declared in (None, "0", "1") and (declared == "1") == mine, f.name
        else:
            assert declared == (None if mine is None else str(mine)), f.name


@pytest.mark.parametrize("env,needle", [
    ({"DPH_GEOM": "sparse"}, "DPH_GEOM='sparse': not one of precomputed | onthefly | compact"),
    ({"DPH_FUSED_GROUPED": "2"}, "DPH_FUSED_GROUPED='2'"),
    ({"DPH_FUSED_COMPILE_STEP": "yes"}, "DPH_FUSED_COMPILE_STEP='yes': must be 0 or 1"),
    ({"DPH_COMPILE_BUCKET": "x"}, "DPH_COMPILE_BUCKET='x': not an integer"),
    ({"DPH_COMPILE_BUCKET": "0"}, "DPH_COMPILE_BUCKET=0: must be >= 1"),
    ({"DPH_COMPILE_BACKEND": "tvm"}, "DPH_COMPILE_BACKEND='tvm'"),
    ({"DPH_FUSED_VJP_ATOMS": "0"}, "DPH_FUSED_VJP_ATOMS=0: must be >= 1"),
    ({"DPH_FUSED_VJP_SLOTS": "-16"}, "DPH_FUSED_VJP_SLOTS=-16: must be >= 0"),
    ({"DPH_FUSED_VJP_ROWS": "24"}, "DPH_FUSED_VJP_ROWS=24: not one of 0 | 16 | 32"),
    ({"DPH_FUSED_VJP_WARPS": "3"}, "DPH_FUSED_VJP_WARPS=3: not one of 0 | 1 | 2 | 4 | 8"),
])
def test_a_bad_value_names_its_variable(env, needle):
    with pytest.raises(ValueError) as e:
        options.from_env(env)
    assert needle in str(e.value)


def test_current_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("DPH_FUSED_GROUPED", "nets")
    monkeypatch.setenv("DPH_COMPILE_CPU", "1")
    o = options.current()
    assert o.grouped == "nets" and o.compile_cpu and o.compiles_on("cpu") and o.compile_step


def test_the_vjp_kernels_launch_split_and_tile_come_from_the_options():
    """fused-kernels' VJP split (DPH_FUSED_VJP_ATOMS / _SLOTS, both VJP kernels) and the weight
    VJP's tile (_ROWS / _WARPS) reach embed_autograd in a fresh process, as a training child
    would import it."""
    code = ("import dpfast.embed_autograd as ea; print(ea.ATOMS_PER_PROGRAM, ea.SLOTS_PER_PROGRAM, "
            "ea.vjp_split(128, 92, 16), ea.WEIGHT_VJP_ROWS, ea.WEIGHT_VJP_WARPS)")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'engines'}:{REPO}",
           "DPH_FUSED_VJP_ATOMS": "1", "DPH_FUSED_VJP_SLOTS": "32", "DPH_FUSED_VJP_ROWS": "32",
           "DPH_FUSED_VJP_WARPS": "4"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    # 128 atoms x 3 chunks of 32 slots (92 -> 3); the weight VJP's tile 32 rows x 4 warps
    assert out.split() == ["1", "32", "(384,", "32,", "3)", "32", "4"]
    o = EngineOptions()  # fused-kernels' default: 1 x 16, the launch table's tile
    assert (o.vjp_atoms, o.vjp_slots, o.vjp_rows, o.vjp_warps) == (1, 16, 0, 0)


def test_no_engine_module_reads_the_environment_but_options():
    src = {p.name: p.read_text() for p in (REPO / "engines" / "dpfast").glob("*.py")}
    assert [n for n, s in src.items() if ("os.environ" in s or "getenv(" in s) and n != "options.py"] == []


def test_the_engine_takes_its_switches_from_the_options(data, tmp_path, knobs):
    """fused's manifest on CPU (knobs: compile_cpu): the compiled step is wanted; DPH_FUSED_COMPILE=0
    means eager throughout (no compiled step either); opts= overrides the environment."""
    from _upstream_fixtures import build_trainer, case_config
    from dpfast import fused as fused_engine

    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    e = fused_engine.FusedEngine(tr)
    assert e.opts == options.current() and e.compiled_step_wanted() and e.compile_wanted()
    assert e.opts.flat_adam_compile and e.geom_mode == "compact" and e.ran.options == e.opts.as_dict()
    knobs.setenv("DPH_FUSED_COMPILE", "0")
    e = fused_engine.FusedEngine(tr)
    assert e.compile_step and not e.compiled_step_wanted() and not e.compile_wanted()
    e = fused_engine.FusedEngine(tr, opts=EngineOptions(geom="onthefly", compile_step=False))
    assert e.geom_mode == "onthefly" and not e.compiled_step_wanted()
