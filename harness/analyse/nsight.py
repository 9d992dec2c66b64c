"""Stage: profiles, the Nsight half. Nsight Systems (a report beside the torch.profiler window,
where nsys can make one) and Nsight Compute (a separate short run of a profiled variant under
``ncu`` for its top kernels: how far each is from the card's peak). Command building, CSV parsing
and the figures need no tools, so they are tested on CPU. The ncu run itself is a run of the
pipeline (harness.run.bench): ``ncu_plan`` says how to launch it, ``ncu_result`` reads what it
measured."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from harness.core import fsutil
from harness.core.formatting import number
from harness.core.records import NcuResult, Profile, StoredRun, TrainResult

NSYS_BASE = "nsys"  # <work_dir>/nsys.nsys-rep
NCU_JSON = "ncu.json"


def summaries(work_dir: Path) -> dict[str, Any]:
    """What a run's work dir holds from Nsight: {"nsys": top kernels of its report (when nsys can
    read it)}, {"ncu": its ncu.json}; absent keys where there is nothing."""
    wd, d = Path(work_dir), {}
    rep = wd / f"{NSYS_BASE}.nsys-rep"
    if rep.is_file() and nsys_usable():
        try:
            r = subprocess.run(nsys_stats_command(rep), capture_output=True, text=True, timeout=600)
            if r.returncode == 0:
                d["nsys"] = {"report": rep.name, "top_kernels": parse_nsys_kern_sum(r.stdout)[:15]}
        except (OSError, subprocess.TimeoutExpired) as e:
            d["nsys"] = {"report": rep.name, "error": str(e)}
    ncu = wd / NCU_JSON
    if ncu.is_file():
        d["ncu"] = json.loads(ncu.read_text())
    return d


# -- Nsight Systems

def nsys_usable() -> bool:
    exe = shutil.which("nsys")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def nsys_command(out_base: Path, cmd: list[str]) -> list[str]:
    """Wrap a training command with `nsys profile`; NVTX ranges come from the dph:: ranges."""
    return ["nsys", "profile", "--trace=cuda,nvtx,osrt", "--sample=none", "--cpuctxsw=none",
            "--force-overwrite=true", "--export=none", "-o", str(out_base), *cmd]


def nsys_stats_command(rep: Path) -> list[str]:
    return ["nsys", "stats", "--report", "cuda_gpu_kern_sum", "--format", "csv", "--output", "-", str(rep)]


def parse_nsys_kern_sum(text: str) -> list[dict[str, Any]]:
    """Rows of `nsys stats --report cuda_gpu_kern_sum --format csv` (header found by 'Time (%)')."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if "Time (%)" in ln and "Name" in ln), None)
    if start is None:
        return []
    rows = []
    for r in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if not r.get("Name"):
            continue
        rows.append({"name": r["Name"], "pct": _num(r.get("Time (%)")),
                     "total_s": _num(r.get("Total Time (ns)")) * 1e-9 if r.get("Total Time (ns)") else None,
                     "count": int(_num(r.get("Instances")) or 0)})
    return sorted(rows, key=lambda r: -(r["total_s"] or 0))


# -- Nsight Compute

NCU_METRICS = (
    "gpu__time_duration.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes.sum.per_second",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    # FP64 FLOPs on the CUDA cores (ncu's roofline counters); DMMA tensor-core GEMMs are not in
    # these, their share of the card shows in sm__throughput
    "sm__sass_thread_inst_executed_op_dadd_pred_on.sum",
    "sm__sass_thread_inst_executed_op_dmul_pred_on.sum",
    "sm__sass_thread_inst_executed_op_dfma_pred_on.sum",
)
NCU_SKIP_PER_CONFIG = 2   # launches of each kernel configuration not measured (first calls)
NCU_MAX_LAUNCHES = 40     # an old ncu's launch budget: each measured launch replays ~10 passes
_UNIT_SCALE = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
# the base units ncu prints, spelled out or short ('--print-units base' on ncu 2025 says 'ns')
_BASE_UNITS = ("byte/second", "byte/s", "B/s", "second", "byte", "B", "s")


