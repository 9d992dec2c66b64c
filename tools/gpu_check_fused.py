"""GPU check of the ``fused`` variant, one call: forward/gradient parity on CUDA (float64:
fused eager, fused compiled, graph autograd, upstream), then ms/step of upstream baseline,
graph, fused (eager analytic and Inductor-compiled) and the precision flavours, all in
the same call on the same card, timed with harness.child.runtime's CUDA events.

Usage: python tools/gpu_check_fused.py TREE OUTDIR PLAN
PLAN: comma list of system:variant:steps, variant in baseline, graph, fused, fused-eager,
fused-fp32, fused-mixed, fused-autograd (fused engine, autograd forces), fused-batched
(padded stacked-weight GEMMs for all nets instead of per-block nets), fused-onthefly
(DPH_GEOM=onthefly geometry, as patches/fused-onthefly; fused itself stores compact geometry),
fused-blocks (DPH_FUSED_GROUPED=0: one net GEMM chain per descriptor block / atom type, as
patches/fused-blocks), fused-nets (DPH_FUSED_GROUPED=nets: nets grouped, contractions per
block, as patches/fused-nets). These are engine knobs over the engine's defaults, not the
variants' manifests: here `fused` groups nets and contractions (as bench's fused) but compiles
only predict (as patches/fused-predict); bench's `fused` also compiles the whole step.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness.core import envvars  # tools/gpu_env.sh puts the repo root on PYTHONPATH

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "engines"
GRAPH_SEL = ROOT / "patches" / "graph" / "select_engine.py"
FUSED_SEL = ROOT / "patches" / "fused" / "select_engine.py"

VARIANTS = {
    "baseline": ([], {}, None),
    "graph": ([GRAPH_SEL], {}, None),
    "fused": ([GRAPH_SEL, FUSED_SEL], {}, None),
    "fused-onthefly": ([GRAPH_SEL, FUSED_SEL], {"DPH_GEOM": "onthefly"}, None),
    "fused-batched": ([GRAPH_SEL, FUSED_SEL], {"DPH_FUSED_BATCHED": "1"}, None),
    "fused-blocks": ([GRAPH_SEL, FUSED_SEL], {"DPH_FUSED_GROUPED": "0"}, None),
    "fused-nets": ([GRAPH_SEL, FUSED_SEL], {"DPH_FUSED_GROUPED": "nets"}, None),
    "fused-eager": ([GRAPH_SEL, FUSED_SEL], {"DPH_FUSED_COMPILE": "0"}, None),
    "fused-autograd": ([GRAPH_SEL, FUSED_SEL], {"DPH_FUSED_AUTOGRAD": "1"}, None),
    "fused-fp32": ([GRAPH_SEL, FUSED_SEL], {}, "float32"),
    "fused-mixed": ([GRAPH_SEL, FUSED_SEL, ROOT / "patches" / "fused-mixed" / "enable_tf32.py"], {}, "float32"),
    "fp32": ([], {}, "float32"),
}


def make_input(system: str, workdir: Path, steps: int, disp: int, prec: str | None) -> Path:
    src = ROOT / "systems" / system / "input.json"
    cfg = json.loads(src.read_text())
    tr = cfg["training"]
    base = src.parent
    for key in ("training_data", "validation_data"):
        tr[key]["systems"] = [str((base / p).resolve()) for p in tr[key]["systems"]]
    tr["numb_steps"] = steps
    tr["disp_freq"] = disp
    tr["save_freq"] = steps
    if prec:
        cfg["model"]["descriptor"]["precision"] = prec
        cfg["model"]["fitting_net"]["precision"] = prec
    workdir.mkdir(parents=True, exist_ok=True)
    p = workdir / "input.json"
    p.write_text(json.dumps(cfg, indent=1))
    return p


def run_train(tree: str, system: str, variant: str, steps: int, out: Path, log, timeout: float) -> dict:
    mods, extra_env, prec = VARIANTS[variant]
    wd = out / f"{system}_{variant}"
    make_input(system, wd, steps, disp=max(100, steps // 4), prec=prec)
    cmd = [sys.executable, "-m", "harness.child.launch", "--tree", tree]
    for m in mods:
        cmd += ["--module", str(m)]
    cmd += ["--", "--pt", "train", "input.json"]
    env = dict(os.environ, PYTHONPATH=f"{tree}:{ROOT}:{ENGINES}:" + os.environ.get("PYTHONPATH", ""),
               **{envvars.DPH_RUN_DIR: str(wd)}, **extra_env)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e)
    wall = time.time() - t0
    log.write(f"\n===== {system} {variant} rc={rc} wall={wall:.1f}s\n")
    log.write("\n".join(l for l in text.splitlines() if "Triton" not in l and "Warning" not in l)[-4000:] + "\n")
    res = {"system": system, "variant": variant, "rc": rc, "wall_s": round(wall, 1)}
    sj = wd / "steps.json"
    if sj.exists():
        d = json.loads(sj.read_text())
        st = d["step_s"][:-1] if len(d["step_s"]) > 1 else d["step_s"]
        n = len(st)
        disp = max(100, steps // 4)
        ss = [x for i, x in enumerate(st) if i >= n // 5 and (i + 1) % disp != 0 and i != 0]
        res.update(clock=d.get("clock"), steps=n,
                   median_ms=1e3 * statistics.median(ss) if ss else None,
                   mean_ms=1e3 * statistics.fmean(ss) if ss else None,
                   startup_s=d.get("startup_s"), gpu_peak_bytes=d.get("gpu_peak_bytes"))
    for line in text.splitlines():
        if "fused:" in line or "graph: CUDA graphs" in line or "graph: setup" in line or "graph: group" in line:
            res.setdefault("log", []).append(line.split("INFO")[-1].strip()[:300])
    if (wd / "lcurve.out").exists():
        res["lcurve_tail"] = (wd / "lcurve.out").read_text().splitlines()[-1]
    return res


PARITY = r"""
import os, sys, json, torch, numpy as np
from harness.core import envvars
sys.path.insert(0, %(engines)r)
import deepmd.pt.train.training as T
from dpfast import analytic_nets, graph as graph_engine, fused as fused_engine
def rel(a, b):
    a = a.detach().reshape(-1).double(); b = b.detach().reshape(-1).double()
    return float((a - b).norm() / b.norm())
