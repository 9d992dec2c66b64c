"""GPU check of the ``graph`` variant: forward parity on CUDA, then upstream vs graph
ms/step on water / copper / Al-Cu-Mg (float64), timed with harness.runtime's CUDA events.

Usage (repo root, upstream tree importable):  python tools/gpu_check_graph.py TREE OUTDIR [steps...]
Normally run through gpu_check.sh, which prepares the environment first.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "engines"


def make_input(system: str, workdir: Path, steps: int, disp: int) -> Path:
    src = ROOT / "systems" / system / "input.json"
    cfg = json.loads(src.read_text())
    tr = cfg["training"]
    base = src.parent
    for key in ("training_data", "validation_data"):
        tr[key]["systems"] = [str((base / p).resolve()) for p in tr[key]["systems"]]
    tr["numb_steps"] = steps
    tr["disp_freq"] = disp
    tr["save_freq"] = steps
    workdir.mkdir(parents=True, exist_ok=True)
    p = workdir / "input.json"
    p.write_text(json.dumps(cfg, indent=1))
    return p


def run_train(tree: str, system: str, variant: str, steps: int, out: Path, log) -> dict:
    wd = out / f"{system}_{variant}"
    make_input(system, wd, steps, disp=100)
    cmd = [sys.executable, "-m", "harness.launch", "--tree", tree]
    if variant == "graph":
        cmd += ["--module", str(ROOT / "patches" / "graph" / "select_engine.py")]
    cmd += ["--", "--pt", "train", "input.json"]
    env = dict(os.environ, DPH_RUN_DIR=str(wd), PYTHONPATH=f"{tree}:{ROOT}:{ENGINES}:" + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    p = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    text = p.stdout + p.stderr
    log.write(f"\n===== {system} {variant} rc={p.returncode} wall={wall:.1f}s\n")
    log.write("\n".join(l for l in text.splitlines() if "Triton" not in l)[-6000:] + "\n")
    res = {"system": system, "variant": variant, "rc": p.returncode, "wall_s": wall}
    sj = wd / "steps.json"
    if sj.exists():
        d = json.loads(sj.read_text())
        st = d["step_s"][:-1] if len(d["step_s"]) > 1 else d["step_s"]
        n = len(st)
        ss = [x for i, x in enumerate(st) if i >= n // 5 and (i + 1) % 100 != 0 and i != 0]
        res.update(
            clock=d.get("clock"),
            steps=n,
            median_ms=1e3 * statistics.median(ss) if ss else None,
            mean_ms=1e3 * statistics.fmean(ss) if ss else None,
            startup_s=d.get("startup_s"),
            gpu_peak_bytes=d.get("gpu_peak_bytes"),
        )
    for line in text.splitlines():
        if "graph: group" in line or "graph: CUDA graphs" in line or "graph: geometry" in line:
            res.setdefault("graph_log", []).append(line.split("INFO")[-1].strip())
    if (wd / "lcurve.out").exists():
        res["lcurve_tail"] = (wd / "lcurve.out").read_text().splitlines()[-1]
    return res


def parity(tree: str, out: Path, log) -> None:
    code = r"""
import sys, json, torch, numpy as np
sys.path.insert(0, %r)
import deepmd.pt.train.training as T
from dpfast import graph as graph_engine
def run(self):
    eng = graph_engine.GraphEngine(self)
    s = self.training_dataloader.dataset.systems[0]
    frs = [s[i] for i in range(4)]
    dev = eng.device
    coord = torch.tensor(np.stack([f["coord"] for f in frs]), device=dev)
    atype = torch.tensor(np.stack([f["atype"] for f in frs]), device=dev).long()
    box = torch.tensor(np.stack([np.asarray(f["box"]) for f in frs]), device=dev)
    ref = self.model(coord.reshape(4, -1), atype, box=box.reshape(4, 9))
    outp = eng.predict_frames(coord, atype, box)
    r = {"device": str(dev), "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for k in ["energy", "force", "virial"]:
        a, b = outp[k].detach(), ref[k].detach().reshape(outp[k].shape)
        r[k] = float((a - b).norm() / b.norm())
    print("PARITY", json.dumps(r))
T.Trainer.run = run
from deepmd.main import main
main(["--pt", "train", "input.json"])
""" % str(ENGINES)
    for system in ("water", "copper"):
        wd = out / f"parity_{system}"
        make_input(system, wd, 10, 10)
        env = dict(os.environ, PYTHONPATH=f"{tree}:{ROOT}:{ENGINES}:" + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-c", code], cwd=wd, env=env, capture_output=True, text=True)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if "PARITY" in l]
        log.write(f"parity {system}: rc={p.returncode} {lines[-1] if lines else (p.stdout + p.stderr)[-3000:]}\n")


def main() -> None:
    tree, outdir = sys.argv[1], Path(sys.argv[2])
    plan = sys.argv[3] if len(sys.argv) > 3 else "water:300:2000,copper:200:1000,alcumg:200:1000"
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("DPH_GPU_WORK", "/tmp/graph_gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    with open(outdir / "gpu_check.log", "w", buffering=1) as log:
        try:
            import torch

            log.write(f"card: {torch.cuda.get_device_name()} torch {torch.__version__}\n")
        except Exception as e:  # noqa: BLE001
            log.write(f"no cuda: {e}\n")
        if os.environ.get("DPH_SKIP_PARITY") != "1":
            parity(tree, work, log)
        results = []
        for item in plan.split(","):
            system, nb, ng = item.split(":")
            for variant, n in (("baseline", int(nb)), ("graph", int(ng))):
                if n <= 0:
                    continue
                r = run_train(tree, system, variant, n, work, log)
                results.append(r)
                log.write(json.dumps(r) + "\n")
                (outdir / "gpu_check.json").write_text(json.dumps(results, indent=1))
        for system in {r["system"] for r in results}:
            b = [r for r in results if r["system"] == system and r["variant"] == "baseline"]
            g = [r for r in results if r["system"] == system and r["variant"] == "graph"]
            if b and g and b[0].get("median_ms") and g[0].get("median_ms"):
                log.write(
                    f"SPEEDUP {system}: baseline {b[0]['median_ms']:.3f} ms/step, graph {g[0]['median_ms']:.3f} ms/step, x{b[0]['median_ms'] / g[0]['median_ms']:.1f}\n"
                )


if __name__ == "__main__":
    main()
