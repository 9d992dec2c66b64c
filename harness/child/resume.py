"""Kill and resume inside a PyTorch training child (`dpharness train`, issue 38).

* **SIGTERM** (a scheduler's time limit, forwarded by the parent): the training stops at the
  next step boundary and writes a checkpoint of the step it reached, in upstream's format and
  name (model.ckpt-<steps done>.pt, `checkpoint` and model.ckpt.pt pointed at it; a dpfast
  engine's flat optimizer state synced first, as its own saves do), then `stopped.json`, and exits
  with STOP_EXIT. Before the first step it exits at once: there is nothing to save. After the
  last step (upstream has saved the final checkpoint; only the child's exit is left) it is noted
  in the log and the child finishes normally: the training is complete, not stopped.
* **--restart continues with the next step.** Upstream stores the index of the last step done
  (train_infos.step) and its own restart runs that step a second time (one extra optimizer
  step, a duplicated lcurve row); here start_step is that index + 1 and the learning-rate
  scheduler is rebuilt for it.
* **...on the frames the uninterrupted run draws.** Upstream's samplers draw from the global
  torch generator: the statistics' sample at start-up, each step's training batch, the validation
  batches of each display step. A restart skips the statistics, so the stream is replayed: the
  statistics' sample, then every earlier step's draws, without training on them. A dpfast engine
  on its own sampler replays through `trainer._dph_replay(draw_one_step)` before its loop.

Single process, single task only; other trainings keep upstream's behaviour (and say so in the log).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
from pathlib import Path

from harness.core import rebind

log = logging.getLogger("dpharness.resume")
BY = "harness.child.resume"

STOP_EXIT = 143  # 128 + SIGTERM, what a shell reports for a job ended by it
STOPPED_NAME = "stopped.json"


class StopAtStep(BaseException):
    """Raised at a step boundary after SIGTERM; BaseException so no `except Exception` in
    upstream's or an engine's loop can swallow it."""

    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done  # steps done (the index of the step about to start)


class _State:
    term = False
    phase = "start-up"  # start-up | loop | finished


def _on_term(run_dir: Path) -> None:
    """SIGTERM's handler: in the loop, ask for a stop at the next step boundary."""
    if _State.phase == "start-up":  # nothing trained yet, nothing to save
        _write_stopped(run_dir, None, None)
        raise SystemExit(STOP_EXIT)
    if _State.phase == "finished":  # every step done and saved: let the child end as it would
        log.warning("SIGTERM after the last step: the training is complete, the child finishes normally")
        return
    _State.term = True


def install(run_dir: Path, clock, backend: str, follow_upstream_order: bool) -> None:
    if backend != "pt" or int(os.environ.get("WORLD_SIZE") or 1) != 1:
        return
    from deepmd.pt.train import training

    T = training.Trainer
    signal.signal(signal.SIGTERM, lambda signum, frame: _on_term(run_dir))
    _workers_ignore_sigterm()

    orig_init = T.__init__

    @functools.wraps(orig_init)
    def init(self, *a, **k):
        orig_init(self, *a, **k)
        _continue_after_checkpoint(self)

    rebind.replace(T, "__init__", init, by=BY,
                   why="a restart continues with the step after the checkpoint's (upstream's repeats it)")

    orig_run = T.run
    engine = getattr(orig_run, "_dph_engine", None)  # a dpfast engine installed by the variant

    @functools.wraps(orig_run)
    def run(self):
        start = self.start_step
        replay = getattr(self, "_dph_replay_steps", 0)
        if replay:
            _replay_statistics(self)
            if engine is None or follow_upstream_order:  # the loop draws through upstream's samplers
                fn = type(self)._next_training_batch
                draw = getattr(fn, "__wrapped__", fn)  # upstream's own, not through the step clock's hook
                _replay_draws(self, replay, lambda: draw(self, "Default"))
            else:  # the engine draws one step of its own sampler, before its loop, through this
                self._dph_replay = functools.partial(_replay_draws, self, replay)
        seen = [0]

        def on_tick(_n: int) -> None:
            seen[0] += 1
            if _State.term:
                raise StopAtStep(start + seen[0] - 1)

        clock.on_tick.append(on_tick)
        _State.phase = "loop"
        try:
            out = orig_run(self)
        except StopAtStep as s:
            path = _save_reached(self, s.done) if s.done > start else None
            _write_stopped(run_dir, s.done, path)
            raise SystemExit(STOP_EXIT) from None
        finally:
            clock.on_tick.remove(on_tick)
        _State.phase = "finished"
        if _State.term:  # the signal came during the last step, after its tick: it is complete
            log.warning("SIGTERM during the last step: the training is complete, the child finishes normally")
        return out

    rebind.replace(T, "run", run, by=BY,
                   why="SIGTERM stops at a step boundary with a checkpoint; a restart replays the data order first")


