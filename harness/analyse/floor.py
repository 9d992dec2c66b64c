"""This card's hardware floor for one training step of se_e2_a (`dpharness floor`, issue #22).

The model: a step is its GEMMs, each run at the rate this card reaches on that very shape, plus one
launch/graph-node cost per kernel when the kernel count of a profiled run is known:

    floor_ms = sum_g count_g * flops_g / rate(m_g, k_g, n_g) + node_cost * kernels_per_step

GEMMs of one step (batch frames x nloc atoms):
  embedding nets (type_one_side false: one net per (centre type, neighbour type)): rows nloc_i*sel_j,
    layers 1->n1->n2->n3; descriptor contraction per atom G^T R (n3 x sum(sel) x 4) and
    (G^T R)(R^T G<) (n3 x 4 x axis); fitting net per type: rows nloc_i, n3*axis -> f1 -> ... -> 1.
  Factor model, per forward GEMM y = x W (m x k times k x n): forward (m,k,n); the force pass
    (dE/dx, the tangent the forces need) (m,n,k); the loss backward through both, i.e. weight and
    input grads of the forward GEMM (k,m,n) + (m,n,k) and of the force GEMM (n,m,k) + (m,k,n).
    Six GEMMs of equal FLOPs per forward GEMM.
Ignored: element-wise work (tanh, its derivatives, environment matrix, neighbour list), memory
traffic of activations (bandwidth is measured and reported, not added), the optimiser, host work.
So the floor is a lower bound, not a prediction."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import UserError
from harness.core.records import System

PASSES = (("forward", lambda m, k, n: (m, k, n)), ("force", lambda m, k, n: (m, n, k)),
          ("wgrad", lambda m, k, n: (k, m, n)), ("igrad", lambda m, k, n: (m, n, k)),
          ("force_wgrad", lambda m, k, n: (n, m, k)), ("force_igrad", lambda m, k, n: (m, k, n)))


@dataclass(frozen=True)
class Gemm:
    group: str  # embedding | contraction | fitting
    pass_: str  # one of PASSES
    m: int
    k: int
    n: int
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "pass": self.pass_, "m": self.m, "k": self.k, "n": self.n,
                "count": self.count, "flops": self.flops}


@dataclass(frozen=True)
class Shapes:
    nloc_by_type: tuple[int, ...]
    sel: tuple[int, ...]
    embedding: tuple[int, ...]  # layer widths, input 1 included
    axis: int
    fitting: tuple[int, ...]  # input n3*axis ... output 1
    frames: int = 1

    @property
    def embedding_rows(self) -> int:
        return self.frames * sum(self.nloc_by_type) * sum(self.sel)


def _type_counts(system: System) -> tuple[int, ...]:
    """Atoms of each type in one frame, from the first training set's type.raw."""
    ntypes = len(system.type_map)
    for d in system.train:
        f = Path(d) / "type.raw"
        if f.is_file():
            t = np.loadtxt(f, dtype=int, ndmin=1)
            return tuple(int((t == i).sum()) for i in range(ntypes))
    raise UserError(f"system {system.name}: no type.raw in its training data ({system.train[0]})")


def shapes(system: System) -> Shapes:
    """The network's shapes for one training step of `system` (se_e2_a only)."""
    model = system.input.get("model", {})
    desc, fit = model.get("descriptor", {}), model.get("fitting_net", {})
    if desc.get("type") not in ("se_e2_a", "se_a"):
        raise UserError(f"system {system.name}: the floor models se_e2_a only, not descriptor {desc.get('type')!r}")
    if desc.get("type_one_side"):
        raise UserError(f"system {system.name}: the floor models type_one_side false only")
    sel = desc.get("sel")
    if not isinstance(sel, list) or len(sel) != len(system.type_map):
        raise UserError(f"system {system.name}: descriptor.sel must list one count per type, not {sel!r}")
    neuron = tuple(int(x) for x in desc.get("neuron", [25, 50, 100]))
    axis = int(desc.get("axis_neuron", 4))
    fneur = tuple(int(x) for x in fit.get("neuron", [120, 120, 120]))
    batch = system.input.get("training", {}).get("training_data", {}).get("batch_size", 1)
    frames = batch if isinstance(batch, int) and batch > 0 else 1  # "auto": one frame
    return Shapes(nloc_by_type=_type_counts(system), sel=tuple(int(s) for s in sel), embedding=(1, *neuron),
                  axis=axis, fitting=(neuron[-1] * axis, *fneur, 1), frames=frames)


def forward_gemms(s: Shapes) -> list[Gemm]:
    out: list[Gemm] = []
    for ni in s.nloc_by_type:
        for sj in s.sel:
            rows = s.frames * ni * sj
            out += [Gemm("embedding", "forward", rows, a, b) for a, b in zip(s.embedding, s.embedding[1:])]
        rows = s.frames * ni
        out += [Gemm("fitting", "forward", rows, a, b) for a, b in zip(s.fitting, s.fitting[1:])]
    nat, n3 = s.frames * sum(s.nloc_by_type), s.embedding[-1]
    out += [Gemm("contraction", "forward", n3, sum(s.sel), 4, nat), Gemm("contraction", "forward", n3, 4, s.axis, nat)]
    return out


