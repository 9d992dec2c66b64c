"""Stage: profiles. A torch.profiler window over steady-state training steps, and the per-step
breakdown that goes into the results JSON as ``profile``.

Two halves:

* In the training subprocess (``install_in_process``, called by harness.child.launch when
  ``DPH_PROFILE`` is set): at a steady-state step the profiler starts (CPU + CUDA activities when
  CUDA is up), named ranges (``torch.profiler.record_function`` and NVTX when CUDA is up) are
  pushed around data / forward / descriptor / embedding / fitting / force / loss-backward /
  optimizer by monkeypatching, and after a short window everything is restored, the Chrome trace
  is written to ``<run_dir>/trace.json.gz`` and the breakdown to ``<run_dir>/profile.json``.
  A JAX run is traced by ``jax.profiler`` instead (XLA's own host and device lines, no named
  ranges: upstream's JAX step is one jitted function), its trace brought to the same event
  categories (``jax_trace_events``) and broken down the same way. The TensorFlow backend is not
  profiled (its profile says so).
* In the harness (``summarise``, ``breakdown_from_trace``, the ``profile`` CLI command). Nsight
  Systems / Compute live in ``harness.analyse.nsight``.

The breakdown is computed from the exported trace only (``breakdown_from_trace``), so tests can
feed it synthetic GPU traces."""
from __future__ import annotations

import atexit
import gzip
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.analyse import nsight
from harness.core import fsutil

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


# ------------------------------------------------------------------ window placement

def parse_spec(spec: str) -> dict[str, int | None]:
    """``steady`` or ``steady,start=12,window=5`` (either key optional)."""
    out: dict[str, int | None] = {"start": None, "window": None}
    parts = [p.strip() for p in (spec or "steady").split(",") if p.strip()]
    if parts and parts[0] not in ("steady", "1", "true", "on"):
        raise ValueError(f"DPH_PROFILE: unknown mode {parts[0]!r} (use 'steady[,start=N][,window=M]')")
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k not in out:
            raise ValueError(f"DPH_PROFILE: unknown key {k!r}")
        out[k] = int(v)
    return out


