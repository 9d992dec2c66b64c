"""`dpharness floor`: this card's hardware floor for one training step (harness/analyse/floor.py);
prints a table and writes results/floor/<sweep_id>-<system>-floor.json atomically."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from harness.analyse import floor
from harness.core import environment, fsutil
from harness.core.errors import UserError
from harness.core.floor_record import SCHEMA, FloorRecord
from harness.core.paths import RESULTS

FLOOR = RESULTS / "floor"
MODEL = ("per forward GEMM: forward, force pass (input grad), loss backward = weight+input grads of the "
         "forward and of the force GEMM (6x); floor = sum(flops/rate at that shape) + node_cost*kernels_per_step")


def card_name(device: str) -> str:
    """The name a run record gives the same device (StoredRun.card)."""
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name(0)
    return "cpu"


def profiled_kernels(system: str, card: str, runs_dir: Path) -> tuple[float | None, str | None]:
    """kernels_per_step of the latest profiled fused run of this system on this card, and its run id."""
    from harness.results import runs as results

    best = None
    for r in results.load_runs(runs_dir, warn=lambda m: None):
        p = r.profile
        if (r.system == system and r.card() == card and str(r.variant or "").startswith("fused")
                and p is not None and p.kernels_per_step is not None):
            if best is None or (r.created or "") >= (best.created or ""):
                best = r
    return (None, None) if best is None else (best.profile.kernels_per_step, best.run_id)


def build(system_name: str, device: str, repeats: int, dtype: str | None = None, sweep_id: str | None = None,
          runs_dir: Path | None = None, log=lambda m: None) -> FloorRecord:
    from harness.prepare.systems import load_system
    from harness.results import runs as results

    system = load_system(system_name)
    s = floor.shapes(system)
    gemms = floor.step_gemms(s)
    dev = floor.resolve_device(device)
    dt = dtype or system.input["model"]["descriptor"].get("precision", "float64")
    if dt == "default":
        dt = "float64"
    floor.torch_dtype(dt)  # a bad --dtype fails before any measurement
    log(f"floor: {len({(g.m, g.k, g.n) for g in gemms})} GEMM shapes on {dev} ({dt}), {repeats} repeats each")
    meas = floor.measure(dev, dt, repeats, gemms)
    card = card_name(dev)
    kernels, source = profiled_kernels(system.name, card, runs_dir or results.RUNS)
    rates = floor.rate_table(meas["gemm_rates"])
    node = meas["graph_node"].get("s_per_node")
    gemm_ms = floor.floor_ms(gemms, rates)
    total = floor.floor_ms(gemms, rates, node, kernels)
    return FloorRecord(
        schema=SCHEMA, sweep_id=sweep_id or results.new_sweep_id(), system=system.name, device=dev, card=card,
        dtype=dt, repeats=repeats, model=MODEL,
        shapes={"nloc_by_type": list(s.nloc_by_type), "sel": list(s.sel), "embedding": list(s.embedding),
                "axis": s.axis, "fitting": list(s.fitting), "frames": s.frames, "embedding_rows": s.embedding_rows},
        gemms=[g.to_dict() for g in gemms], flops_by_group=floor.flops_by_group(gemms),
        gemm_rates=meas["gemm_rates"], bandwidth=meas["bandwidth"], graph_node=meas["graph_node"],
        kernels_per_step=kernels, kernels_source=source, gemm_ms=gemm_ms,
        node_ms=None if node is None or kernels is None else total - gemm_ms,
        floor_ms=total, environment=environment.capture(),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def format_table(rec: FloorRecord) -> str:
    lines = [f"floor {rec.sweep_id}: {rec.system} on {rec.card} ({rec.dtype})",
             f"  {'m':>8} {'k':>6} {'n':>6} {'GFLOP/s':>10} {'IQR us':>8}"]
    for r in rec.gemm_rates or []:
        lines.append(f"  {r['m']:>8} {r['k']:>6} {r['n']:>6} {r['flops_per_s'] / 1e9:>10.2f} {r['s_iqr'] * 1e6:>8.2f}")
    for grp, f in (rec.flops_by_group or {}).items():
        lines.append(f"  {grp:12} {f / 1e6:10.2f} MFLOP per step")
    bw = rec.bandwidth or {}
    lines.append(f"  copy bandwidth {bw.get('bytes_per_s', 0) / 1e9:.1f} GB/s ({bw.get('bytes', 0) >> 20} MiB)")
    gn = rec.graph_node or {}
    lines.append("  graph node " + (f"{gn['s_per_node'] * 1e6:.2f} us" if gn.get("s_per_node") is not None
                                    else f"n/a ({gn.get('reason')})"))
    k = "unknown (no profiled fused run on this card)" if rec.kernels_per_step is None else \
        f"{rec.kernels_per_step:.0f} (from {rec.kernels_source})"
    lines.append(f"  kernels per step {k}")
    nodes = "not counted" if rec.node_ms is None else f"{rec.node_ms:.3f}"
    lines.append(f"  floor {rec.floor_ms:.3f} ms/step (GEMMs {rec.gemm_ms:.3f} + nodes {nodes})")
    return "\n".join(lines)


def _cmd(a) -> int:
    if a.repeats < 1:
        raise UserError(f"--repeats must be >= 1, not {a.repeats}")
    rec = build(a.system, a.device, a.repeats, a.dtype, a.sweep_id, log=lambda m: print(m, file=sys.stderr))
    out = Path(a.out) if a.out else FLOOR / f"{rec.sweep_id}-{rec.system}-floor.json"
    fsutil.atomic_write_json(out, rec.to_dict())
    rec.path = out
    print(format_table(rec))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("floor", help="this card's hardware floor for one training step: GEMM rates at "
                              "the step's shapes, bandwidth, CUDA-graph node cost")
    p.add_argument("--system", default="water")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median, IQR)")
    p.add_argument("--dtype", default=None, help="float64 | float32 (default: the descriptor's precision)")
    p.add_argument("--sweep-id", default=None)
    p.add_argument("--out", default=None, help="record path (default results/floor/<sweep>-<system>-floor.json)")
    p.set_defaults(func=_cmd)
