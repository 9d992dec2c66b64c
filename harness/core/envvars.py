"""Every DPH_* environment variable of the project, declared once with who reads it and why.

Each declaration is also a constant of the same name (``envvars.DPH_RUN_DIR == "DPH_RUN_DIR"``):
code that sets a variable for a child process writes ``env[envvars.DPH_RUN_DIR]``, and code that
reads one goes through ``get``, ``get_str``, ``get_float`` or ``flag`` below, never os.environ.
The engine (engines/dpfast) reads its knobs in one place, dpfast/options.py (EngineOptions.current,
through this module); their declared defaults here are EngineOptions' code defaults (what the
`fused` variant runs; tests/engines/test_options.py holds them together).

tests/unit/test_envvars.py fails when code reads or sets a DPH_* name that is not declared here, when a
declared name is no longer used anywhere (the list cannot drift from the code), or when code
outside engines/ reads a DPH_* variable without this module."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    reader: str    # where it is read
    meaning: str
    default: str | None = None


_ALL: list[EnvVar] = []


def _declare(name: str, reader: str, meaning: str, default: str | None = None) -> str:
    _ALL.append(EnvVar(name, reader, meaning, default))
    return name


# --- the harness (set by the user, CI or the harness itself) ---
DPH_PATCHES = _declare("DPH_PATCHES", "harness.core.paths",
                       "another variant folder instead of patches/ (a team's own variants)")
DPH_IGNORE_SHARED = _declare("DPH_IGNORE_SHARED", "harness.prepare.systems",
                             "set: never read ../shared (CI sets it to 1, so nothing can come to need it)")
DPH_TF_ERA_PYTHON = _declare("DPH_TF_ERA_PYTHON", "harness.prepare.tf_era",
                             "the CPython 3.8 interpreter of the TF v2 family's environment (default: pyenv's)")
DPH_GIT_SHA = _declare("DPH_GIT_SHA", "harness.core.environment",
                       "the commit a copied tree was taken from (a GPU node's copy has no real .git)")
DPH_UPSTREAM_TREE = _declare("DPH_UPSTREAM_TREE", "tools/gpu_env.sh",
                             "an upstream tree to use instead of building baseline")
DPH_FORK_SERVER = _declare("DPH_FORK_SERVER", "harness.child.forkserver",
                           "a folder: PyTorch children are forked from a server that imported upstream once "
                           "(tests/conftest.py sets one per pytest worker; unset: every child starts fresh)")
# --- set by the harness for the training child process ---
DPH_RUN_DIR = _declare("DPH_RUN_DIR", "harness.child.runtime", "the run's work directory (steps.json, profile.json)",
                       ".")
DPH_VARIANT = _declare("DPH_VARIANT", "harness.child.runtime", "the variant the child trains", "baseline")
DPH_PROFILE = _declare("DPH_PROFILE", "harness.child.launch", "in-process profiler spec: steady[,start=N][,window=M]")
# --- engine knobs (engines/dpfast), set by a variant manifest's env ---
DPH_GEOM = _declare("DPH_GEOM", "dpfast.options", "geometry mode of the fast engine (compact | onthefly | ...)")
DPH_FUSED_GROUPED = _declare("DPH_FUSED_GROUPED", "dpfast.options", "grouping of fused GEMM chains: 0 | 1 | nets | emb",
                             "1")
DPH_FUSED_KERNELS = _declare("DPH_FUSED_KERNELS", "dpfast.options",
                             "1: fused's embedding nets and contractions by its Triton kernels (variant fused-kernels)")
DPH_FUSED_VJP_ATOMS = _declare("DPH_FUSED_VJP_ATOMS", "dpfast.options",
                               "fused-kernels: centre atoms per VJP kernel program (embed_autograd.vjp_split)", "1")
DPH_FUSED_VJP_SLOTS = _declare("DPH_FUSED_VJP_SLOTS", "dpfast.options",
                               "fused-kernels: neighbour slots per VJP kernel program, 0 = all of an atom's", "16")
DPH_FUSED_VJP_ROWS = _declare("DPH_FUSED_VJP_ROWS", "dpfast.options",
                              "fused-kernels: neighbour rows per tile of the weight-VJP kernel (16, 32), 0 = "
                              "the launch table's (embed_kernels.LAUNCH)", "0")
DPH_FUSED_VJP_WARPS = _declare("DPH_FUSED_VJP_WARPS", "dpfast.options",
                               "fused-kernels: warps of a weight-VJP kernel program (1-16), 0 = the launch table's", "0")
DPH_FUSED_VJP_HALVES = _declare("DPH_FUSED_VJP_HALVES", "dpfast.options",
                                "1: fused-kernels' weight VJP evaluates a concat last layer by column halves "
                                "(less shared memory per program)")
DPH_FUSED_CONTRACT_F64 = _declare("DPH_FUSED_CONTRACT_F64", "dpfast.options",
                                  "1: fused's descriptor contractions in float64 under a float32 descriptor "
                                  "(TF32 rounds only the nets' GEMMs)")
DPH_FUSED_SPLIT_TF32 = _declare("DPH_FUSED_SPLIT_TF32", "dpfast.options",
                                 "1: fused's float32 net GEMMs and contractions as three TF32 products "
                                 "(3xTF32: float32's accuracy on tensor cores)")
DPH_FUSED_SPLIT_TF32_KERNEL = _declare("DPH_FUSED_SPLIT_TF32_KERNEL", "dpfast.options",
                                        "1: fused-3xtf32's three TF32 products formed on chip by a Triton "
                                        "kernel (dpfast::tf32x3_mm)")
DPH_FUSED_AUTOGRAD = _declare("DPH_FUSED_AUTOGRAD", "dpfast.options",
                              "1: forces by autograd instead of the hand-written backward")
DPH_FUSED_COMPILE = _declare("DPH_FUSED_COMPILE", "dpfast.options", "0: fused's CUDA step stays eager", "1")
DPH_FUSED_COMPILE_STEP = _declare("DPH_FUSED_COMPILE_STEP", "dpfast.options", "1: torch.compile the whole fused step",
                                  "1")
DPH_FUSED_COMPILE_MODE = _declare("DPH_FUSED_COMPILE_MODE", "dpfast.options", "Inductor mode of fused's compile",
                                  "default")
DPH_FUSED_BATCHED = _declare("DPH_FUSED_BATCHED", "dpfast.options", "1: batched (padded) per-type contractions", "0")
DPH_FLAT_ADAM_COMPILE = _declare("DPH_FLAT_ADAM_COMPILE", "dpfast.options",
                                 "1: compile the flat Adam update per bucket (graph's manifest: 0)", "1")
DPH_FOLLOW_UPSTREAM_ORDER = _declare("DPH_FOLLOW_UPSTREAM_ORDER", "dpfast.options",
                                     "1: train on the frames upstream's own sampler draws, step for step")
DPH_ENGINE_ALLOW_FALLBACK = _declare("DPH_ENGINE_ALLOW_FALLBACK", "dpfast.options",
                                     "1: a failed compile/capture trains eagerly, recorded as a fallback (else: failed run)")
DPH_COMPILE_CPU = _declare("DPH_COMPILE_CPU", "dpfast.options", "1: the compile knobs apply on CPU too (tests)")
DPH_COMPILE_BACKEND = _declare("DPH_COMPILE_BACKEND", "dpfast.options",
                               "torch.compile backend (tests use aot_eager)", "inductor")
DPH_COMPILE_BUCKET = _declare("DPH_COMPILE_BUCKET", "dpfast.options",
                              "pad the extended region to a multiple of this", "256")
DPH_COMPILE_DISABLE = _declare("DPH_COMPILE_DISABLE", "dpfast.options", "1: always upstream's eager path")
DPH_TF32_EMULATE = _declare("DPH_TF32_EMULATE", "patches/fused-mixed",
                            "1: round float32 CPU GEMM inputs to TF32 (the precision budget's CPU rows)")
DPH_MIXED_DTYPE = _declare("DPH_MIXED_DTYPE", "patches/mixed", "low-precision dtype of the mixed variant", "bfloat16")
# --- tools/ and tests ---
DPH_GPU_BUDGET_S = _declare("DPH_GPU_BUDGET_S", "tools/gpu_check_fused.py", "seconds the GPU check plan may use",
                            "270")
DPH_GPU_WORK = _declare("DPH_GPU_WORK", "tools/gpu_check_fused.py", "work folder of the GPU check",
                        "/tmp/fused_gpu_check")
DPH_PARITY_SYSTEMS = _declare("DPH_PARITY_SYSTEMS", "tools/gpu_check_fused.py", "systems of the GPU parity check",
                              "water")
DPH_PARITY_COMPILED = _declare("DPH_PARITY_COMPILED", "tools/gpu_check_fused.py", "1: also check compiled parity")
DPH_TEST_SIGNAL = _declare("DPH_TEST_SIGNAL", "tests/integration/test_reliability.py", "signal (or OOM) the killer variant raises")
DPH_TEST_KILL_SEED = _declare("DPH_TEST_KILL_SEED", "tests/integration/test_train_resume.py",
                              "seed of the random kill step (reproduces a failure; default: a fresh one)")
DPH_TEST_KILL_AT = _declare("DPH_TEST_KILL_AT", "tests/integration/test_reliability.py", "step at which the killer variant dies",
                            "3")

VARS: dict[str, EnvVar] = {v.name: v for v in _ALL}


def get(name: str) -> str | None:
    """The variable's value, else its declared default; an undeclared name is a bug, not input."""
    v = VARS[name]
    return os.environ.get(name, v.default)


def get_str(name: str) -> str:
    """get() for a variable that declares a default: never None."""
    value = get(name)
    if value is None:
        raise KeyError(f"{name} declares no default: use get()")
    return value


def get_float(name: str) -> float:
    """The value (or declared default) as a number."""
    return float(get_str(name))


def flag(name: str) -> bool:
    """A 0/1 switch: set and not '0' or empty."""
    return (get(name) or "") not in ("", "0")
