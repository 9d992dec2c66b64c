"""Entry point of a training subprocess: `python -m harness.child.launch --tree T [--module M ...] -- <dp args>`.

Puts the variant's built upstream tree first on sys.path, sets up the step clock
(harness.child.runtime), imports the variant's patch modules in order, then runs upstream's own
`dp` entry point. Step times and peak memory are dumped to $DPH_RUN_DIR/steps.json at exit,
also when training fails or is interrupted; under torchrun/mpirun by rank 0 only."""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from pathlib import Path

from harness.core import rebind  # standard library only


# (module, class, method, which calls count as a training step) of each backend's loop
STEP_HOOKS = {
    "pt": ("deepmd.pt.train.training", "Trainer", "_next_training_batch", None),
    "jax": ("deepmd.jax.train.trainer", "DPTrainer", "train_step", None),
    # the TF loop builds a training feed dict once per step (validation passes is_training=False)
    "tf": ("deepmd.tf.train.trainer", "DPTrainer", "get_feed_dict",
           lambda a, k: k.get("is_training", a[1] if len(a) > 1 else False)),
    # the PyTorch-Exportable and TF2 trainers run dpmodel's AbstractTrainer loop: one
    # train_step(task, step) per optimizer step, validation outside it
    "pt-expt": ("deepmd.pt_expt.train.training", "Trainer", "train_step", None),
    "tf2": ("deepmd.tf2.train.trainer", "Trainer", "train_step", None),
}
# backends whose hook must attach: a clock that silently stopped ticking would read as "0 steps
# timed" at best; for these the launcher fails at once, naming the hook
STRICT_HOOKS = frozenset({"pt-expt", "tf2"})


def _install_upstream_hooks(clock, backend: str) -> None:
    """Tick at every training step of the backend's upstream loop. Only that backend is imported:
    importing the others would cost start-up time (and JAX/TF may grab GPU memory)."""
    import importlib

    if backend not in STEP_HOOKS:
        return
    mod_name, cls_name, meth, counts = STEP_HOOKS[backend]
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
        orig = getattr(cls, meth)
    except Exception as e:  # backend missing in this tree/environment: dp itself will say so
        if backend in STRICT_HOOKS:
            raise RuntimeError(f"step clock: cannot hook {mod_name}.{cls_name}.{meth} for backend {backend}: "
                               f"{type(e).__name__}: {e}") from None
        return

    def hooked(self, *a, **k):
        if counts is None or counts((self, *a), k):
            clock.tick("upstream")
        return orig(self, *a, **k)

    hooked.__wrapped__ = orig  # a replay of the data order draws without ticking (child/resume.py)
    rebind.replace(cls, meth, hooked, by="harness.child.launch",
                   why="the step clock ticks at every training step (then upstream's own runs)")


LCURVE_FULL = "lcurve_full.jsonl"


def _install_lcurve_hook(run_dir: Path, backend: str) -> None:
    """Beside upstream's lcurve.out (three significant digits), every displayed row at full
    precision, one JSON object a line: step, lr, and the train/validation metrics, as passed to
    upstream's Trainer.print_on_training (the engines print through it too). What `trajectory`
    and the same-order tests compare."""
    if backend != "pt":
        return
    import json

    from deepmd.pt.train import training

    orig = training.Trainer.print_on_training

    def full(v):
        # a number (float, numpy or 0-d tensor) at full precision; multi-task inputs nest one dict
        # per task; anything else is None: this hook never stops a training
        if isinstance(v, dict):
            return {k: full(x) for k, x in v.items()}
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    def hooked(self, fout, step_id, cur_lr, train_results, valid_results):
        row = {"step": int(step_id), "lr": full(cur_lr), "trn": full(dict(train_results or {})),
               "val": full(dict(valid_results or {}))}
        with open(run_dir / LCURVE_FULL, "a") as f:
            f.write(json.dumps(row) + "\n")
        return orig(self, fout, step_id, cur_lr, train_results, valid_results)

    rebind.replace(training.Trainer, "print_on_training", hooked, by="harness.child.launch",
                   why="every displayed lcurve row also at full precision (lcurve_full.jsonl; then upstream's own)")


