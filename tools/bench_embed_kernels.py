"""Microbenchmark of the Triton embedding kernels (engines/dpfast/embed_kernels.py) against the
paths the fused engine runs today, on one GPU, float64, se_e2_a's 1 -> 25 -> 50 -> 100 net:

* ``eager``: analytic_nets.embed_with_tangent + the contraction (G and dG/ds in memory);
* ``inductor``: the same function under torch.compile (Inductor), as fused's compiled step has it;
* ``kernel``: embed_contract / env_cotangent (G never written), for several tile shapes;
* ``eager-train`` / ``kernel-train``: forward and the gradients of R~ and every weight (torch's
  autograd of the eager path vs dpfast::embed_contract's two VJP kernels); both columns time the
  same thing, and "rel_err_*" compares dE/dR~.
* ``vjp`` (the training step's backward kernels alone, as its CUDA graph runs them, at the engine's
  default split): us_fwd the weights' VJP of embed_contract (kernel, partials and their fixed-order
  sum: embed_autograd.weight_vjp), us_cot the VJP of env_cotangent (cotangent_autograd.cotangent_vjp,
  the force loss's backward); ``vjp-reduce``: the partials' sum alone, at that launch's size. Their
  correctness is tests/engines/test_embed_autograd.py's and test_cotangent_autograd.py's (float64,
  1e-12 against torch's autograd); here "partials_bytes" is what each VJP writes and reads back.
  ``vjp-r32-w8``, ``vjp-r16-w4-halves``, ``vjp-r16-w8-halves``: the weight VJP
  alone (both columns) at a wider tile or with its last layer by column halves (VJP_TILES).

Every path is timed twice: launch by launch (``us_fwd``, ``us_cot``) and replayed as one CUDA
graph (``us_fwd_graph``, ``us_cot_graph``: the GPU's own time, as fused's captured step sees it).

Water's four descriptor blocks (O-O 46, O-H 92, H-O 46, H-H 92 neighbour slots; 64 O and 128 H
per 192 atoms) at 192 and 1,536 atoms. Per path: microseconds per call (median of CUDA-event
timings after warm-up), achieved FP64 FLOP/s (the nets' GEMM work, value and tangent), the
minimum bytes a call must move, and the worst relative difference to eager.

Usage (GPU machine):  python tools/bench_embed_kernels.py --out $OUT/embed_kernels.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engines"))
sys.path.insert(0, str(REPO))

from dpfast import analytic_nets, embed_autograd, embed_kernels  # noqa: E402

WIDTHS = (25, 50, 100)
# (centre atoms per 192, neighbour slots) of water's blocks (type_one_side false: one net each)
BLOCKS = ((64, 46), (64, 92), (128, 46), (128, 92))
# weight-VJP launches (rows, warps, last layer by halves) timed beside the launch table's 16 x 8:
# each fits sm_90 (tools/kernel_resources.py): 32 rows 192 KiB shared, 376-576 B of stack; halves
# 77,824 B, so two 4-warp programs share an SM
VJP_TILES = ((32, 8, False), (16, 4, True), (16, 8, True))  # 16 warps cannot launch (255 regs)


def _net(gen):
    n = (1,) + WIDTHS
    return [SimpleNamespace(matrix=(torch.randn(n[i], n[i + 1], generator=gen, dtype=torch.float64) / n[i] ** 0.5).cuda(),
                            bias=torch.randn(n[i + 1], generator=gen, dtype=torch.float64).cuda(),
                            idt=(0.1 + torch.rand(n[i + 1], generator=gen, dtype=torch.float64)).cuda(),
                            activate_name="tanh", resnet=True, prec=torch.float64) for i in range(3)]


def _eager_fwd(rr, layers):
    G, _ = analytic_nets.embed_with_tangent(rr[..., :1], layers)
    return torch.matmul(rr.transpose(-1, -2), G)


def _eager_cot(rr, layers, gx):
    G, dG = analytic_nets.embed_with_tangent(rr[..., :1], layers)
    return analytic_nets.env_cotangent(rr, G, dG, gx)


def _time_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def _graph_us(fn, reps: int) -> float:
    """Median microseconds of ``fn`` replayed as one CUDA graph: the GPU's time alone, as fused's
    captured training step runs it (the launch-by-launch timing above also holds the host's
    launch and dispatch gaps, which make the training paths look flat in size)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn()
        return _time_us(g.replay, reps)
    finally:
        g.reset()  # its private memory pool back before the next row


