"""What ran is what is recorded (issue 37, slice 1).

1. in process (CPU, the compile knobs on with the aot_eager backend, as test_fused_step): the
   engine's prepare() compiles the step and says so (ran.Ran); parameters, optimizer state and RNG
   are as before; a deliberately broken step makes prepare() raise CaptureFailed (no silent eager
   path), and with the manifest's DPH_ENGINE_ALLOW_FALLBACK=1 the eager path trains and says
   `fallback: eager`;
2. through the harness (`dpharness bench`, tiny water, CPU): the broken variant is a failed run
   with the reason (exit 3, no speed), the fallback variant is recorded `fallback` with the
   engine block, shown under the table and never counted as the variant's speed; fused's record
   carries its engine block.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _upstream_fixtures import build_trainer, case_config, data, knobs, torch  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]


def _engine(data, tmp_path):
    from dpfast import fused

    eng = fused.FusedEngine(build_trainer(case_config("fcc-tos-false", data), tmp_path))
    eng.build_data()
    eng.make_optimizer()
    return eng


def _broken(*a, **k):
    raise RuntimeError("deliberately broken step")


def test_prepare_compiles_the_step_says_so_and_leaves_state_as_it_was(data, tmp_path, knobs):
    eng = _engine(data, tmp_path)
    before = [b["flat"].clone() for b in eng.flat.buckets]
    rng = torch.random.get_rng_state()
    eng.prepare()
    r = eng.ran.as_dict()
    assert r["engine"] == "fused" and r["device"] == "cpu" and r["forces"] == "analytic"
    assert r["compiled"] == "step" and r["compile_backend"] == "aot_eager" and r["optimizer"] == "compiled"
    assert r["fallback"] is None and r["cuda_graphs"] == 0 and r["graph_breaks"] == 0
    assert r["graph_break_reasons"] == {}
    # the record's typed part reads every key the engine writes (the two lists must not drift apart)
    from dataclasses import fields

    from harness.core.records import EngineRan

    assert set(r) <= {f.name for f in fields(EngineRan)}
    assert all(torch.equal(a, b["flat"]) for a, b in zip(before, eng.flat.buckets))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert int(eng.opt.step_t) == 0


def test_a_broken_compiled_step_fails_prepare_instead_of_training_eagerly(data, tmp_path, knobs):
    from dpfast import fused, ran

    knobs.setattr(fused.FusedEngine, "_step_core", _broken)
    eng = _engine(data, tmp_path)
    with pytest.raises(ran.CaptureFailed, match="deliberately broken step"):
        eng.prepare()


def test_an_allowed_fallback_trains_eagerly_and_says_fallback(data, tmp_path, knobs):
    from dpfast import fused

    knobs.setattr(fused.FusedEngine, "_step_core", _broken)
    knobs.setenv("DPH_ENGINE_ALLOW_FALLBACK", "1")
    eng = _engine(data, tmp_path)
    eng.prepare()
    r = eng.ran.as_dict()
    assert r["fallback"] == "eager" and "deliberately broken step" in r["fallback_reason"]
    assert r["compiled"] == "none" and r["optimizer"] == "eager" and eng.opt.compiled is None
    loss, _ = eng.train_step(eng.groups[0], eng.lr_values[0])  # the eager analytic path runs
    assert torch.isfinite(loss)


def test_graph_engine_says_it_is_eager_on_cpu(data, tmp_path, monkeypatch):
    from dpfast import graph

    eng = graph.GraphEngine(build_trainer(case_config("fcc-tos-false", data), tmp_path))
    eng.build_data()
    eng.make_optimizer()
    eng.prepare()
    r = eng.ran.as_dict()
    assert (r["engine"], r["forces"], r["compiled"], r["cuda_graphs"], r["fallback"]) == \
        ("graph", "autograd", "none", 0, None)


# ------------------------------------------------------------- 2. through the harness
BREAK = '''"""test-only: fused's compiled step raises (a compile/capture that fails)."""
from dpfast import fused


def _broken(*a, **k):
    raise RuntimeError("deliberately broken step")


