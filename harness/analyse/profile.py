"""Stage: profiles, the analysis half. The per-step breakdown of a Chrome trace
(``breakdown_from_trace``; JAX traces are first brought to the same event categories by
``jax_trace_events``), the profile dict a results JSON stores (``summarise``) and its text table.
The trace is captured inside the training process by harness.child.profiler; Nsight Systems /
Compute live in harness.analyse.nsight.

The breakdown is computed from the exported trace only, so tests can feed it synthetic GPU traces."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.analyse import nsight
from harness.core.formatting import number
from harness.core.records import Profile, StoredRun


PROFILE_JSON = "profile.json"


TRACE = "trace.json.gz"


RANGE_PREFIX = "dph::"


MIN_START = 10


START_FRACTION = 0.3


WINDOW = 20


CATEGORIES = ("env-mat/descriptor", "embedding", "fitting", "force/backward", "optimizer", "data", "other")


# innermost named range -> category
RANGE_CATEGORY = {
    "data": "data", "descriptor": "env-mat/descriptor", "embedding": "embedding", "fitting": "fitting",
    "force": "force/backward", "backward": "force/backward", "optimizer": "optimizer", "forward": "other",
}


LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch", "hipLaunchKernel")


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


JAX_TRACE_DIR = "jax-trace"


# lines of an XLA device that redraw the stream's work by HLO op, module or step: not extra kernels
XLA_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Async XLA Ops", "TensorFlow Ops",
                     "TensorFlow Name Scope", "Framework Ops", "Framework Name Scope", "Steps", "Source code",
                     "Launch Stats")


def jax_trace_events(trace: dict | list) -> list[dict]:
    """The X events of a jax.profiler Chrome trace (``*.trace.json.gz``) with torch.profiler's
    categories, so ``breakdown_from_trace`` reads both: on ``/device:GPU:N`` processes the CUDA
    stream lines ("Stream #..."; other lines if a device has none, minus the derived per-op lines)
    give ``kernel`` / ``gpu_memcpy`` / ``gpu_memset``; on ``/host:...`` processes launch API calls
    give ``cuda_driver``, other XLA/PjRt events ``cpu_op``; Python-tracer frames ("$file:line f")
    are dropped. Each device event carries ``_line`` (the line it was counted from)."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else list(trace)
    proc = {e.get("pid"): str((e.get("args") or {}).get("name", "")) for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    line = {(e.get("pid"), e.get("tid")): str((e.get("args") or {}).get("name", "")) for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, n in proc.items() if n.startswith("/device:")}
    streams = {pid: {k for k, n in line.items() if k[0] == pid and n.startswith("Stream")} for pid in device_pids}
    out: list[dict] = []
    for e in events:
        if e.get("ph") != "X" or "ts" not in e or "dur" not in e:
            continue
        pid, name = e.get("pid"), str(e.get("name", ""))
        key = (pid, e.get("tid"))
        if pid in device_pids:
            ln = line.get(key, "")
            # the stream lines when the device has them, else every line that is not derived
            counted = key in streams[pid] if streams[pid] else ln not in XLA_DERIVED_LINES
            if not counted:
                continue
            low = name.lower()
            cat = "gpu_memcpy" if "memcpy" in low else "gpu_memset" if "memset" in low else "kernel"
            args = dict(e.get("args") or {})
            if args.get("correlation_id") is not None:
                args["correlation"] = args["correlation_id"]
            out.append({**e, "cat": cat, "args": args, "_line": ln})
        elif proc.get(pid, "").startswith("/host:"):
            if name.startswith("$"):
                continue
            out.append({**e, "cat": "cuda_driver" if name in LAUNCH_NAMES else "cpu_op"})
    return out


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def category_by_name(name: str) -> str:
    """Category of a kernel/op from its name alone (heuristic; the range-based view is better)."""
    n = name.lower()
    if any(k in n for k in ("optimizer", "adam", "multi_tensor_apply", "_foreach_", "fused_adam", "sgd", "lamb")):
        return "optimizer"
    if any(k in n for k in ("dataloader", "memcpy htod", "pin_memory", "collate", "to_device")):
        return "data"
    if any(k in n for k in ("backward", "autograd::engine", "grad_", "_grad", "gradient")):
        return "force/backward"
    if any(k in n for k in ("env_mat", "prod_env", "nlist", "neighbor", "format_nlist", "extend_coord",
                            "topk", "sort", "norm", "sqrt", "where", "gather", "index_select", "cdist")):
        return "env-mat/descriptor"
    if any(k in n for k in ("tanh", "gemm", "mm", "addmm", "matmul", "bmm", "linear", "gelu", "silu",
                            "xmma", "cutlass", "cublas")):
        return "embedding"  # dense layers dominate in the embedding nets of se_e2_a-style models
    return "other"


def _self_times(events: list[dict]) -> list[tuple[dict, float, list[str]]]:
    """(event, self time us, names of enclosing events innermost first), nesting per (pid, tid)."""
    by_thread: dict[tuple, list[dict]] = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    out: list[tuple[dict, float, list[str]]] = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, end, child_time]

        def pop() -> None:
            ev, _, ch = stack.pop()
            out.append((ev, max(0.0, ev["dur"] - ch), [s[0]["name"] for s in reversed(stack)]))

        for e in evs:
            while stack and e["ts"] >= stack[-1][1]:
                pop()
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e, e["ts"] + e["dur"], 0.0])
        while stack:
            pop()
    return out


