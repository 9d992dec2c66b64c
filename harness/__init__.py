"""dpharness: build, train, check and report optimisation variants of upstream DeePMD-kit.

One package per stage, data flowing one way:
  prepare (upstream pin, variant build, system) -> run (train, time) -> judge (accuracy)
  -> analyse (profile) -> results (store) -> report
with core/ (records, paths, envvars, fsutil) shared by all, child/ for the code that runs inside
the training process, and cli/ the only layer that drives sweeps. Records passed between stages
are dataclasses in ``harness.core.records``.
"""
__version__ = "0.1.0"
