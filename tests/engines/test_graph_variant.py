"""Tests of the ``graph`` variant (patches/graph): parity with upstream DeePMD-kit.

1. forward parity (energy / force / virial) against upstream's model on the same
   weights: water (if its data is present) and a small triclinic 3-type fcc box
   (rcut larger than the box: images beyond the nearest one; sel truncating),
   type_one_side false and true;
2. one training step: gradients of upstream's loss and the Adam update match;
3. end to end: a short run through the patched ``dp --pt train`` writes lcurve.out
   and a checkpoint that unpatched upstream ``dp --pt test`` evaluates.

The upstream tree (an unpacked deepmd-kit wheel with the harness's fix-ups) comes
from ``upstream_tree()`` below: env var DPH_UPSTREAM_TREE, default /tmp/site.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VARIANT_DIR = REPO / "patches" / "graph"
ENGINES = REPO / "engines"
WATER = REPO / "systems" / "water" / "data"


from _upstream_fixtures import (  # noqa: E402,F401  (data is a fixture)
    fcc_config, water_config, build_trainer, rel, data, frames_of, upstream_reference_step, assert_engine_step_matches, TREE, torch, np,
    engine_and_upstream, assert_float32_parity, python_c,
)

RTOL = 1e-10


# ----------------------------------------------------------------------------- data

# ------------------------------------------------------------------ 1. forward parity
@pytest.mark.parametrize(
    "case",
    ["fcc-tos-false", "fcc-tos-true", "fcc-tos-false-fullsel", "water-tos-false", "water-tos-true"],
)
def test_forward_parity(case, data, tmp_path):
    from dpfast import graph as graph_engine

    if case.startswith("water"):
        if "water_train" not in data:
            pytest.skip("water data not present")
        cfg = water_config(data["water_train"], data["water_valid"], tos=case.endswith("true"))
    else:
        sel = (100, 70, 50) if case.endswith("fullsel") else (60, 40, 30)
        cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos="tos-true" in case, sel=sel)
    tr = build_trainer(cfg, tmp_path)
    out, ref = engine_and_upstream(graph_engine.GraphEngine(tr), tr)
    for k in ("energy", "force", "virial"):
        e = rel(out[k], ref[k])
        assert e <= RTOL, f"{case}: {k} relative error {e:.3e}"


def test_forward_parity_float32(data, tmp_path):
    from dpfast import graph as graph_engine

    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False, prec="float32")
    tr = build_trainer(cfg, tmp_path)
    out, ref = engine_and_upstream(graph_engine.GraphEngine(tr), tr)
    assert_float32_parity(out, ref)


# -------------------------------------------------------------- 2. one training step
@pytest.mark.parametrize("case", ["fcc-tos-false", "fcc-tos-true", "water-tos-false"])
def test_one_step_parity(case, data, tmp_path):
    from dpfast import graph as graph_engine

    if case.startswith("water"):
        if "water_train" not in data:
            pytest.skip("water data not present")
        cfg = water_config(data["water_train"], data["water_valid"], tos=False)
    else:
        cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=case.endswith("true"))
    tr = build_trainer(cfg, tmp_path)
    lr = tr.lr_schedule.value(3)  # a step where the loss prefactors are mid-schedule
    ref = upstream_reference_step(tr, lr)  # upstream Adam step; weights restored after it
    # graph engine (eager on CPU): same weights, same frame, same lr
    eng = graph_engine.GraphEngine(tr)
    assert_engine_step_matches(eng, ref, lr, case, RTOL)


def test_refuses_unsupported(data, tmp_path):
    from dpfast import graph as graph_engine

    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False)
    cfg["model"]["descriptor"] = {"type": "se_e2_r", "sel": [60, 40, 30], "rcut_smth": 1.0, "rcut": 7.0,
                                  "neuron": [8, 16], "seed": 1}
    tr = build_trainer(cfg, tmp_path)
    with pytest.raises(RuntimeError, match="se_e2_a"):
        graph_engine.GraphEngine(tr)


def test_sampling_distribution(data, tmp_path):
    """Systems drawn with upstream's sampler weights, frames uniform within a system."""
    from dpfast import graph as graph_engine

    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False)
    tr = build_trainer(cfg, tmp_path)
    eng = graph_engine.GraphEngine(tr)
    eng.build_data()
    G = eng.groups[0]
    torch.manual_seed(0)
    n = 20000
    counts = torch.zeros(7)
    for _ in range(n):
        counts[eng.sample(G)] += 1
    w = tr.training_dataloader.sampler.weights.double()
    w = w / w.sum()
    nfr = [4, 3]
    expect = torch.cat([torch.full((k,), float(w[s]) / k) for s, k in enumerate(nfr)])
    assert torch.allclose(counts / n, expect.float(), atol=0.015), (counts / n, expect)