def run(self):
    eng = fused_engine.FusedEngine(self)
    s = self.training_dataloader.dataset.systems[0]
    frs = [s[i] for i in range(2)]
    dev = eng.device
    coord = torch.tensor(np.stack([f["coord"] for f in frs]), device=dev)
    atype = torch.tensor(np.stack([f["atype"] for f in frs]), device=dev).long()
    box = torch.tensor(np.stack([np.asarray(f["box"]) for f in frs]), device=dev)
    ref = self.model(coord.reshape(2, -1), atype, box=box.reshape(2, 9))
    r = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    out = eng.predict_frames(coord, atype, box)
    for k in ["energy", "force", "virial"]:
        r["eager_vs_upstream_" + k] = rel(out[k], ref[k])
    eng.autograd_forces = True
    outg = eng.predict_frames(coord, atype, box)
    eng.autograd_forces = False
    eng.batched = False
    outl = eng.predict_frames(coord, atype, box)
    eng.batched = True
    r["batched_vs_loop_force"] = rel(out["force"], outl["force"])
    eng.autograd_forces = False
    for k in ["force", "virial"]:
        r["eager_vs_graph_autograd_" + k] = rel(out[k], outg[k])
    # gradients of a force loss: analytic (eager, compiled) vs graph's double backward
    params = [p for p in self.wrapper.parameters()]
    at = atype[0]
    tcount = [int((at == t).sum()) for t in range(eng.ntypes)]
    geom = eng.frames_geometry(coord, at, box)
    g_rt, g_jac, jidx, g_diff = eng.step_geometry(geom)
    def grads(mode):
        eng.autograd_forces = mode == "autograd"
        eng.batched = mode != "loop"
        if mode == "compiled":
            eng.enable_compile()
        o = eng.predict(g_rt, g_jac, jidx, g_diff, tcount, eng.out_bias_per_type(), create_graph=True)
        l = (o["force"] ** 2).sum() + o["energy"].sum() ** 2
        gs = torch.autograd.grad(l, params, allow_unused=True)
        eng.autograd_forces = False
        return o, torch.cat([g.reshape(-1) for g in gs if g is not None])
    _, ga = grads("autograd")
    _, ge = grads("eager")
    r["grad_eager_vs_autograd"] = rel(ge, ga)
    _, gl = grads("loop")
    r["grad_loop_vs_autograd"] = rel(gl, ga)
    eng.batched = True
    try:
        if envvars.get(envvars.DPH_PARITY_COMPILED) != "1":
            raise RuntimeError("compiled parity not requested (DPH_PARITY_COMPILED=1)")
        oc, gc = grads("compiled")
        r["grad_compiled_vs_autograd"] = rel(gc, ga)
        r["force_compiled_vs_upstream"] = rel(oc["force"], ref["force"])
    except Exception as e:
        r["compiled_error"] = repr(e)[:800]
    eng._compiled = None
    # gradcheck (float64) of the hand-written pieces on a tiny net slice
    lay = eng.emb_layers[0]
    s0 = torch.rand(3, 5, 1, dtype=torch.float64, device=dev, requires_grad=True)
    def f(x):
        G, dG = analytic_nets.embed_with_tangent(x, lay)
        return G, dG
    r["gradcheck_embed_tangent"] = bool(torch.autograd.gradcheck(f, (s0,), atol=1e-8))
    G, dG = f(s0)
    num = torch.autograd.grad(G.sum(), s0)[0]
    r["tangent_vs_autograd"] = rel(dG.sum(-1, keepdim=True), num)
    print("PARITY", json.dumps(r))
