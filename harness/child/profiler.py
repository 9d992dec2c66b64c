"""The in-process profiler, inside the training subprocess (``install_in_process``, called by
harness.child.launch when ``DPH_PROFILE`` is set): at a steady-state step the profiler starts (CPU
+ CUDA activities when CUDA is up), named ranges (``torch.profiler.record_function`` and NVTX when
CUDA is up) are pushed around data / forward / descriptor / embedding / fitting / force /
loss-backward / optimizer by monkeypatching, and after a short window everything is restored, the
Chrome trace is written to ``<run_dir>/trace.json.gz`` and the breakdown to
``<run_dir>/profile.json``. A JAX run is traced by ``jax.profiler`` instead (XLA's own host and
device lines, no named ranges: upstream's JAX step is one jitted function). The TensorFlow backend
is not profiled (its profile says so). The breakdown itself: harness.analyse.profile."""
from __future__ import annotations

import atexit
import gzip
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable
from harness.core import fsutil, rebind
from harness.analyse.profile import JAX_TRACE_DIR, MIN_START, PROFILE_JSON, RANGE_PREFIX, START_FRACTION, TRACE, WINDOW, breakdown_from_trace, jax_trace_events


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


BY = "harness.profiler"  # its one lasting replacement: the trainer's batch draw (finds the trainer)
BY_WINDOW = "harness.profiler.window"  # the ranges' wrappers, put back when the window closes


def _wrap(owner: Any, name: str, kind: str, ranges: "_Ranges") -> None:
    """owner.name inside a profiler range of `kind`, through harness.core.rebind (put back by
    rebind.restore(BY_WINDOW) when the window closes)."""
    rebind.replace(owner, name, ranges.wrap(kind, getattr(owner, name)), by=BY_WINDOW,
                   why=f"the profiler's '{kind}' range, during its window only")


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


def _wrap_modules(root: Any, ranges: _Ranges) -> list[str]:
    """Instance-level forward wrappers: outermost descriptor / fitting modules, and embedding nets
    inside descriptors."""
    done: list[str] = []

    def walk(m: Any, path: str, inside: str | None) -> None:
        for name, child in m.named_children():
            p = f"{path}.{name}" if path else name
            kind = _module_kind(child)
            if kind == "fitting" and inside is None or kind == "descriptor" and inside is None \
                    or kind == "embedding" and inside == "descriptor":
                _wrap(child, "forward", kind, ranges)
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

            rebind.replace(pt_training.Trainer, "_next_training_batch", _next_training_batch, by=BY,
                           why="the profiler learns the trainer from its first draw and, during its window, "
                               "puts the draw inside its 'data' range")
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
            rebind.restore(BY_WINDOW)
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
        _wrap(torch.Tensor, "backward", "backward", r)
        _wrap(torch.autograd, "grad", "force", r)
        tr = self.trainer
        if tr is not None:
            wrapper = getattr(tr, "wrapper", None)
            if wrapper is not None:
                _wrap(type(wrapper), "forward", "forward", r)
                self.wrapped = _wrap_modules(wrapper, r)
            opt = getattr(tr, "optimizer", None)
            if opt is not None:
                # instance level: torch's LR schedulers replace opt.step on the instance
                _wrap(opt, "step", "optimizer", r)
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
        rebind.restore(BY_WINDOW)
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
