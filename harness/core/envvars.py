"""Every DPH_* environment variable of the project, declared once with who reads it and why.

tests/test_envvars.py fails when code reads or sets a DPH_* name that is not declared here, or
when a declared name is no longer used anywhere: the list cannot drift from the code."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    reader: str    # where it is read
    meaning: str
    default: str | None = None


_ALL = [
    # --- the harness (set by the user, CI or the harness itself) ---
    EnvVar("DPH_PATCHES", "harness.core.paths", "another variant folder instead of patches/ (a team's own variants)"),
    EnvVar("DPH_IGNORE_SHARED", "harness.prepare.systems",
           "1: never read ../shared (CI sets it, so nothing can come to need it)"),
    EnvVar("DPH_GIT_SHA", "harness.core.environment",
           "the commit a copied tree was taken from (a GPU node's copy has no real .git)"),
    EnvVar("DPH_UPSTREAM_TREE", "tools/gpu_env.sh", "an upstream tree to use instead of building baseline"),
    # --- set by the harness for the training child process ---
    EnvVar("DPH_RUN_DIR", "harness.child.runtime", "the run's work directory (steps.json, profile.json)", "."),
    EnvVar("DPH_VARIANT", "harness.child.runtime", "the variant the child trains", "baseline"),
    EnvVar("DPH_PROFILE", "harness.child.launch", "in-process profiler spec: steady[,start=N][,window=M]"),
    # --- engine knobs (engines/dpfast), set by a variant manifest's env ---
    EnvVar("DPH_GEOM", "dpfast.prediction", "geometry mode of the fast engine (compact | onthefly | ...)"),
    EnvVar("DPH_FUSED_GROUPED", "dpfast.fused", "grouping of fused GEMM chains: 0 | 1 | nets | emb", "1"),
    EnvVar("DPH_FUSED_AUTOGRAD", "dpfast.fused", "1: forces by autograd instead of the hand-written backward"),
    EnvVar("DPH_FUSED_COMPILE", "dpfast.fused", "0: fused's CUDA step stays eager", "1"),
    EnvVar("DPH_FUSED_COMPILE_STEP", "dpfast.fused", "1: torch.compile the whole fused step"),
    EnvVar("DPH_FUSED_COMPILE_MODE", "dpfast.fused", "Inductor mode of fused's compile", "default"),
    EnvVar("DPH_FUSED_BATCHED", "dpfast.fused", "1: batched (padded) per-type contractions", "0"),
    EnvVar("DPH_FLAT_ADAM_COMPILE", "dpfast.flat_optim", "1: compile the flat Adam update per bucket"),
    EnvVar("DPH_COMPILE_CPU", "dpfast.flat_optim", "1: the compile knobs apply on CPU too (tests)"),
    EnvVar("DPH_COMPILE_BACKEND", "dpfast.flat_optim, dpfast.upstream_compile",
           "torch.compile backend (tests use aot_eager)", "inductor"),
    EnvVar("DPH_COMPILE_BUCKET", "dpfast.upstream_compile", "pad the extended region to a multiple of this", "256"),
    EnvVar("DPH_COMPILE_DISABLE", "dpfast.upstream_compile", "1: always upstream's eager path"),
    EnvVar("DPH_MIXED_DTYPE", "patches/mixed", "low-precision dtype of the mixed variant", "bfloat16"),
    # --- tools/ and tests ---
    EnvVar("DPH_GPU_BUDGET_S", "tools/gpu_check_fused.py", "seconds the GPU check plan may use", "270"),
    EnvVar("DPH_GPU_WORK", "tools/gpu_check_fused.py", "work folder of the GPU check", "/tmp/fused_gpu_check"),
    EnvVar("DPH_PARITY_SYSTEMS", "tools/gpu_check_fused.py", "systems of the GPU parity check", "water"),
    EnvVar("DPH_PARITY_COMPILED", "tools/gpu_check_fused.py", "1: also check compiled parity"),
    EnvVar("DPH_TEST_SIGNAL", "tests/test_reliability.py", "signal (or OOM) the killer variant raises"),
    EnvVar("DPH_TEST_KILL_AT", "tests/test_reliability.py", "step at which the killer variant dies", "3"),
]
VARS: dict[str, EnvVar] = {v.name: v for v in _ALL}


def get(name: str) -> str | None:
    """The variable's value, else its declared default; an undeclared name is a bug, not input."""
    v = VARS[name]
    return os.environ.get(name, v.default)


def flag(name: str) -> bool:
    """A 0/1 switch: set and not '0' or empty."""
    return (get(name) or "") not in ("", "0")