def step_gemms(s: Shapes) -> list[Gemm]:
    """Every GEMM of one training step under the factor model (module docstring)."""
    return [Gemm(g.group, name, *f(g.m, g.k, g.n), g.count) for g in forward_gemms(s) for name, f in PASSES]


def flops_by_group(gemms: list[Gemm]) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in gemms:
        out[g.group] = out.get(g.group, 0.0) + g.flops
    return out


def floor_ms(gemms: list[Gemm], rate: dict[tuple[int, int, int], float], node_cost_s: float | None = None,
             kernels_per_step: float | None = None) -> float:
    """The floor in ms: each GEMM at its measured FLOP/s, plus one node cost per kernel when both known."""
    t = sum(g.flops / rate[(g.m, g.k, g.n)] for g in gemms)
    if node_cost_s is not None and kernels_per_step is not None:
        t += node_cost_s * kernels_per_step
    return 1e3 * t


# ---- measurement ------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device visible to torch")
    return device


def _timer(device: str):
    """fn -> seconds of one call: CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    def time_once(fn) -> float:
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return time_once


def _stats(xs: list[float]) -> dict[str, float]:
    q = np.percentile(xs, [25, 50, 75])
    return {"median": float(q[1]), "iqr": float(q[2] - q[0]), "n": len(xs)}


def measure_gemm(m: int, k: int, n: int, device: str, dtype, repeats: int) -> dict[str, float]:
    """Achieved FLOP/s of torch.matmul on (m x k)(k x n): median over `repeats`, each call timed."""
    import torch

    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    fn = lambda: torch.matmul(a, b)  # noqa: E731
    timer = _timer(device)
    # tiny GEMMs: time a batch of calls, so one timed sample is well above the clock's resolution
    target = 2e8 if device == "cuda" else 2e7
    inner = max(1, min(50, int(target / max(2.0 * m * k * n, 1))))
    loop = lambda: [fn() for _ in range(inner)]  # noqa: E731
    for _ in range(2):
        loop()
    ts = [timer(loop) / inner for _ in range(repeats)]
    st = _stats(ts)
    return {"m": m, "k": k, "n": n, "s_median": st["median"], "s_iqr": st["iqr"],
            "flops_per_s": 2.0 * m * k * n / st["median"]}


def measure_bandwidth(device: str, repeats: int) -> dict[str, float]:
    """Device-to-device copy rate (read + write bytes): 256 MiB on a GPU, 64 MiB on the CPU."""
    import torch

    nbytes = (256 if device == "cuda" else 64) << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = _timer(device)
    dst.copy_(src)
    ts = [timer(lambda: dst.copy_(src)) for _ in range(max(repeats, 2))]
    st = _stats(ts)
    return {"bytes": nbytes, "s_median": st["median"], "bytes_per_s": 2.0 * nbytes / st["median"]}


def measure_node_cost(device: str, repeats: int, nodes: int = 200) -> dict[str, Any]:
    """Seconds per node of a replayed CUDA graph of `nodes` tiny kernels; None on the CPU."""
    import torch

    if device != "cuda":
        return {"s_per_node": None, "reason": "no CUDA graphs on the CPU"}
    x = torch.zeros(1, device=device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.add_(1.0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(nodes):
            x.add_(1.0)
    g.replay()
    ts = [_timer(device)(g.replay) for _ in range(max(repeats, 3))]
    st = _stats(ts)
    return {"s_per_node": st["median"] / nodes, "nodes": nodes, "s_median": st["median"], "reason": None}


def torch_dtype(name: str):
    import torch

    dtype = {"float64": torch.float64, "float32": torch.float32}.get(name)
    if dtype is None:
        raise UserError(f"dtype must be float64 or float32, not {name!r}")
    return dtype


def measure(device: str, dtype_name: str, repeats: int, gemms: list[Gemm]) -> dict[str, Any]:
    """Rates for every distinct shape of `gemms`, the bandwidth and the graph-node cost."""
    dtype = torch_dtype(dtype_name)
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, not {repeats}")
    distinct = list(dict.fromkeys((g.m, g.k, g.n) for g in gemms))
    rates = [measure_gemm(m, k, n, device, dtype, repeats) for m, k, n in distinct]
    return {"gemm_rates": rates, "bandwidth": measure_bandwidth(device, repeats),
            "graph_node": measure_node_cost(device, repeats)}


def rate_table(gemm_rates: list[dict[str, float]]) -> dict[tuple[int, int, int], float]:
    return {(int(r["m"]), int(r["k"]), int(r["n"])): float(r["flops_per_s"]) for r in gemm_rates}