def _measure(row: dict, f, c, reps: int, ref=None) -> dict:
    """Fill ``row`` with one (value, cotangent) pair's first-call seconds, its relative errors
    against ``ref`` (a (value, cotangent) pair, when given), median CUDA-event times launch by
    launch (us_*) and replayed as a CUDA graph (us_*_graph; graph_error where a path cannot be
    captured); a pair that fails (a tile shape that does not compile) is a row that says so."""
    _timed(row, f, c, reps, ref)
    if "error" not in row:
        try:
            row["us_fwd_graph"] = _graph_us(f, reps)
            row["us_cot_graph"] = _graph_us(c, reps)
        except Exception as e:
            row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def _timed(row: dict, f, c, reps: int, ref) -> None:
    try:
        t0 = time.perf_counter()
        out_f, out_c = f(), c()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        if ref is not None:
            rf, rc = ref
            row["rel_err_fwd"] = float((out_f - rf).abs().max() / rf.abs().max())
            row["rel_err_cot"] = float((out_c - rc).abs().max() / rc.abs().max())
        row["us_fwd"] = _time_us(f, reps)
        row["us_cot"] = _time_us(c, reps)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"


def _flops(rows: int) -> float:
    """GEMM FLOPs of value + tangent through the three layers and the contraction."""
    n1, n2, n3 = WIDTHS
    return rows * (2 * 2 * n1 + 2 * 2 * (n1 * n2 + n2 * n3) + 2 * 4 * n3)


