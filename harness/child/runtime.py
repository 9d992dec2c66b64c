"""In-process API for code running *inside* a training subprocess.

The launcher (``harness.child.launch``) sets this up before upstream's entry point runs;
patch modules of a variant use it to report step boundaries. Nothing here imports
the rest of the harness: it must stay importable next to any upstream tree.

Contract
--------
* ``clock.tick()`` marks the start of a training step. On CUDA it records an event on
  the current stream (no host synchronisation); elsewhere it reads a host clock.
* By default the launcher ticks from upstream's ``Trainer._next_training_batch``.
  A variant that runs its own loop calls ``clock.claim()`` first, which silences that
  hook, then calls ``clock.tick()`` once per step.
* ``on_tick`` callbacks (the profiler uses one) get the tick index.
* At exit the launcher calls ``clock.dump(path)``: JSON with per-step durations.
"""
from __future__ import annotations

import time
from typing import Callable

_T0 = time.perf_counter()  # as close to process start as an import can get


class StepClock:
    def __init__(self) -> None:
        self.owner: str = "upstream"
        self._host: list[float] = []
        self._events: list = []
        self._cuda = None
        self.on_tick: list[Callable[[int], None]] = []
        self.first_tick_s: float | None = None

    def claim(self, owner: str = "variant") -> None:
        """Take over step timing from the upstream hook (for variants with their own loop)."""
        self.owner = owner

    def _use_cuda(self) -> bool:
        if self._cuda is None:
            try:
                import torch

                self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            except Exception:  # torch absent (JAX/TF backends): host clock
                self._cuda = False
        return bool(self._cuda)

    def tick(self, source: str | None = None) -> None:
        if source is not None and source != self.owner:
            return
        n = len(self._host)
        if n == 0:
            self.first_tick_s = time.perf_counter() - _T0
        if self._use_cuda():
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append(ev)
        self._host.append(time.perf_counter())
        for cb in self.on_tick:
            cb(n)

    def durations(self) -> tuple[list[float], str]:
        """Per-step seconds between consecutive ticks, and the clock that measured them."""
        if self._events and len(self._events) == len(self._host):
            import torch

            self._events[-1].synchronize()
            d = [a.elapsed_time(b) / 1e3 for a, b in zip(self._events, self._events[1:])]
            return d, "cuda_event"
        h = self._host
        return [b - a for a, b in zip(h, h[1:])], "host"

    def dump(self, path: str, extra: dict | None = None) -> None:
        """Write durations atomically; a final tick closes the last step (its interval also
        holds end-of-training I/O, so the timing stage drops it)."""
        if self._host:
            self.tick(self.owner)
        d, kind = self.durations()
        payload = {
            "clock": kind,
            "owner": self.owner,
            "startup_s": self.first_tick_s,
            "step_s": d,
            **(extra or {}),
        }
        # harness.core.fsutil is standard library only: importable beside any upstream tree
        from harness.core.fsutil import atomic_write_json

        atomic_write_json(path, payload, indent=None)


clock = StepClock()


def write_progress(clock: StepClock, path) -> None:
    """Write the step count at most twice a second, for the parent's progress bar."""
    last = [0.0]

    def cb(i: int) -> None:
        now = time.monotonic()
        if now - last[0] > 0.5:
            last[0] = now
            try:
                path.write_text(str(i))
            except OSError:
                pass

    clock.on_tick.append(cb)
# imported here, not at the top: _T0 above stays as close to process start as it can
from harness.core import envvars  # noqa: E402

run_dir: str = envvars.get_str(envvars.DPH_RUN_DIR)
variant: str = envvars.get_str(envvars.DPH_VARIANT)

# ---------------------------------------------------------------- accuracy-gate hooks
# Set by a variant's patch module (at import) when the variant evaluates or trains through its
# own code rather than upstream's, so that harness.child.parity_eval checks *that* code. Both are
# called in the parity subprocess with the baseline checkpoint's weights already loaded.

engine_report: Callable[[], dict] | None = None
"""Set by an engine that runs its own loop (dpfast.ran.publish): what it really ran (compiled or
eager, CUDA graphs, graph breaks, fallback). The launcher writes it into steps.json at exit."""

parity_forward: Callable | None = None
"""``fn(model, coord, atype, box) -> dict`` with ``energy`` [nf], ``force`` [nf, nat, 3] and
``virial`` [nf, 9] (any float dtype; cast to float64 by the caller). ``model`` is upstream's
model object built from the run's input (precision overrides applied), ``coord`` float64
[nf, nat, 3], ``atype`` int64 [nf, nat], ``box`` float64 [nf, 9]. None: upstream's forward."""

parity_train_step: Callable | None = None
"""``fn(model, loss_fn, batch, lr) -> None``: one optimizer step that updates ``model``'s
parameters in place, as the variant's training loop would take it from a fresh optimizer.
``loss_fn`` is upstream's loss module (``loss_fn(input_dict, model, label, natoms, lr)``),
``batch`` is ``{"input": input_dict, "label": label_dict, "optim": {"type", "betas",
"weight_decay", "gradient_max_norm"}}`` (upstream's Trainer.get_data split; the optimizer
settings upstream's Trainer would use), ``lr`` the learning rate of step 0. Leave each
parameter's ``.grad`` populated if possible: the gate then compares gradients as well as
updates. None: upstream's ModelWrapper + loss + torch Adam step."""