def _in_base_units(value: float, unit: str | None) -> float:
    """ncu's units to base ones: 'nsecond' / 'ns' -> s, 'Gbyte/second' / 'GB/s' -> byte/s;
    a unit that is not a (scaled) time or byte count ('%', 'inst', 'pass') is left as it is."""
    u = (unit or "").strip()
    for base in _BASE_UNITS:
        if u.endswith(base):
            prefix = u[:-len(base)]
            if prefix == "":
                return value
            if prefix in _UNIT_SCALE:
                return value * _UNIT_SCALE[prefix]
    return value


# Datasheet peaks (boost clock) of the cards we run on: FP64 on the CUDA cores (not the DMMA
# tensor cores) in TFLOP/s, and HBM bandwidth in TB/s. ncu's own "% of peak" counters are used
# where it has them (SM, DRAM); these give the FP64 rate's share, which ncu has no counter for.
CARD_PEAKS = (  # (substring of the CUDA device name, fp64 TFLOP/s, DRAM TB/s), first match wins
    ("H100 PCIe", 25.6, 2.0),
    ("H100 NVL", 30.0, 3.9),
    ("H100", 33.5, 3.35),  # SXM5 80GB HBM3
    ("H200", 33.5, 4.8),
    ("A100", 9.7, 2.0),
)


def card_peaks(gpu_name: str | None) -> tuple[float, float] | None:
    """(fp64 FLOP/s, DRAM byte/s) datasheet peaks of a card named like torch's device name."""
    for key, fp64, dram in CARD_PEAKS:
        if gpu_name and key in gpu_name:
            return fp64 * 1e12, dram * 1e12
    return None


def ncu_figures(kernel: dict[str, Any], gpu_name: str | None = None) -> dict[str, float | None]:
    """How far one kernel is from the card: its time, SM and DRAM throughput as % of peak,
    achieved DRAM bandwidth and CUDA-core FP64 FLOP rate (from parse_ncu_csv's entry), and that
    rate as % of the card's datasheet FP64 peak when the card is known (CARD_PEAKS)."""
    m, units = kernel.get("metrics") or {}, kernel.get("units") or {}

    def get(name: str) -> float | None:
        return _in_base_units(m[name], units.get(name)) if name in m else None

    t = get("gpu__time_duration.sum")
    if t is not None and not (units.get("gpu__time_duration.sum") or "").strip():
        t *= 1e-9  # ncu's time counters are in ns when no unit is given
    ops = [get(f"sm__sass_thread_inst_executed_op_{o}_pred_on.sum") for o in ("dadd", "dmul", "dfma")]
    flops = None if None in ops or not t else (ops[0] + ops[1] + 2 * ops[2]) / t
    bw = get("dram__bytes.sum.per_second")
    peaks = card_peaks(gpu_name)
    return {"time_us": None if t is None else t * 1e6,
            "sm_pct": m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed"),
            "dram_pct": m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
            "dram_gb_s": None if bw is None else bw / 1e9,
            "fp64_gflop_s": None if flops is None else flops / 1e9,
            "fp64_pct": None if flops is None or not peaks else 100 * flops / peaks[0]}


def kernel_base_name(name: str) -> str:
    """'void at::native::foo<4, bar>(int, float)' -> 'foo' (what `--kernel-name-base function` matches)."""
    n = re.sub(r"^void\s+", "", name.strip())
    n = re.split(r"[<(]", n, maxsplit=1)[0]  # drop template args and parameters
    return n.split("::")[-1].strip() or name