def _vjp_rows(rep: int, A: int, S: int, rr, gx, layers, reps: int) -> list[dict]:
    """The backward kernels of a training step alone (``vjp``, ``vjp-reduce``): see the module's doc."""
    from dpfast import cotangent_autograd

    net = embed_kernels.pack_net(layers)
    ob = torch.randn(A, S, 4, dtype=torch.float64, device=rr.device)

    def split(rows=None, warps=None):  # (programs, partials) of a weight-VJP launch at this tile
        meta = embed_kernels._meta(net, S, rr.device, rows, warps, kind="vjp")
        programs = embed_autograd.vjp_split(A, S, meta["BS"])[0]
        return programs, embed_autograd.partials_buffer(net, programs, rr.device).normal_()

    programs, parts = split()
    paths = [("vjp", lambda: embed_autograd.weight_vjp(rr, net, gx),
              lambda: cotangent_autograd.cotangent_vjp(rr, net, gx, ob), programs, parts),
             ("vjp-reduce", lambda: embed_autograd.reduce_partials(parts, net),
              lambda: embed_autograd.reduce_partials(parts, net), programs, parts)]
    for rows, warps, halves in VJP_TILES:  # the weight VJP alone (DPH_FUSED_VJP_ROWS / _WARPS / _HALVES)
        f = lambda r=rows, w=warps, h=halves: embed_autograd.weight_vjp(rr, net, gx, rows=r, warps=w,  # noqa: E731
                                                                        halves=h)
        paths.append((f"vjp-r{rows}-w{warps}" + ("-halves" if halves else ""), f, f, *split(rows, warps)))
    out = []
    for name, f, c, programs, parts in paths:
        row = {"atoms_x192": rep, "block_atoms": A, "slots": S, "path": name, "programs": programs,
               "partials_bytes": parts.numel() * 8}
        out.append(_measure(row, f, c, reps))
        print(json.dumps(row), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--replicate", default="1,8", help="multiples of 192 atoms")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_embed_kernels: no CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    compiled_fwd = torch.compile(_eager_fwd, dynamic=False)
    compiled_cot = torch.compile(_eager_cot, dynamic=False)
    for rep in (int(x) for x in args.replicate.split(",")):
        for na, S in BLOCKS:
            A = na * rep
            layers = _net(gen)
            net = embed_kernels.pack_net(layers)
            rr = (torch.randn(A, S, 4, generator=gen, dtype=torch.float64) * 0.3).cuda()
            gx = torch.randn(A, 4, WIDTHS[-1], generator=gen, dtype=torch.float64).cuda()
            ref_f, ref_c = _eager_fwd(rr, layers), _eager_cot(rr, layers, gx)
            paths = {"eager": (lambda: _eager_fwd(rr, layers), lambda: _eager_cot(rr, layers, gx))}
            if S == max(s for _, s in BLOCKS):  # Inductor compiles every shape anew: the larger blocks only
                paths["inductor"] = (lambda: compiled_fwd(rr, layers), lambda: compiled_cot(rr, layers, gx))
            for tile, warps in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 8)):  # rows per register tile, warps
                paths[f"kernel-r{tile}-w{warps}"] = (
                    lambda t=tile, w=warps: embed_kernels.embed_contract(rr, net, rows=t, warps=w),
                    lambda t=tile, w=warps: embed_kernels.env_cotangent(rr, net, gx, rows=t, warps=w))
            # training's backward of the contraction (value + gradients of R~ and every weight):
            # torch autograd of the eager path vs the op's two VJP kernels
            lw = [SimpleNamespace(**{**vars(l), **{k: getattr(l, k).detach().clone().requires_grad_()
                                                   for k in ("matrix", "bias", "idt")}}) for l in layers]
            rg = rr.detach().requires_grad_()
            prm = [rg] + [x for l in lw for x in (l.matrix, l.bias, l.idt)]
            def train_eager():
                return torch.autograd.grad((_eager_fwd(rg, lw) * gx).sum(), prm)[0]

            def train_kernel():
                return torch.autograd.grad((embed_autograd.embed_contract(rg, lw) * gx).sum(), prm)[0]

            def train_kernel_at(atoms, slots):  # the VJP kernels' split (embed_autograd.vjp_split)
                def f():
                    old = embed_autograd.ATOMS_PER_PROGRAM, embed_autograd.SLOTS_PER_PROGRAM
                    embed_autograd.ATOMS_PER_PROGRAM, embed_autograd.SLOTS_PER_PROGRAM = atoms, slots
                    try:
                        return train_kernel()
                    finally:
                        embed_autograd.ATOMS_PER_PROGRAM, embed_autograd.SLOTS_PER_PROGRAM = old
                return f

            paths["eager-train"] = (train_eager, train_eager)
            paths["kernel-train"] = (train_kernel, train_kernel)
            for atoms, slots in ((1, 0), (2, 0), (1, 32), (1, 16)):  # slots 0: all of an atom's
                name = f"kernel-train-a{atoms}" + (f"-s{slots}" if slots else "")
                paths[name] = (train_kernel_at(atoms, slots), train_kernel_at(atoms, slots))
            ref_train = train_eager()
            for name, (f, c) in paths.items():
                rf, rc = (ref_train, ref_train) if "-train" in name else (ref_f, ref_c)  # kernel-train-a1 too
                row = {"atoms_x192": rep, "block_atoms": A, "slots": S, "path": name}
                if "error" not in _measure(row, f, c, args.reps, ref=(rf, rc)):
                    fl = _flops(A * S)
                    row["gflops_fwd"] = fl / row["us_fwd"] / 1e3
                    row["gflops_cot"] = (fl + A * S * 2 * 4 * WIDTHS[-1]) / row["us_cot"] / 1e3
                    # the least a call moves: R~ in, xyz out (fwd); R~ and gx in, dE/dR~ out (cot)
                    row["min_bytes_fwd"] = A * (S * 4 + 4 * WIDTHS[-1]) * 8
                    row["min_bytes_cot"] = A * (2 * S * 4 + 4 * WIDTHS[-1]) * 8
                rows_out.append(row)
                print(json.dumps(row), flush=True)
            rows_out.extend(_vjp_rows(rep, A, S, rr, gx, layers, args.reps))
            # after every block, so a run cut by its time limit still leaves the blocks it finished
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "widths": WIDTHS, "rows": rows_out}, indent=1))
            tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