# ------------------------------------------------------------------- 3. end to end
def _clean_pythonpath() -> str:
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    keep = [p for p in keep if Path(p).resolve() not in (REPO, VARIANT_DIR, ENGINES)]
    return os.pathsep.join([str(TREE), *keep])


@pytest.mark.parametrize("variant", ["graph", "fused", "fused-onthefly", "fused-predict", "fused-blocks",
                                     "fused-nets"])
def test_end_to_end_train_then_upstream_test(variant, data, tmp_path):
    """graph (precomputed geometry) and fused (its patch module on top of graph's; on-the-fly
    geometry, compact by default; every fused flavour with its manifest's env. fused: its
    compiled whole step and compiled Adam, on CPU with DPH_COMPILE_CPU=1 and the aot_eager backend;
    fused-onthefly: DPH_GEOM=onthefly, eager on CPU (no DPH_COMPILE_CPU); fused-predict: the knobs
    off, eager on CPU; fused-nets: DPH_FUSED_GROUPED=nets, contractions per block, eager on CPU;
    fused-blocks: DPH_FUSED_GROUPED=0, per-block nets and contractions instead
    of fused's grouped ones, eager on CPU) train through the patched `dp --pt train`; upstream tests the result."""
    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False, steps=20)
    (tmp_path / "input.json").write_text(json.dumps(cfg))
    chain = [VARIANT_DIR / "select_engine.py"] + ([REPO / "patches" / "fused" / "select_engine.py"] if variant.startswith("fused") else [])
    load = "".join(
        f"spec = importlib.util.spec_from_file_location('{m.stem}', {str(m)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        for m in chain
    )
    driver = (
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {str(TREE)!r}); sys.path.insert(1, {str(REPO)!r}); sys.path.insert(2, {str(ENGINES)!r})\n"
        "from harness.child import runtime\n"
        + load
        + "from deepmd.main import main\n"
        "main(['--pt', 'train', 'input.json'])\n"
        "assert runtime.clock.owner == 'graph', runtime.clock.owner\n"
        "print('TICKS', len(runtime.clock._host))\n"
    )
    env = dict(os.environ, PYTHONPATH=_clean_pythonpath())
    for k in ("DPH_GEOM", "DPH_FUSED_COMPILE_STEP", "DPH_FLAT_ADAM_COMPILE", "DPH_COMPILE_CPU", "DPH_COMPILE_BACKEND",
              "DPH_FUSED_GROUPED"):
        env.pop(k, None)
    from harness.prepare import variants

    env.update(variants.chain_env(variants.chain(variant)))  # what the variant's manifest sets
    if variant == "fused":
        env.update(DPH_COMPILE_CPU="1", DPH_COMPILE_BACKEND="aot_eager")
    p = subprocess.run(python_c(driver), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "TICKS 20" in p.stdout
    assert "graph: group" in p.stderr + p.stdout and "bytes" in p.stderr + p.stdout
    mode = {"graph": "precomputed", "fused": "compact", "fused-onthefly": "onthefly", "fused-predict": "compact",
            "fused-blocks": "compact", "fused-nets": "compact"}[variant]
    assert f"({mode} mode;" in p.stderr + p.stdout
    step_on = "fused: compiled whole step enabled" in p.stderr + p.stdout
    adam_on = "graph: flat Adam step compiled" in p.stderr + p.stdout
    assert step_on == adam_on == (variant == "fused")
    if variant.startswith("fused"):
        nets = {"fused-blocks": "per-block embedding nets, per-type fitting nets, per-block",
                "fused-nets": "grouped embedding nets, grouped fitting nets, per-block"}.get(
            variant, "grouped embedding nets, grouped fitting nets, grouped")  # fused: DPH_FUSED_GROUPED=1
        assert f"fused: {nets} contractions" in p.stderr + p.stdout
    lines = (tmp_path / "lcurve.out").read_text().splitlines()
    assert lines[0].split()[:2] == ["#", "step"]
    assert "rmse_e_val" in lines[0] and "rmse_f_trn" in lines[0] and "rmse_v_trn" in lines[0]
    rows = [l.split() for l in lines if not l.startswith("#")]
    assert [int(r[0]) for r in rows] == [1, 10, 20]
    assert all(len(r) == len(lines[0].split()) - 1 for r in rows)
    assert all(np.isfinite(float(x)) for r in rows for x in r[1:])
    assert (tmp_path / "model.ckpt-20.pt").exists() and (tmp_path / "model.ckpt.pt").exists()
    ck = torch.load(tmp_path / "model.ckpt-20.pt", map_location="cpu", weights_only=True)
    assert set(ck) >= {"model", "optimizer"}
    assert ck["model"]["_extra_state"]["train_infos"]["step"] == 19

    # unpatched upstream evaluates the checkpoint
    test_cmd = (
        "from deepmd.main import main; "
        f"main(['--pt', 'test', '-m', 'model.ckpt.pt', '-s', {str(data['fcc_valid'][0])!r}, '-n', '2', '-d', 'dptest'])"
    )
    env = dict(os.environ, PYTHONPATH=_clean_pythonpath())
    q = subprocess.run(python_c(test_cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert "Energy RMSE" in q.stdout + q.stderr
    assert (tmp_path / "dptest.e.out").exists()
    # and freezes it (TorchScript of upstream's model with the engine-trained weights)
    fz = subprocess.run(python_c("from deepmd.main import main; "
                                 "main(['--pt', 'freeze', '-c', 'model.ckpt.pt', '-o', 'frozen.pth'])"),
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert fz.returncode == 0, fz.stdout[-3000:] + fz.stderr[-3000:]
    assert (tmp_path / "frozen.pth").stat().st_size > 0


def test_restart_carries_flat_optimizer_state(data, tmp_path):
    """Checkpoint written from the flat buffers (upstream's optimizer state_dict: one step count per
    parameter, moments) and a restart through upstream's --restart loading it into the engine."""
    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False, steps=6)
    cfg["training"].update(disp_freq=3, save_freq=3)
    (tmp_path / "input.json").write_text(json.dumps(cfg))
    driver = (
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {str(TREE)!r}); sys.path.insert(1, {str(REPO)!r}); sys.path.insert(2, {str(ENGINES)!r})\n"
        f"spec = importlib.util.spec_from_file_location('select_engine', {str(VARIANT_DIR / 'select_engine.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "from deepmd.main import main\n"
        "main(['--pt', 'train', 'input.json'] + sys.argv[1:])\n"
    )
    env = dict(os.environ, PYTHONPATH=_clean_pythonpath())
    p = subprocess.run(python_c(driver), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ck = torch.load(tmp_path / "model.ckpt-3.pt", map_location="cpu", weights_only=True)
    st = ck["optimizer"]["state"]
    assert len(st) >= 8 and {float(s["step"]) for s in st.values()} == {3.0}
    assert all(float(s["exp_avg_sq"].abs().sum()) > 0 for s in st.values())
    cfg["training"]["numb_steps"] = 9
    (tmp_path / "input.json").write_text(json.dumps(cfg))
    p = subprocess.run(python_c(driver, "--restart", "model.ckpt-6.pt"), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ck9 = torch.load(tmp_path / "model.ckpt-9.pt", map_location="cpu", weights_only=True)
    # upstream restarts at start_step = the saved step_id (5), so steps 5..8 run again: 6 + 4 = 10
    # Adam steps, as upstream's own optimizer would count
    assert {float(s["step"]) for s in ck9["optimizer"]["state"].values()} == {10.0}
    assert "restart optimizer state covers" not in p.stderr + p.stdout  # every parameter had state
