"""Microbenchmark of one float32 GEMM of the fused engine's nets, five ways, on one GPU (issue 40):

* ``fp64``: the product in float64 (what fused runs: FP64 tensor cores);
* ``fp32``: float32 without tensor cores (fused-fp32);
* ``tf32``: float32 inputs rounded to TF32 on the tensor cores (fused-mixed; ~1e-3 relative);
* ``3xtf32-ops``: analytic_nets._mm3 -- three TF32 products from torch ops, the split operands
  written out as [hi | hi | lo] (fused-3xtf32);
* ``3xtf32-kernel``: dpfast::tf32x3_mm -- the Triton kernel splitting each tile in registers
  (fused-3xtf32-kernel).

The shapes are water's se_e2_a embedding (1 -> 25 -> 50 -> 100) at A atoms, ~138 neighbour slots
each: a layer's forward for value and tangent rows ([2, rows, in] @ [in, out]), its hand-written
VJP ([rows, out] @ [out, in]) and a weight gradient ([in, 2 rows] @ [2 rows, out]). Per way:
microseconds per call (triton.testing.do_bench: median after warm-up, L2 flushed), and the worst
relative error against float64 -- so a slow variant's sweep can be read against its GEMMs.

Usage (GPU machine):  python tools/bench_tf32x3.py --atoms 192,1536 --json $OUT/tf32x3-micro.json
(on a CPU: the same table by wall clock, small sizes only, for the plumbing)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from dpfast import analytic_nets as an  # noqa: E402
from dpfast import tf32x3_gemm as k  # noqa: E402

SLOTS = 138  # water's sel 46 + 92
LAYERS = ((25, 50), (50, 100))


def shapes(atoms: int) -> list[tuple[str, tuple, tuple]]:
    rows = atoms * SLOTS
    out = []
    for nin, nout in LAYERS:
        out.append((f"fwd {nin}->{nout}", (2, rows, nin), (nin, nout)))
        out.append((f"vjp {nout}->{nin}", (rows, nout), (nout, nin)))
        out.append((f"wgrad {nin}x{nout}", (nin, 2 * rows), (2 * rows, nout)))
    return out


def _with_tf32(fn):
    """fn with cuBLAS's TF32 on (as fused-mixed and fused-3xtf32 set it), off again after."""
    def run(a, b):
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return fn(a, b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    return run


def ways() -> dict:
    return {"fp64": lambda a, b: torch.matmul(a.double(), b.double()), "fp32": torch.matmul,
            "tf32": _with_tf32(torch.matmul), "3xtf32-ops": _with_tf32(an._mm3), "3xtf32-kernel": k.mm}


def timed(fn, a, b, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return 1e3 * triton.testing.do_bench(lambda: fn(a, b), warmup=20, rep=100)
    t = time.perf_counter()
    fn(a, b)
    return 1e6 * (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--atoms", default="192,1536")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for atoms in (int(x) for x in a.atoms.split(",")):
        for name, sa, sb in shapes(atoms):
            g = torch.Generator(device=dev).manual_seed(1)
            x = torch.randn(*sa, device=dev, generator=g)
            w = torch.randn(*sb, device=dev, generator=g) / sb[-2] ** 0.5
            exact = torch.matmul(x.double(), w.double())
            for way, fn in ways().items():
                if way == "3xtf32-kernel" and not (cuda or k.INTERPRETED):
                    continue
                err = ((fn(x, w).double() - exact).abs().max() / exact.abs().max()).item()
                rows.append(dict(atoms=atoms, gemm=name, a=list(sa), b=list(sb), way=way,
                                 us=round(timed(fn, x, w, cuda), 2), rel_err=err))
                print(f"{atoms:>6} {name:14} {way:14} {rows[-1]['us']:>10.1f} us  err {err:.1e}", flush=True)
    if a.json:
        card = torch.cuda.get_device_name() if cuda else "cpu"
        Path(a.json).write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