def _workers_ignore_sigterm() -> None:
    """A scheduler signals every process of the job, the DataLoader's workers too: one that
    died of it would fail the next batch before the step boundary where the training saves. The
    workers ignore SIGTERM (set after torch's own worker handlers, which would let a SIGTERM from
    anyone but their parent kill them) and end with their parent, as after a normal run."""
    from torch.utils.data._utils import signal_handling

    orig = signal_handling._set_worker_signal_handlers
    if getattr(orig, "_dph_ignores_sigterm", False):
        return

    def set_handlers(*a, **k):
        r = orig(*a, **k)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return r

    set_handlers._dph_ignores_sigterm = True
    rebind.replace(signal_handling, "_set_worker_signal_handlers", set_handlers, by=BY,
                   why="DataLoader workers ignore SIGTERM, so a job-wide signal cannot fail the last batch")
    # multiprocessing's own exit handler ends daemonic children (the DataLoader's workers) with
    # SIGTERM and joins them, which would now wait for ever; registered after it, this runs first
    import atexit

    atexit.register(_end_workers, os.getpid())


def _end_workers(owner: int) -> None:
    import multiprocessing

    if os.getpid() != owner:  # a forked process (a compile worker) inherits this hook and the child list
        return
    # torch's SIGCHLD handler would raise in this process for each worker that dies: not now
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=5)


def _continue_after_checkpoint(tr) -> None:
    if not getattr(tr, "restart_training", False) or getattr(tr, "multi_task", False):
        return
    done = tr.start_step + 1  # the checkpoint's train_infos.step is the last step's index
    if done >= tr.num_steps:
        return  # nothing left: upstream's loop does not run
    tr.start_step = done
    if getattr(tr, "scheduler", None) is not None:
        tr.scheduler = tr._create_lr_scheduler(tr.optimizer, tr.lr_schedule, done)
    tr._dph_replay_steps = done
    if Path(tr.disp_file).is_file() and Path(tr.disp_file).stat().st_size > 0:
        tr.lcurve_should_print_header = False  # continuing the lcurve.out that has it
    log.info("dpharness: restart continues with step %d (the checkpoint's last step was %d); the data "
             "order is replayed up to it", done + 1, done)


def _replay_statistics(tr) -> None:
    """The statistics' sample an uninterrupted run draws at start-up and a restart skips (an
    input whose stat_file already held the statistics when it first trained drew none: its
    resumed order differs, a limitation docs/README state)."""
    sample = getattr(tr, "get_sample_func", None)
    if callable(sample):
        sample()


def _display(tr, step: int) -> bool:
    d = step + 1
    return bool(getattr(tr, "display_in_training", True)) and (d % tr.disp_freq == 0 or d == 1)


def _replay_draws(tr, steps: int, draw_training) -> None:
    """Every step's training batch (`draw_training()`: upstream's sampler, or a dpfast engine's
    own) and every display step's validation batches, in the order the loop draws them, without
    training."""
    for s in range(steps):
        draw_training()
        if _display(tr, s) and tr.validation_data is not None:
            for _ in range(tr.valid_numb_batch):
                tr.get_data(is_train=False)


def _save_reached(tr, done: int) -> str:
    last = done - 1
    lr = tr.lr_schedule.value(last)
    eng = getattr(tr, "_graph_engine", None)
    if eng is not None:
        eng.sync_optimizer_state(lr)
    tr.latest_model = tr.ckpt_store.path_for(done)
    tr.save_model(tr.latest_model, lr=lr, step=last)
    tr.ckpt_store.publish(tr.latest_model)
    log.info("dpharness: SIGTERM: saved the step reached to %s", tr.latest_model)
    return str(Path(tr.latest_model).resolve())


def _write_stopped(run_dir: Path, done: int | None, checkpoint: str | None) -> None:
    from harness.core.fsutil import atomic_write_json

    atomic_write_json(run_dir / STOPPED_NAME, {"signal": "SIGTERM", "steps_done": done, "checkpoint": checkpoint})


def read_stopped(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STOPPED_NAME).read_text())
    except (OSError, ValueError):
        return None