fused.FusedEngine._step_core = _broken
'''


def _variant(p: Path, name: str, env: dict) -> None:
    import yaml

    (p / name).mkdir()
    (p / name / "break_step.py").write_text(BREAK)
    (p / name / "manifest.yaml").write_text(yaml.safe_dump({
        "name": name, "description": "test-only: fused with a broken compiled step", "base": "fused",
        "upstream": ["3.2.0"], "backend": "pt", "engine": "dpfast", "modules": ["break_step.py"],
        "env": {"DPH_COMPILE_CPU": "1", "DPH_COMPILE_BACKEND": "aot_eager", **env}}))


@pytest.fixture
def broken_patches(tmp_path) -> Path:
    p = tmp_path / "patches"
    for v in ("baseline", "graph", "fused"):
        shutil.copytree(REPO / "patches" / v, p / v)
    _variant(p, "fused-broken", {})
    _variant(p, "fused-broken-ok", {"DPH_ENGINE_ALLOW_FALLBACK": "1"})
    return p


def _bench(tiny_system, out: Path, patches: Path, *variants: str) -> subprocess.CompletedProcess:
    args = [a for v in variants for a in ("--variant", v)]
    return subprocess.run([sys.executable, "-m", "harness", "bench", "--system", str(tiny_system), *args,
                           "--no-baseline", "--steps", "4", "--device", "cpu", "--no-accuracy",
                           "--results-dir", str(out)],
                          cwd=REPO, env={**os.environ, "DPH_PATCHES": str(patches)}, capture_output=True,
                          text=True, timeout=900)


def _records(out: Path) -> dict[str, dict]:
    return {r["variant"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*.json"))}


@pytest.mark.slow
def test_a_broken_capture_is_a_failed_run_and_an_allowed_fallback_is_never_the_variants_speed(
        tiny_system, tmp_path, broken_patches):
    from harness.core.records import StoredRun
    from harness.results import anchors

    r = _bench(tiny_system, tmp_path / "res", broken_patches, "fused-broken", "fused-broken-ok")
    assert r.returncode == 3, r.stderr[-3000:]  # the failed run; the allowed fallback alone would be 0
    recs = _records(tmp_path / "res")
    bad, fb = recs["fused-broken"], recs["fused-broken-ok"]
    assert bad["status"] == "failed" and "could not be prepared" in bad["error"], bad["error"]
    assert "deliberately broken step" in bad["error"]
    assert fb["status"] == "fallback" and fb["engine"]["fallback"] == "eager"
    assert "deliberately broken step" in fb["engine"]["fallback_reason"] and fb["engine"]["compiled"] == "none"
    assert fb["timing"]["step_s_median"] > 0  # timed and kept ...
    assert "fused-broken-ok: fallback: eager" in r.stdout and "not counted" in r.stdout
    run = StoredRun.from_dict(fb)  # ... but never counted as the variant's speed
    assert anchors.speedup(run, run) is None and run.engine.fallback == "eager"


@pytest.mark.slow
def test_fused_records_the_engine_path_it_ran(tiny_system, tmp_path):
    r = _bench(tiny_system, tmp_path / "res", REPO / "patches", "fused")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(tmp_path / "res")
    e = recs["fused"]["engine"]
    # on CPU without DPH_COMPILE_CPU the manifest's compile knobs stay off: the eager analytic path
    assert (e["engine"], e["device"], e["forces"], e["compiled"], e["cuda_graphs"], e["fallback"]) == \
        ("fused", "cpu", "analytic", "none", 0, None)
    # the record says which of upstream's code the engine replaced (test_core: a baseline's, none of it)
    mine = {(x["by"], x["target"]) for x in recs["fused"]["upstream_replaced"]}
    assert {("dpfast.trainer", "deepmd.pt.train.training.Trainer.run"),
            ("dpfast.trainer", "harness.child.runtime.parity_forward"),
            ("dpfast.stats", "deepmd.pt.utils.nlist.build_neighbor_list"),
            ("dpfast.stats", "deepmd.dpmodel.utils.nlist.build_neighbor_list")} <= mine