def choose_window(numb_steps: int, start: int | None = None, window: int | None = None) -> tuple[int, int] | None:
    """(first profiled step, number of steps). Ticks come at the start of steps 0..numb_steps-1, so
    the window [s, s+w) must close at tick s+w <= numb_steps-1: strictly before training ends.
    None when the run is too short to profile anything after a warm-up step."""
    n = int(numb_steps)
    last = n - 1  # the last tick inside training
    s = start if start is not None else max(MIN_START, math.ceil(START_FRACTION * n))
    if s + 1 > last:  # short run: smaller warm-up, at least one step
        s = max(1, n // 3)
    w = window if window is not None else WINDOW
    w = min(w, last - s)
    if s < 1 or w < 1:
        return None
    return s, w


# ------------------------------------------------------------------ in the training subprocess

class _Ranges:
    """Named ranges: torch.profiler.record_function + NVTX (PyPI nvtx, else torch.cuda.nvtx)."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self._rf = torch.profiler.record_function
        self._push = self._pop = None
        if cuda:
            try:
                import nvtx  # type: ignore

                self._push = lambda n: nvtx.push_range(n)
                self._pop = lambda: nvtx.pop_range()
            except Exception:
                self._push = torch.cuda.nvtx.range_push
                self._pop = torch.cuda.nvtx.range_pop

    def wrap(self, name: str, fn: Callable) -> Callable:
        rf, push, pop = self._rf, self._push, self._pop
        label = RANGE_PREFIX + name

        def wrapped(*a, **k):
            if push is not None:
                push(label)
            try:
                with rf(label):
                    return fn(*a, **k)
            finally:
                if pop is not None:
                    pop()

        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        wrapped.__name__ = getattr(fn, "__name__", name)
        return wrapped


class _Patches:
    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        had = attr in getattr(obj, "__dict__", {})
        self._saved.append((obj, attr, getattr(obj, "__dict__", {}).get(attr), had))
        setattr(obj, attr, value)

    def restore(self) -> None:
        for obj, attr, old, had in reversed(self._saved):
            try:
                if had:
                    setattr(obj, attr, old)
                else:
                    delattr(obj, attr)
            except Exception:
                pass
        self._saved.clear()


def _module_kind(m: Any) -> str | None:
    mod = type(m).__module__
    if mod.startswith("deepmd.pt.model.task"):
        return "fitting"
    if mod.startswith("deepmd.pt.model.descriptor"):
        return "descriptor"
    try:
        from deepmd.pt.model.network import mlp

        if isinstance(m, mlp.FittingNet):
            return "fitting"
        if isinstance(m, mlp.EmbeddingNet):
            return "embedding"
    except Exception:
        pass
    return None


def _wrap_modules(root: Any, ranges: _Ranges, patches: _Patches) -> list[str]:
    """Instance-level forward wrappers: outermost descriptor / fitting modules, and embedding nets
    inside descriptors."""
    done: list[str] = []

    def walk(m: Any, path: str, inside: str | None) -> None:
        for name, child in m.named_children():
            p = f"{path}.{name}" if path else name
            kind = _module_kind(child)
            if kind == "fitting" and inside is None or kind == "descriptor" and inside is None \
                    or kind == "embedding" and inside == "descriptor":
                patches.set(child, "forward", ranges.wrap(kind, child.forward))
                done.append(f"{p}:{kind}")
                if kind != "fitting":
                    walk(child, p, kind)
                continue
            if inside != "fitting":
                walk(child, p, inside)

    walk(root, "", None)
    return done


class _Session:
    def __init__(self, clock: Any, run_dir: Path, spec: str, backend: str = "pt") -> None:
        self.clock, self.run_dir, self.backend = clock, Path(run_dir), backend
        opts = parse_spec(spec)
        try:
            n = int(json.loads((self.run_dir / "input.json").read_text())["training"]["numb_steps"])
        except Exception:
            n = 0  # no input.json numb_steps: no window, the profiler stays off
        self.numb_steps = n
        self.window = choose_window(n, opts["start"], opts["window"]) if n else None
        self.trainer: Any = None
        self.active = False
        self.prof = None
        self.patches = _Patches()
        self.wrapped: list[str] = []
        self.t0 = self.t1 = 0.0
        self.done = False

    # -- trainer capture (permanent, cheap) and the data range (only while active)
    def install(self) -> None:
        if self.window is None:
            self._write({"status": "skipped", "reason": f"run of {self.numb_steps} steps is too short to profile",
                         "numb_steps": self.numb_steps})
            return
        if self.backend not in ("pt", "jax", "pt-expt"):  # pt-expt: torch.profiler, no trainer ranges
            self._write({"status": "unsupported", "reason": f"the {self.backend} backend is not profiled by dpharness "
                         "(torch.profiler sees none of its work; its own profiler is not wired in)"})
            return
        pt_training = None
        if self.backend == "pt":
            try:
                from deepmd.pt.train import training as pt_training
            except Exception:
                pass
        if pt_training is not None:
            orig = pt_training.Trainer._next_training_batch
            sess = self

            def _next_training_batch(trainer, *a, **k):
                sess.trainer = trainer
                if sess.active and sess.ranges is not None:
                    return sess.ranges.wrap("data", orig)(trainer, *a, **k)
                return orig(trainer, *a, **k)

            pt_training.Trainer._next_training_batch = _next_training_batch
        self.ranges: _Ranges | None = None
        self.clock.on_tick.append(self.on_tick)
        atexit.register(self.finish, "training ended before the profiling window closed")

    def on_tick(self, i: int) -> None:
        s, w = self.window
        try:
            if i == s and not self.active and not self.done:
                self.start()
            elif i == s + w and self.active:
                self.finish(None)
        except Exception as e:  # never break training for a profile; say why there is none
            print(f"dpharness profile: {type(e).__name__}: {e}", file=sys.stderr)
            self.active = False
            self.done = True
            self.patches.restore()
            self._write({"status": "failed", "reason": f"profiler: {type(e).__name__}: {e}"})

    def start(self) -> None:
        if self.backend == "jax":
            return self._start_jax()
        import torch
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = cuda
        self.ranges = _Ranges(cuda)
        r = self.ranges
        self.patches.set(torch.Tensor, "backward", r.wrap("backward", torch.Tensor.backward))
        self.patches.set(torch.autograd, "grad", r.wrap("force", torch.autograd.grad))
        tr = self.trainer
        if tr is not None:
            wrapper = getattr(tr, "wrapper", None)
            if wrapper is not None:
                self.patches.set(type(wrapper), "forward", r.wrap("forward", type(wrapper).forward))
                self.wrapped = _wrap_modules(wrapper, r, self.patches)
            opt = getattr(tr, "optimizer", None)
            if opt is not None:
                # instance level: torch's LR schedulers replace opt.step on the instance
                self.patches.set(opt, "step", r.wrap("optimizer", opt.step))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(activities=acts, record_shapes=False, with_stack=False, profile_memory=False)
        if cuda:
            torch.cuda.synchronize()
        self.prof.start()
        self.t0 = time.perf_counter()
        self.active = True

    def finish(self, reason: str | None) -> None:
        if not self.active or self.done:
            return
        self.done = True
        self.active = False
        if self.backend == "jax":
            return self._finish_jax(reason)
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()
        self.prof.stop()
        self.patches.restore()
        steps = self._steps(reason)
        raw = self.run_dir / "trace.json"
        self.prof.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text())
        with open(raw, "rb") as f, gzip.open(self.run_dir / TRACE, "wb", compresslevel=5) as g:
            shutil.copyfileobj(f, g)
        raw.unlink()
        out = breakdown_from_trace(trace, steps=steps, wall_s=self.t1 - self.t0)
        self._write_breakdown(out, reason, steps, wrapped_modules=self.wrapped, torch=torch.__version__)

    def _write_breakdown(self, out: dict, reason: str | None, steps: int, **extra: Any) -> None:
        """profile.json: the breakdown plus the fields every backend's profile carries."""
        out.update({
            "status": "ok" if reason is None else "partial",
            "reason": reason,
            "window": {"start_step": self.window[0], "steps": steps, "numb_steps": self.numb_steps},
            "device": "cuda" if self.cuda else "cpu",
            "trace": TRACE,
            **extra,
        })
        self._write(out)

    def _steps(self, reason: str | None) -> int:
        s, w = self.window
        return w if reason is None else max(1, len(getattr(self.clock, "_host", [])) - s)

    # -- JAX: jax.profiler over the same window (XLA's CUPTI tracer on a GPU)
    def _start_jax(self) -> None:
        import jax

        self.cuda = any(d.platform == "gpu" for d in jax.local_devices())
        opts = None
        if hasattr(jax.profiler, "ProfileOptions"):
            opts = jax.profiler.ProfileOptions()
            opts.python_tracer_level = 0  # Python frames would swamp the trace (thousands per step)
        _jax_sync()
        try:
            jax.profiler.start_trace(str(self.run_dir / JAX_TRACE_DIR), profiler_options=opts)
        except TypeError:  # older jax: no profiler_options
            jax.profiler.start_trace(str(self.run_dir / JAX_TRACE_DIR))
        self.t0 = time.perf_counter()
        self.active = True

    def _finish_jax(self, reason: str | None) -> None:
        import jax

        _jax_sync()
        self.t1 = time.perf_counter()
        jax.profiler.stop_trace()
        found = sorted((self.run_dir / JAX_TRACE_DIR).glob("plugins/profile/*/*.trace.json.gz"),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            self._write({"status": "failed", "reason": f"jax.profiler wrote no *.trace.json.gz under {JAX_TRACE_DIR}/"})
            return
        with gzip.open(found[-1], "rt") as f:
            trace = json.load(f)
        events = jax_trace_events(trace)
        meta = [e for e in trace.get("traceEvents", []) if e.get("ph") == "M"]
        with gzip.open(self.run_dir / TRACE, "wt", compresslevel=5) as g:
            json.dump({"traceEvents": meta + events}, g)
        shutil.rmtree(self.run_dir / JAX_TRACE_DIR, ignore_errors=True)  # the xplane.pb is large
        steps = self._steps(reason)
        out = breakdown_from_trace({"traceEvents": events}, steps=steps, wall_s=self.t1 - self.t0)
        if out.get("kernels_per_step") is not None and not any(e.get("cat") == "cuda_driver" for e in events):
            out["launches_per_step"] = None  # this XLA build recorded no launch API calls: unknown, not zero
        # each call of a compiled XLA executable (a jitted function, or one eager jnp op) is one
        # PjRt execution: how many the host dispatches per step is what makes a JAX step host-bound
        ex = sum(1 for e in events if "ExecuteHelper" in str(e.get("name", "")))
        out["xla_executions_per_step"] = ex / steps if ex else None
        self._write_breakdown(out, reason, steps, profiler="jax.profiler",
                              device_lines=sorted({e["_line"] for e in events if e.get("_line")}),
                              wrapped_modules=[], jax=jax.__version__)

    def _write(self, d: dict) -> None:
        fsutil.atomic_write_json(self.run_dir / PROFILE_JSON, d)


def install_in_process(clock: Any, run_dir: Path, spec: str, backend: str = "pt") -> None:
    """Called by harness.child.launch inside the training subprocess before upstream code runs."""
    _Session(clock, Path(run_dir), spec, backend).install()


def _jax_sync() -> None:
    """Wait for every step dispatched so far: XLA runs a device's computations in order, so a
    tiny one queued now finishes after them (JAX has no device-wide synchronize)."""
    import jax

    for d in jax.local_devices():
        jax.block_until_ready(jax.device_put(0.0, d) + 1.0)


# ------------------------------------------------------------------ JAX traces to the same categories

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


# ------------------------------------------------------------------ breakdown from a Chrome trace

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


# ------------------------------------------------------------------ in the harness

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


# ------------------------------------------------------------------ CLI

def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """The breakdown table of profiled runs (ms per step)."""
    def ms(x):
        return f"{x * 1e3:9.2f}" if isinstance(x, (int, float)) else f"{'-':>9}"

    out = []
    head = f"{'variant':12} {'wall':>9} {'gpu busy':>9} {'host gap':>9} {'kern/st':>8} {'launch/st':>9} {'memcpy/st':>9}"
    out += [head, "-" * len(head)]
    for r in rows:
        p = r.get("profile") or {}
        if p.get("status") not in ("ok", "partial"):
            out.append(f"{r['variant']:12} no profile ({p.get('reason') or r.get('status')})")
            continue
        kps = p.get("kernels_per_step")
        lps = p.get("launches_per_step")
        mc = (p.get("memcpy") or {}).get("per_step")
        out.append(f"{r['variant']:12} {ms(p.get('wall_s_per_step'))} {ms(p.get('gpu_busy_s_per_step'))} "
                   f"{ms(p.get('host_gap_s_per_step'))} {kps if kps is None else round(kps, 1)!s:>8} "
                   f"{lps if lps is None else round(lps, 1)!s:>9} {mc if mc is None else round(mc, 1)!s:>9}")
    for r in rows:
        p = r.get("profile") or {}
        cats = (p.get("categories") or {})
        if not cats:
            continue
        out.append("")
        out.append(f"[{r['variant']}] ms/step by category ({cats.get('basis')}); window "
                   f"{(p.get('window') or {}).get('steps')} steps from step {(p.get('window') or {}).get('start_step')}"
                   + (f"; {p['xla_executions_per_step']:.0f} XLA executions/step"
                      if p.get("xla_executions_per_step") else ""))
        out.append(f"  {'category':20} {'by range':>9} {'by name':>9}")
        for c in CATEGORIES:
            out.append(f"  {c:20} {ms(cats['by_range'].get(c))} {ms(cats['by_name'].get(c))}")
        top = p.get("top_kernels") or [{"name": o["name"], "total_s": o["self_s"], "count": o["count"]}
                                       for o in p.get("top_ops") or []]
        out.append(f"  top {'kernels' if p.get('top_kernels') else 'CPU ops (self time)'}:")
        for k in top[:15]:
            out.append(f"    {k['total_s'] / max(1, p.get('steps', 1)) * 1e3:9.3f} ms/step  x{k['count']:<6} {k['name'][:90]}")
    return "\n".join(out)
