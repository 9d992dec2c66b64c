"""The dpfast engines' options, one typed and validated set (issue 37).

A variant's manifest sets them (its `env`, e.g. fused's `DPH_FUSED_COMPILE_STEP: "1"`); they
reach the training child in its environment, and ``current()`` is the one place the engine reads
them (through harness.core.envvars, where each variable is declared). The code defaults are what
the `fused` variant runs, so an engine built in a test without any setting is the benchmarked
one; tests/engines/test_options.py fails when a manifest's set and these defaults drift apart.
The engine writes the options it ran with into the run record (``engine.options``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping

from harness.core import envvars

GEOM_MODES = ("precomputed", "onthefly", "compact")
GROUPINGS = ("1", "nets", "emb", "0")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
VJP_ROWS = (0, 16, 32)  # tl.dot needs >= 16 rows; 64 rows exceed sm_90's shared memory
VJP_WARPS = (0, 1, 2, 4, 8)  # 16 cannot launch: 255 registers x 512 threads > 64 K (H100 run, 41f8efd)


@dataclass(frozen=True)
class EngineOptions:
    # geometry stored per training frame: precomputed (R~ and dR~/dr), onthefly (indices and
    # displacements; R~ formed in the step), compact (coordinates, shifts, one int32 per pair);
    # None: the engine's own default (graph: precomputed, fused: compact)
    geom: str | None = None
    # fused's GEMM grouping: 1 (all blocks' nets and contractions batched), nets (nets batched,
    # contractions per block), emb (embedding nets batched only), 0 (one chain per block)
    grouped: str = "1"
    autograd_forces: bool = False  # fused: forces by autograd instead of the analytic first derivative
    batched: bool = False  # fused: every block padded into one [nblocks, NA, S] layout (slower on water)
    kernels: bool = False  # fused: embedding nets + contractions by the Triton kernels (embed_autograd, cotangent_autograd)
    compile: bool = True  # fused on CUDA: compile at all (False: the eager analytic step, captured)
    compile_step: bool = True  # fused: ONE torch.compile of gather + energy/forces + loss (else: predict only)
    compile_mode: str = "default"  # Inductor's mode for fused's compile
    flat_adam_compile: bool = True  # the flat Adam update compiled into one kernel per bucket
    compile_cpu: bool = False  # the compile options apply on CPU too (tests; Inductor's C++ takes minutes)
    compile_backend: str = "inductor"  # torch.compile backend (tests: aot_eager, eager)
    follow_upstream_order: bool = False  # train on the frames upstream's own sampler draws
    allow_fallback: bool = False  # a failed compile/capture trains eagerly, recorded as a fallback
    upstream_compile_bucket: int = 256  # compile variant: pad the extended region to a multiple of this
    upstream_compile_disable: bool = False  # compile variant: always upstream's eager path
    # fused-kernels' VJP launch (embed_autograd.vjp_split): centre atoms per program, and neighbour
    # slots per program (0: all of an atom's); fewer of either = more programs for a small system.
    # 1 x 16 trained water at 2.67 ms/step vs 7.20 at 8 x all (H100, sweeps 20261207T102038Z-4f0844
    # and 20261207T101821Z-129bb9)
    vjp_atoms: int = 1
    vjp_slots: int = 16
    # the weight-VJP kernel's tile: neighbour rows per tile and warps per program (0: LAUNCH's 16
    # rows, 8 warps). Built for sm_90 (tools/kernel_resources.py), 32 rows x 8 warps fit (192 KiB
    # shared, 376-576 B spill stack); the cotangent VJP stays at 16 rows (32 spill ~10 KB)
    vjp_rows: int = 0
    vjp_warps: int = 0
    # the weight VJP evaluates the last layer by column halves where it is a concat layer (se_e2_a's
    # default 1 -> 25 -> 50 -> 100; another last layer runs whole: embed_autograd.WEIGHT_VJP_HALVES)
    vjp_halves: bool = False
    # the descriptor's contractions (R~^T G, D = xyz^T xyz<, their VJPs, dE/dR~ times its Jacobian)
    # in float64 where the descriptor is float32 (analytic_nets.contract): TF32 then rounds only the
    # nets' GEMMs. The CPU's emulated budget put fused-mixed's metal virial error (2e-3 > the mixed
    # class's 1e-3) in the descriptor, not the fitting net
    contract_f64: bool = False
    # every float32 GEMM of the nets and contractions as three TF32 products (hi.hi + hi.lo + lo.hi,
    # analytic_nets.gemm): float32's accuracy from the tensor cores -- fused-3xtf32, for the virial
    # the TF32 embedding nets broke on copper's 4000-step checkpoint (1.64e-3, emulated)
    split_tf32: bool = False
    # ... with the three products formed on chip by a Triton kernel (tf32x3_gemm: each tile loaded
    # once as float32, split in registers) instead of torch ops that write [hi | hi | lo] out
    split_tf32_kernel: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("geom", GEOM_MODES), ("grouped", GROUPINGS), ("compile_mode", COMPILE_MODES),
                              ("compile_backend", COMPILE_BACKENDS)):
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise ValueError(f"{ENV[name]}={v!r}: not one of {' | '.join(allowed)}")
        for name, least in (("upstream_compile_bucket", 1), ("vjp_atoms", 1), ("vjp_slots", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{ENV[name]}={getattr(self, name)}: must be >= {least}")
        if self.split_tf32_kernel and not self.split_tf32:
            raise ValueError(f"{ENV['split_tf32_kernel']}=1 needs {ENV['split_tf32']}=1")
        if self.split_tf32 and self.autograd_forces:
            raise ValueError(f"{ENV['split_tf32']}=1 with {ENV['autograd_forces']}=1: the three-product GEMM has first "
                             "derivatives only, autograd forces need a second")
        if self.vjp_rows not in VJP_ROWS:
            raise ValueError(f"{ENV['vjp_rows']}={self.vjp_rows}: not one of {' | '.join(map(str, VJP_ROWS))}")
        if self.vjp_warps not in VJP_WARPS:
            raise ValueError(f"{ENV['vjp_warps']}={self.vjp_warps}: not one of {' | '.join(map(str, VJP_WARPS))}")

    def as_dict(self) -> dict:
        return asdict(self)

    def compiles_on(self, device_type: str) -> bool:
        """Whether the compile options apply on this device (CUDA, or CPU with compile_cpu)."""
        return device_type == "cuda" or self.compile_cpu


# each option's variable (declared in harness.core.envvars)
ENV = {
    "geom": envvars.DPH_GEOM, "grouped": envvars.DPH_FUSED_GROUPED, "autograd_forces": envvars.DPH_FUSED_AUTOGRAD,
    "batched": envvars.DPH_FUSED_BATCHED, "kernels": envvars.DPH_FUSED_KERNELS, "compile": envvars.DPH_FUSED_COMPILE,
    "compile_step": envvars.DPH_FUSED_COMPILE_STEP, "compile_mode": envvars.DPH_FUSED_COMPILE_MODE,
    "flat_adam_compile": envvars.DPH_FLAT_ADAM_COMPILE, "compile_cpu": envvars.DPH_COMPILE_CPU,
    "compile_backend": envvars.DPH_COMPILE_BACKEND, "follow_upstream_order": envvars.DPH_FOLLOW_UPSTREAM_ORDER,
    "allow_fallback": envvars.DPH_ENGINE_ALLOW_FALLBACK, "upstream_compile_bucket": envvars.DPH_COMPILE_BUCKET,
    "upstream_compile_disable": envvars.DPH_COMPILE_DISABLE, "vjp_atoms": envvars.DPH_FUSED_VJP_ATOMS,
    "vjp_slots": envvars.DPH_FUSED_VJP_SLOTS, "vjp_rows": envvars.DPH_FUSED_VJP_ROWS,
    "vjp_warps": envvars.DPH_FUSED_VJP_WARPS, "vjp_halves": envvars.DPH_FUSED_VJP_HALVES,
    "contract_f64": envvars.DPH_FUSED_CONTRACT_F64, "split_tf32": envvars.DPH_FUSED_SPLIT_TF32,
    "split_tf32_kernel": envvars.DPH_FUSED_SPLIT_TF32_KERNEL,
}


def from_env(environ: Mapping[str, str]) -> EngineOptions:
    """The options a variable mapping sets (a manifest's chain env, or a process environment);
    an option it does not set keeps its code default. ValueError names a bad value's variable."""
    kw = {}
    for f in fields(EngineOptions):
        raw = environ.get(ENV[f.name])
        if raw is None or raw == "":
            continue
        if f.type == "bool":
            if raw not in ("0", "1"):
                raise ValueError(f"{ENV[f.name]}={raw!r}: must be 0 or 1")
            kw[f.name] = raw == "1"
        elif f.type == "int":
            try:
                kw[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"{ENV[f.name]}={raw!r}: not an integer") from None
        else:
            kw[f.name] = raw
    return EngineOptions(**kw)


def current() -> EngineOptions:
    """The options of this process: its environment as the variant's manifest set it, read
    through harness.core.envvars (whose declared defaults are these code defaults)."""
    return from_env({name: v for name in ENV.values() if (v := envvars.get(name)) is not None})
