"""What the Triton embedding kernels ask of an sm_90 GPU (H100 / H200), known without one: each
kernel compiled ahead of time for that target by Triton's own compiler and the ptxas it ships,
its shared memory per block from Triton's metadata, its registers and spill stack per thread from
``cuobjdump --dump-resource-usage`` of the cubin. A kernel whose shared memory exceeds the
block limit cannot launch (Triton's OutOfResources, as the first H100 run of issue 39 found);
spill stack is local-memory traffic on every use. Used by the CPU tests (the limit) and
``tools/kernel_resources.py`` (the table)."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

from . import cotangent_autograd as ca
from . import embed_autograd as ea
from . import embed_kernels as ek

SM90_SHARED_PER_BLOCK = 232448  # bytes: the opt-in limit Triton's launcher checks on H100 / H200
SM90_REGISTERS_PER_BLOCK = 65536  # 32-bit registers: regs per thread x threads must fit (Triton checks it too)


def fits(res: dict) -> bool:
    """Whether a compiled kernel (compile_sm90's answer) can launch on sm_90: its shared memory and
    its registers x threads within one block's limits. 255 registers x 16 warps cannot (the H100
    run of 41f8efd: "out of resource: threads, Required: 512, Hardware limit: 256")."""
    return res["shared"] <= SM90_SHARED_PER_BLOCK and res["regs"] * 32 * res["warps"] <= SM90_REGISTERS_PER_BLOCK


def kernels() -> list[tuple[str, object, str]]:
    """(name, Triton kernel, its kind in embed_kernels.LAUNCH) of every embedding kernel."""
    return [("embed_contract", ek._embed_contract_kernel, "forward"), ("env_cotangent", ek._env_cotangent_kernel, "cotangent"),
            ("weight_vjp", ea._weight_vjp_kernel, "vjp"), ("cotangent_vjp", ca._cotangent_vjp_kernel, "vjp")]


def se_e2_a_constants(slots: int = 92, widths: tuple = (25, 50, 100), halves: bool = False) -> dict:
    """The kernels' compile-time constants for se_e2_a's default net (concat skips, tanh); halves:
    the weight VJP's last layer by column halves (DPH_FUSED_VJP_HALVES)."""
    lays = ek._layouts(widths, (ek.SKIP_CONCAT, ek.SKIP_CONCAT))
    p1, p2, p3 = (len(l) for l in lays)
    return dict(S=slots, NG=widths[2], P1=p1, P2=p2, P3=p3, TANH0=True, TANH1=True, TANH2=True,
                SKIP1=ek.SKIP_CONCAT, SKIP2=ek.SKIP_CONCAT, TANH_EXP=False, ATOMS=ea.ATOMS_PER_PROGRAM,
                HALVES=halves, NEED_RR=True)


def compile_sm90(kernel, constants: dict, kind: str, rows: int | None = None, warps: int | None = None) -> dict:
    """Compile `kernel` for sm_90 with the launch configuration the engine uses (or rows/warps):
    {shared, regs, stack, rows, warps, maxnreg}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tile_rows, cfg = ek.launch_config(kind, interpreter=False)
    rows = rows or tile_rows
    if warps:
        cfg["num_warps"] = warps
    bs = min(ek._pow2(constants["S"]), rows)
    _, slots, chunks = ea.vjp_split(1, constants["S"], bs)  # a VJP kernel's split at these tile rows, as the engine's
    const = {k: v for k, v in dict(constants, BS=bs, SLOTS=slots, NC=chunks).items() if k in kernel.arg_names}
    sig = {n: "constexpr" if n in const else "i32" if n == "A" else "*i32" if n == "cols" else "*fp64"
           for n in kernel.arg_names}
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options=cfg)
    out = dict(shared=int(c.metadata.shared), rows=const["BS"], warps=cfg["num_warps"], maxnreg=cfg.get("maxnreg"))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)")):
        m = re.search(pat, usage)
        out[key] = int(m.group(1)) if m else None
    return out