def ncu_command(kernels: list[str], cmd: list[str], launch_skip: int = 200,
                launch_count: int = 1, metrics: tuple[str, ...] = NCU_METRICS,
                per_launch_config: bool = False) -> list[str]:
    """`ncu --csv` over the given kernels (torch.profiler names). per_launch_config: ncu applies
    launch_skip / launch_count to each launch configuration (kernel, grid, block, shared memory)
    on its own, so every kernel gets its launch whatever its rate; otherwise they count all
    matching launches together (launch_count then covers every kernel: launch_count x kernels)."""
    bases = sorted({re.escape(kernel_base_name(k)) for k in kernels})
    # application-only: Inductor's compile workers are not CUDA work worth instrumenting
    c = ["ncu", "--csv", "--page", "raw", "--print-units", "base", "--target-processes", "application-only",
         "--metrics", ",".join(metrics), "--kernel-name-base", "function"]
    if per_launch_config:
        c += ["--filter-mode", "per-launch-config", "--launch-skip", str(launch_skip),
              "--launch-count", str(launch_count)]
    else:
        c += ["--launch-skip", str(launch_skip), "--launch-count", str(launch_count * max(1, len(bases)))]
    if bases:
        c += ["--kernel-name", "regex:^(" + "|".join(bases) + ")$"]
    return c + list(cmd)