def atomic_saver(real_save):
    """torch.save with a path target made atomic (harness.core.fsutil.atomic_write: a temporary
    file beside it, fsync, one rename): a full disk or a kill mid-write leaves the previous file
    as it was and no half checkpoint under the final name; file objects pass through."""
    from harness.core import fsutil

    def save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            return fsutil.atomic_write(Path(f), lambda tmp: real_save(obj, tmp, *a, **k))
        return real_save(obj, f, *a, **k)

    return save


def _install_atomic_checkpoints(backend: str) -> None:
    """Upstream's PyTorch trainer writes each checkpoint with torch.save straight to
    model.ckpt-<step>.pt (Trainer._write_checkpoint) and only then points `checkpoint` and
    model.ckpt.pt at it: made atomic for the duration of that call (the engines save through it
    too)."""
    if backend != "pt":
        return
    import torch
    from deepmd.pt.train import training

    orig = training.Trainer._write_checkpoint

    def hooked(self, *a, **k):
        real = torch.save
        torch.save = atomic_saver(real)
        try:
            return orig(self, *a, **k)
        finally:
            torch.save = real

    rebind.replace(training.Trainer, "_write_checkpoint", hooked, by="harness.child.launch",
                   why="upstream's own checkpoint write, made atomic (a kill or a full disk leaves no half file)")


def _backend_of(dp_args: list[str]) -> str:
    for flag, name in (("--pt", "pt"), ("--jax", "jax"), ("--tf", "tf"), ("--pytorch", "pt"),
                       ("--tensorflow", "tf"), ("--pt-expt", "pt-expt"), ("--pytorch-exportable", "pt-expt"),
                       ("--tf2", "tf2"), ("--tensorflow2", "tf2")):
        if flag in dp_args:
            return name
    return "tf"  # dp's own default backend


def _peak_gpu_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except Exception:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m harness.child.launch --tree TREE [--module M ...] -- <dp arguments>", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="harness.child.launch")
    p.add_argument("--tree", required=True)
    p.add_argument("--module", action="append", default=[])
    args = p.parse_args(argv[:cut])
    dp_args = argv[cut + 1:]
    from harness.child import patch_loader
    from harness.child import runtime
    from harness.core import envvars

    patch_loader.put_on_path(args.tree, args.module)

    run_dir = Path(envvars.get_str(envvars.DPH_RUN_DIR))
    clock = runtime.clock
    # under torchrun/mpirun every rank runs this; only rank 0 owns the run's files
    from harness.run.distributed import is_rank0

    rank0 = is_rank0()
    if rank0:
        runtime.write_progress(clock, run_dir / "progress")

    def _dump() -> None:
        extra = {"gpu_peak_bytes": _peak_gpu_bytes(), "world_size": int(os.environ.get("WORLD_SIZE") or 1)}
        if runtime.engine_report is not None:  # what the engine really ran (dpfast.ran)
            try:
                extra["engine"] = runtime.engine_report()
            except Exception as e:  # noqa: BLE001 (the step times must still be written)
                extra["engine"] = {"error": f"{type(e).__name__}: {e}"}
        extra["replaced"] = rebind.replaced()  # which of upstream's code did not run as written
        from harness.child import forkserver

        if forkserver.IN_CHILD:  # forked from a server that imported upstream: startup_s excludes that
            extra["launcher"] = "fork server"
        clock.dump(str(run_dir / "steps.json"), extra)

    if rank0:
        atexit.register(_dump)
    profile_spec = envvars.get(envvars.DPH_PROFILE)
    if profile_spec and rank0:
        from harness.child import profiler as profile

        profile.install_in_process(clock, run_dir, profile_spec, _backend_of(dp_args))
    _install_upstream_hooks(clock, _backend_of(dp_args))
    if rank0:
        _install_lcurve_hook(run_dir, _backend_of(dp_args))
    _install_atomic_checkpoints(_backend_of(dp_args))
    patch_loader.import_modules(args.module)
    if rank0:  # after the variant's modules: its engine's Trainer.run is the one wrapped
        from harness.child import resume

        resume.install(run_dir, clock, _backend_of(dp_args), envvars.flag(envvars.DPH_FOLLOW_UPSTREAM_ORDER))

    from deepmd.main import main as dp_main

    sys.argv = ["dp", *dp_args]
    dp_main(dp_args)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "dph-launch"
    from harness.child import forkserver  # served: this process stays a proxy of a forked child

    served = forkserver.delegate("harness.child.launch", sys.argv[1:])
    sys.exit(main() if served is None else served)
