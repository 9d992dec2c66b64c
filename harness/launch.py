"""Entry point of a training subprocess: `python -m harness.launch --tree T [--module M ...] -- <dp args>`.

Puts the variant's built upstream tree first on sys.path, sets up the step clock
(harness.runtime), imports the variant's patch modules in order, then runs upstream's own
`dp` entry point. Step times and peak memory are dumped to $DPH_RUN_DIR/steps.json at exit,
also when training fails or is interrupted; under torchrun/mpirun by rank 0 only."""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path


def _install_upstream_hooks(clock) -> None:
    """Tick at every training step of upstream's loops, whichever backend `dp` picks."""
    try:
        from deepmd.pt.train import training as pt_training
    except Exception:  # PT backend unavailable in this tree: no hook needed
        pt_training = None
    if pt_training is not None:
        orig = pt_training.Trainer._next_training_batch

        def _next_training_batch(self, *a, **k):
            clock.tick("upstream")
            return orig(self, *a, **k)

        pt_training.Trainer._next_training_batch = _next_training_batch
    try:
        from deepmd.jax.train import trainer as jax_trainer
    except Exception:  # JAX absent: the JAX backend cannot run anyway
        jax_trainer = None
    if jax_trainer is not None:
        orig_step = jax_trainer.DPTrainer.train_step

        def train_step(self, *a, **k):
            clock.tick("upstream")
            return orig_step(self, *a, **k)

        jax_trainer.DPTrainer.train_step = train_step


def _progress_writer(clock, path: Path) -> None:
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
        print("usage: python -m harness.launch --tree TREE [--module M ...] -- <dp arguments>", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="harness.launch")
    p.add_argument("--tree", required=True)
    p.add_argument("--module", action="append", default=[])
    args = p.parse_args(argv[:cut])
    dp_args = argv[cut + 1:]
    sys.path.insert(0, str(Path(args.tree).resolve()))

    from harness import runtime

    run_dir = Path(os.environ.get("DPH_RUN_DIR", "."))
    clock = runtime.clock
    # under torchrun/mpirun every rank runs this; only rank 0 owns the run's files
    from harness.distributed import is_rank0

    rank0 = is_rank0()
    if rank0:
        _progress_writer(clock, run_dir / "progress")

    def _dump() -> None:
        extra = {"gpu_peak_bytes": _peak_gpu_bytes(), "world_size": int(os.environ.get("WORLD_SIZE") or 1)}
        clock.dump(str(run_dir / "steps.json"), extra)

    if rank0:
        atexit.register(_dump)
    if os.environ.get("DPH_PROFILE") and rank0:
        from harness import profile

        profile.install_in_process(clock, run_dir, os.environ["DPH_PROFILE"])
    _install_upstream_hooks(clock)
    for i, m in enumerate(args.module):
        spec = importlib.util.spec_from_file_location(f"dph_patch_{i}_{Path(m).stem}", m)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)

    from deepmd.main import main as dp_main

    sys.argv = ["dp", *dp_args]
    dp_main(dp_args)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "dph-launch"
    sys.exit(main())