T.Trainer.run = run
from deepmd.main import main
main(["--pt", "train", "input.json"])
"""


def parity(tree: str, out: Path, log, systems) -> None:
    code = PARITY % {"engines": str(ENGINES)}
    for system in systems:
        wd = out / f"parity_{system}"
        make_input(system, wd, 10, 10, None)
        env = dict(os.environ, PYTHONPATH=f"{tree}:{ROOT}:{ENGINES}:" + os.environ.get("PYTHONPATH", ""))
        try:
            p = subprocess.run([sys.executable, "-c", code], cwd=wd, env=env, capture_output=True, text=True, timeout=150)
            text = p.stdout + p.stderr
            rc = p.returncode
        except subprocess.TimeoutExpired:
            text, rc = "timeout", "timeout"
        lines = [l for l in text.splitlines() if "PARITY" in l]
        log.write(f"parity {system}: rc={rc} {lines[-1] if lines else text[-3000:]}\n")


def main() -> None:
    tree, outdir, plan = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    budget = envvars.get_float(envvars.DPH_GPU_BUDGET_S)
    t_start = time.time()
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(envvars.get_str(envvars.DPH_GPU_WORK))
    work.mkdir(parents=True, exist_ok=True)
    with open(outdir / "gpu_check.log", "w", buffering=1) as log:
        import torch

        log.write(f"card: {torch.cuda.get_device_name()} torch {torch.__version__}\n")
        par = envvars.get_str(envvars.DPH_PARITY_SYSTEMS)
        if par:
            parity(tree, work, log, par.split(","))
        results = []
        for item in plan.split(","):
            system, variant, n = item.split(":")
            left = budget - (time.time() - t_start)
            if left < 15:
                log.write(f"skipped {item}: budget\n")
                continue
            r = run_train(tree, system, variant, int(n), work, log, timeout=left)
            results.append(r)
            log.write(json.dumps(r) + "\n")
            (outdir / "gpu_check.json").write_text(json.dumps(results, indent=1))
        for r in results:
            b = [x for x in results if x["system"] == r["system"] and x["variant"] == "baseline" and x.get("median_ms")]
            if r.get("median_ms"):
                sp = f" x{b[0]['median_ms'] / r['median_ms']:.1f} vs baseline" if b else ""
                log.write(f"TIMING {r['system']} {r['variant']}: {r['median_ms']:.3f} ms/step (mean {r['mean_ms']:.3f}), peak {r.get('gpu_peak_bytes')} B{sp}\n")


if __name__ == "__main__":
    main()