def ncu_has_per_launch_config(ncu: str = "ncu") -> bool:
    """Whether this ncu has `--filter-mode per-launch-config` (2022.2 and later)."""
    try:
        r = subprocess.run([ncu, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return "per-launch-config" in (r.stdout + r.stderr)


def _num(s: Any) -> float | None:
    if s is None:
        return None
    try:
        return float(str(s).replace(",", "").strip())
    except ValueError:
        return None


def parse_ncu_csv(text: str, keep: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Parse `ncu --csv` output. Handles the long format (one row per metric: 'Metric Name',
    'Metric Value') and `--page raw` (one row per launch, one column per metric, a units row
    after the header). Returns one entry per kernel name with metrics averaged over launches.
    keep: only these metrics (`--page raw` also lists ~200 device attributes and launch facts)."""
    wanted = None if keep is None else set(keep)
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    head = rows[0]
    body = rows[1:]
    acc: dict[str, dict[str, list[float]]] = {}
    order: list[str] = []
    units: dict[str, str] = {}
    if "Metric Name" in head and "Metric Value" in head:
        ki, mi, vi = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
        ui = head.index("Metric Unit") if "Metric Unit" in head else None
        for r in body:
            if len(r) <= max(ki, mi, vi):
                continue
            v = _num(r[vi])
            if v is None or (wanted is not None and r[mi] not in wanted):
                continue
            if r[ki] not in acc:
                order.append(r[ki])
            acc.setdefault(r[ki], {}).setdefault(r[mi], []).append(v)
            if ui is not None and len(r) > ui and r[ui]:
                units[r[mi]] = r[ui]
    else:
        ki = head.index("Kernel Name")
        if body and (not body[0][0].strip() or not body[0][0].strip().isdigit()):
            units = {h: u for h, u in zip(head, body[0]) if "__" in h and u}
            body = body[1:]  # units row
        for r in body:
            if len(r) != len(head):
                continue
            if r[ki] not in acc:
                order.append(r[ki])
            for h, cell in zip(head, r):
                if "__" in h and (wanted is None or h in wanted):  # metric columns: unit__counter.rollup
                    v = _num(cell)
                    if v is not None:
                        acc.setdefault(r[ki], {}).setdefault(h, []).append(v)
    return [{"name": k, "launches": max((len(v) for v in acc[k].values()), default=0),
             "metrics": {m: sum(v) / len(v) for m, v in acc[k].items()},
             "units": {m: units[m] for m in acc[k] if m in units}} for k in order]


@dataclass(frozen=True)
class NcuPlan:
    """The Nsight Compute run of a profiled run, as the pipeline plans it (harness.run.bench): the
    same variant trained `steps` steps with `prefix` (the ncu command) before the training child
    and `env` in its environment."""

    kernels: tuple[str, ...]
    prefix: tuple[str, ...]
    steps: int
    env: dict[str, str]


def ncu_plan(p: Profile | None, k: int) -> NcuPlan | None:
    """The ncu run over the top-k kernels of a profiled run (None: its profile has no GPU kernels).
    It trains to just past the profiled window's start."""
    top = ((p.top_kernels if p is not None else None) or [])[:k]
    kernels = [x["name"] for x in top]
    if not kernels:
        return None
    skip_steps = max(3, (p.window or {}).get("start_step", 10))
    # Skipping by a count of launches must not overshoot: warm-up, capture (kernels captured into
    # a CUDA graph are not launched) and compile steps launch fewer kernels than the profiled
    # window's steps, and a skip past the run's last launch measures nothing (it did, for fused).
    # ncu flushes the caches before each measured launch anyway, so an early launch is as good
    # as a late one; skipped: the first launches (lazy module loading, autotuning).
    if ncu_has_per_launch_config():
        prefix = ncu_command(kernels, [], launch_skip=NCU_SKIP_PER_CONFIG, launch_count=1, per_launch_config=True)
    else:  # an old ncu counts matches together: skip ~2 steps' worth, measure ~1 step's worth
        per_step = sum(x["count"] for x in top) / max(1, p.steps or 1)
        prefix = ncu_command(kernels, [], launch_skip=int(2 * per_step),
                             launch_count=max(1, min(NCU_MAX_LAUNCHES, round(per_step)) // max(1, len(kernels))))
    # one compile thread: Inductor's worker pool would start CUDA contexts ncu has to attach to
    return NcuPlan(kernels=tuple(kernels), prefix=tuple(prefix), steps=skip_steps + 2,
                   env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})


def ncu_result(tr: TrainResult, run_dir: Path, gpu_name: str | None, timeout_s: float) -> NcuResult:
    """What the planned ncu run (its TrainResult) measured: ncu's CSV from its log (kept as
    <ncu work dir>/ncu.csv), each kernel with its figures, and why figures are missing or partial
    (timed out, ncu's exit status); also written to <run_dir>/ncu.json. A run that timed out or
    failed is a result too, so a lane limit never leaves a silently missing figure."""
    try:
        out = Path(tr.log_path).read_text(errors="replace")
    except OSError:
        out = ""
    (Path(tr.work_dir) / "ncu.csv").write_text(out)
    parsed = parse_ncu_csv(out, keep=NCU_METRICS)
    for kern in parsed:
        kern["figures"] = ncu_figures(kern, gpu_name)
    if tr.timed_out:
        error = f"ncu timed out after {timeout_s:.0f} s"
    elif tr.returncode is None:
        error = tr.error or "ncu did not run"
    else:
        error = None if tr.returncode == 0 else f"ncu exit {tr.returncode}"
    res = NcuResult(command=list(tr.command), returncode=tr.returncode, error=error, wall_s=round(tr.wall_s, 1),
                    kernels=parsed)
    fsutil.atomic_write_json(Path(run_dir) / NCU_JSON, res.to_dict())
    return res


def format_ncu(rows: list[StoredRun]) -> str:
    """The Nsight Compute figures of profiled runs: each measured kernel against the card's peak."""
    out = []
    for r in rows:
        n = r.ncu
        if n is None:
            continue
        why = f" ({n.error})" if n.error else ""
        out.append(f"[{r.variant}] Nsight Compute{why}")
        out.append(f"  {'us':>8} {'SM %pk':>7} {'DRAM %pk':>8} {'DRAM GB/s':>9} {'FP64 GF/s':>9} {'FP64 %pk':>8}"
                   "  kernel")
        for kern in n.kernels or []:
            f = kern.get("figures") or ncu_figures(kern, r.environment.gpu_name)
            cell = lambda x, w, d=1: number(x, 1, d, w)  # noqa: E731
            out.append(f"  {cell(f['time_us'], 8)} {cell(f['sm_pct'], 7)} {cell(f['dram_pct'], 8)} "
                       f"{cell(f['dram_gb_s'], 9)} {cell(f['fp64_gflop_s'], 9)} {cell(f.get('fp64_pct'), 8)}"
                       f"  {kern['name'][:70]}")
    return "\n".join(out)


