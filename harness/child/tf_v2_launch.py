"""The training child of the TF v2 family (DeePMD-kit 2.0.3, the competition's era), run by that
family's Python 3.8 interpreter: ``python -m harness.child.tf_v2_launch -- train input.json``.

It times v2's own training loop (deepmd/train/trainer.py, ``DPTrainer.train``): the loop calls
``self.get_feed_dict(batch, is_training=True)`` once per step, right before the step's
``run_sess(train_op)``, so a tick there marks each step's start, the same contract as
harness.child.launch's upstream hooks. A hook that cannot attach (the method is gone in another
release) is an error, never an untimed run. Under horovodrun every rank runs this; rank 0 writes
steps.json and the progress file. Standard library and harness.child.runtime only (Python 3.8)."""
from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path


def install_hook(clock) -> None:
    from deepmd.train import trainer

    cls = getattr(trainer, "DPTrainer", None)
    original = getattr(cls, "get_feed_dict", None)
    if original is None:
        raise RuntimeError("tf_v2_launch: deepmd.train.trainer.DPTrainer.get_feed_dict not found: "
                           "this deepmd-kit's training loop cannot be timed")

    def get_feed_dict(self, batch, is_training):
        if is_training:
            clock.tick()
        return original(self, batch, is_training)

    cls.get_feed_dict = get_feed_dict


def gloo_logging_fixup(size: int) -> str | None:
    """v2 (2.0.3) assumes Horovod runs over MPI: distributed, it hands `--mpi-log master` to its
    logger, which then requires mpi4py only to choose which rank writes the console. Under
    `horovodrun --gloo` there is no MPI, and the run dies before training ("You cannot specify
    'mpi_log' when mpi4py not installed"). Fix-up, where mpi4py is absent and N > 1: the logger
    gets mpi_log=None, so every rank logs to the console (horovodrun prefixes each line with its
    rank). Returns the line the run's log gets, or None when nothing was changed."""
    if size <= 1:
        return None
    try:
        import mpi4py  # noqa: F401
        return None
    except ImportError:
        pass
    from deepmd.train import run_options

    original = run_options.set_log_handles

    def set_log_handles(level, log_path=None, mpi_log=None):
        return original(level, log_path, mpi_log=None)

    run_options.set_log_handles = set_log_handles
    return ("tf_v2_launch fix-up: no mpi4py under horovodrun --gloo: v2's logger gets mpi_log=None "
            "(every rank logs to the console)")


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m harness.child.tf_v2_launch -- <v2 dp arguments>", file=sys.stderr)
        return 2
    dp_args = argv[argv.index("--") + 1:]
    from harness.child import runtime
    from harness.core import envvars
    from harness.run.distributed import is_rank0

    clock = runtime.clock
    run_dir = Path(envvars.get_str(envvars.DPH_RUN_DIR))
    # world size as the launcher set it; the run's own log says what v2 made of it
    size = int(os.environ.get("HOROVOD_SIZE") or 1)
    if is_rank0():
        runtime.write_progress(clock, run_dir / "progress")
        atexit.register(lambda: clock.dump(str(run_dir / "steps.json"),
                                           {"gpu_peak_bytes": None, "world_size": size}))
    install_hook(clock)
    fixed = gloo_logging_fixup(size)
    if fixed:
        print(fixed, file=sys.stderr, flush=True)
    from deepmd.entrypoints.main import main as dp_main

    sys.argv = ["dp", *dp_args]
    dp_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