def _category_in_context(names: list[str]) -> str:
    for n in names:
        c = category_by_name(n)
        if c != "other":
            return c
    return "other"


class _RangeIndex:
    """Innermost dph:: range at a time stamp (ranges from any thread: the autograd engine runs
    backward ops on its own thread while the main thread sits in dph::backward)."""

    def __init__(self, ranges: list[dict]) -> None:
        self.r = sorted(((e["ts"], e["ts"] + e["dur"], e["name"][len(RANGE_PREFIX):]) for e in ranges),
                        key=lambda t: (t[0], -(t[1] - t[0])))

    def at(self, ts: float) -> str | None:
        best = None
        for s, e, n in self.r:
            if s > ts:
                break
            if s <= ts < e and (best is None or e - s <= best[1] - best[0]):
                best = (s, e, n)
        return best[2] if best else None


def breakdown_from_trace(trace: dict | list, steps: int, wall_s: float) -> dict[str, Any]:
    """The per-step breakdown of a torch.profiler Chrome trace covering `steps` steps in `wall_s`."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else list(trace)
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    for e in xs:
        e["ts"], e["dur"] = float(e["ts"]), float(e["dur"])
    steps = max(1, int(steps))
    per = 1e-6 / steps  # us total -> s per step
    kernels = [e for e in xs if e.get("cat") == "kernel"]
    memcpy = [e for e in xs if e.get("cat") == "gpu_memcpy"]
    memset = [e for e in xs if e.get("cat") == "gpu_memset"]
    runtime = [e for e in xs if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    ranges = [e for e in xs if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(RANGE_PREFIX)]
    cpu_ops = [e for e in xs if e.get("cat") == "cpu_op"]
    gpu = bool(kernels or memcpy or memset)
    idx = _RangeIndex(ranges)

    out: dict[str, Any] = {"steps": steps, "wall_s_per_step": wall_s / steps}
    # exclusive host time of each named range
    rng_self: dict[str, float] = {}
    for ev, st, _ in _self_times(ranges):
        k = ev["name"][len(RANGE_PREFIX):]
        rng_self[k] = rng_self.get(k, 0.0) + st * per
    out["ranges_host_s_per_step"] = dict(sorted(rng_self.items(), key=lambda kv: -kv[1]))

    by_name = {c: 0.0 for c in CATEGORIES}
    by_range = {c: 0.0 for c in CATEGORIES}
    if gpu:
        busy = _union_us((e["ts"], e["ts"] + e["dur"]) for e in kernels + memcpy + memset) * per
        out["gpu_busy_s_per_step"] = busy
        out["host_gap_s_per_step"] = max(0.0, wall_s / steps - busy)
        out["kernels_per_step"] = len(kernels) / steps
        launches = [e for e in runtime if e.get("name") in LAUNCH_NAMES]
        out["launches_per_step"] = len(launches) / steps
        launch_ts = {e.get("args", {}).get("correlation"): e["ts"] for e in runtime
                     if e.get("args", {}).get("correlation") is not None}
        agg: dict[str, list[float]] = {}
        for e in kernels + memcpy + memset:
            t = e["dur"] * per
            by_name[category_by_name(("memcpy " if e.get("cat") == "gpu_memcpy" else "") + e["name"])] += t
            ts = launch_ts.get(e.get("args", {}).get("correlation"), e["ts"])
            by_range[RANGE_CATEGORY.get(idx.at(ts) or "", "other")] += t
            if e.get("cat") == "kernel":
                a = agg.setdefault(e["name"], [0.0, 0])
                a[0] += e["dur"] * 1e-6
                a[1] += 1
        ktot = sum(a[0] for a in agg.values()) or 1.0
        out["top_kernels"] = [{"name": n, "total_s": a[0], "count": a[1], "per_step_s": a[0] / steps,
                               "pct": 100 * a[0] / ktot}
                              for n, a in sorted(agg.items(), key=lambda kv: -kv[1][0])[:15]]
        basis = "gpu_kernel_time"
    else:
        out.update({"gpu_busy_s_per_step": None, "host_gap_s_per_step": None, "kernels_per_step": None,
                    "launches_per_step": None, "top_kernels": []})
        basis = "cpu_op_self_time"
    for name, lst in (("memcpy", memcpy), ("memset", memset)):
        out[name] = ({"count": len(lst), "per_step": len(lst) / steps, "time_s": sum(e["dur"] for e in lst) * 1e-6,
                      "by_kind": _count_by(lst, lambda e: str(e.get("args", {}).get("kind", e["name"])))}
                     if gpu else None)
    # CPU op self times: top ops always; the category basis on CPU-only traces
    agg_ops: dict[str, list[float]] = {}
    annotations = [e for e in xs if e.get("cat") == "user_annotation" and not str(e.get("name", "")).startswith(RANGE_PREFIX)]
    for ev, st, up in _self_times(cpu_ops + annotations):
        if ev.get("cat") != "cpu_op":
            continue
        a = agg_ops.setdefault(ev["name"], [0.0, 0])
        a[0] += st * 1e-6
        a[1] += 1
        if not gpu:
            by_name[_category_in_context([ev["name"], *up])] += st * per
            by_range[RANGE_CATEGORY.get(idx.at(ev["ts"]) or "", "other")] += st * per
    out["top_ops"] = [{"name": n, "self_s": a[0], "count": a[1], "per_step_s": a[0] / steps}
                      for n, a in sorted(agg_ops.items(), key=lambda kv: -kv[1][0])[:15]]
    out["cpu_ops_per_step"] = len(cpu_ops) / steps
    out["categories"] = {"basis": basis, "by_name": by_name, "by_range": by_range}
    return out


def _count_by(lst: list[dict], key: Callable[[dict], str]) -> dict[str, int]:
    d: dict[str, int] = {}
    for e in lst:
        d[key(e)] = d.get(key(e), 0) + 1
    return d


def summarise(work_dir: Path) -> dict | None:
    """The profile dict a results JSON stores: profile.json, plus Nsight data when present."""
    wd = Path(work_dir)
    p = wd / PROFILE_JSON
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"status": "unreadable", "reason": str(e)}
    d.update(nsight.summaries(wd))
    return d


def format_breakdown(rows: list[StoredRun]) -> str:
    """The breakdown table of profiled runs (ms per step)."""
    def ms(x):
        return number(x, 1e3, 2, 9)

    out = []
    head = f"{'variant':12} {'wall':>9} {'gpu busy':>9} {'host gap':>9} {'kern/st':>8} {'launch/st':>9} {'memcpy/st':>9}"
    out += [head, "-" * len(head)]
    for r in rows:
        p = r.profile if isinstance(r.profile, Profile) else None
        if p is None or p.status not in ("ok", "partial"):
            out.append(f"{r.variant:12} no profile ({(p.reason if p else None) or r.status})")
            continue
        kps = p.kernels_per_step
        lps = p.launches_per_step
        mc = (p.memcpy or {}).get("per_step")
        out.append(f"{r.variant:12} {ms(p.wall_s_per_step)} {ms(p.gpu_busy_s_per_step)} "
                   f"{ms(p.host_gap_s_per_step)} {kps if kps is None else round(kps, 1)!s:>8} "
                   f"{lps if lps is None else round(lps, 1)!s:>9} {mc if mc is None else round(mc, 1)!s:>9}")
    for r in rows:
        p = r.profile if isinstance(r.profile, Profile) else None
        cats = (p.categories if p else None) or {}
        if not cats:
            continue
        window = p.window or {}
        out.append("")
        out.append(f"[{r.variant}] ms/step by category ({cats.get('basis')}); window "
                   f"{window.get('steps')} steps from step {window.get('start_step')}"
                   + (f"; {p.xla_executions_per_step:.0f} XLA executions/step"
                      if p.xla_executions_per_step else ""))
        out.append(f"  {'category':20} {'by range':>9} {'by name':>9}")
        for c in CATEGORIES:
            out.append(f"  {c:20} {ms(cats['by_range'].get(c))} {ms(cats['by_name'].get(c))}")
        top = p.top_kernels or [{"name": o["name"], "total_s": o["self_s"], "count": o["count"]}
                                for o in p.top_ops or []]
        out.append(f"  top {'kernels' if p.top_kernels else 'CPU ops (self time)'}:")
        for k in top[:15]:
            out.append(f"    {k['total_s'] / max(1, p.steps or 1) * 1e3:9.3f} ms/step  x{k['count']:<6} {k['name'][:90]}")
    return "\n".join(out)
