"""Flat parameter / gradient / Adam buffers of the graph and fused engines (engines/dpfast/flat_optim.py).

* parameters (and their .grad) become views of one buffer per dtype; values are kept;
* FlatAdam equals torch.optim.Adam and AdamW (with weight decay) over several steps, float lr and
  float64 device-tensor lr alike, float64 and a mixed float32/float64 model;
* gradients from one autograd call land in the flat buffer (unused parameters: zeros);
* upstream's optimizer describes the flat state (sync_to_torch), survives torch.save/load and a
  restart (load_from_torch) continues the same trajectory;
* data parallel: the all-reduced, divided flat gradient is the mean of the per-rank gradients
  (2 gloo processes).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dpfast import flat_optim  # noqa: E402


def _model(dtype=torch.float64, mixed=False, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))
    m = m.to(dtype)
    if mixed:
        m[2].to(torch.float32)
    return m


def _rel(a, b):
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_parameters_and_grads_are_views_of_one_buffer():
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    flat = flat_optim.FlatParams(m.parameters())
    assert len(flat.buckets) == 1
    base = flat.buckets[0]["flat"].untyped_storage().data_ptr()
    gbase = flat.buckets[0]["grad"].untyped_storage().data_ptr()
    for p, b in zip(m.parameters(), before):
        assert p.untyped_storage().data_ptr() == base and torch.equal(p, b)
        assert p.grad is not None and p.grad.untyped_storage().data_ptr() == gbase
        assert (p.data_ptr() - flat.buckets[0]["flat"].data_ptr()) % flat_optim.ALIGN_BYTES == 0
    opt = flat_optim.FlatAdam(flat, decoupled=False, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert len(opt.state) == 1 and opt.state[0]["exp_avg"].shape == flat.buckets[0]["flat"].shape
    # a mixed model: one bucket per dtype, nothing cast
    mm = _model(mixed=True)
    f2 = flat_optim.FlatParams(mm.parameters())
    assert sorted(str(b["flat"].dtype) for b in f2.buckets) == ["torch.float32", "torch.float64"]
    assert mm[2].weight.dtype == torch.float32


@pytest.mark.parametrize("kind,wd", [("Adam", 0.0), ("Adam", 0.05), ("AdamW", 0.0), ("AdamW", 0.05)])
@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
def test_flat_adam_equals_torch(kind, wd, lr_tensor, mixed):
    ref, mine = _model(mixed=mixed), _model(mixed=mixed)
    cls = torch.optim.Adam if kind == "Adam" else torch.optim.AdamW
    topt = cls(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    flat = flat_optim.FlatParams(mine.parameters())
    lr = torch.tensor(1e-2, dtype=torch.float64) if lr_tensor else 1e-2
    fopt = flat_optim.FlatAdam(flat, decoupled=kind == "AdamW", lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(6):
        lr_s = 1e-2 * 0.7**step
        for g in topt.param_groups:
            g["lr"] = lr_s
        if lr_tensor:
            lr.fill_(lr_s)
        else:
            fopt.param_groups[0]["lr"] = lr_s
        topt.zero_grad(set_to_none=True)
        loss_r = _loss(ref, x, step)
        loss_r.backward()
        topt.step()
        flat.grads_from_loss(_loss(mine, x, step))
        for p, q in zip(mine.parameters(), ref.parameters()):
            assert _rel(p.grad, q.grad) <= (1e-6 if mixed else 1e-13)
        fopt.step()
        for p, q in zip(mine.parameters(), ref.parameters()):
            tol = 1e-6 if mixed else 1e-12  # mixed: float32 layers feed the float64 ones
            assert _rel(p, q) <= tol
    assert float(fopt.step_t) == 6
    for b, st in zip(flat.buckets, fopt.state):  # the alignment gaps stay zero
        used = torch.zeros(b["flat"].numel(), dtype=torch.bool)
        for o, k, _ in b["slices"]:
            used[o : o + k] = True
        for t in (b["flat"], b["grad"], st["exp_avg"], st["exp_avg_sq"]):
            assert float(t.detach()[~used].abs().sum()) == 0
        assert int((~used).sum()) > 0  # (the test models do have gaps)
    d = torch.cat([(p.detach().double() - q.detach().double()).reshape(-1) for p, q in zip(mine.parameters(), ref.parameters())])
    assert float(d.abs().max()) <= (1e-6 if mixed else 1e-13)


def _loss(m, x, step):
    y = x
    for layer in m:
        y = layer(y.to(layer.weight.dtype) if hasattr(layer, "weight") else y)
    return (y.double() ** 2).sum() * (1.0 + 0.1 * step)


def test_unused_parameter_gets_zero_gradient():
    m = _model()
    flat = flat_optim.FlatParams(m.parameters())
    y = m[1](m[0](torch.ones(2, 5, dtype=torch.float64))).sum()  # layers 2 and 3 unused
    flat.grads_from_loss(y)
    assert float(m[2].weight.grad.abs().max()) == 0 and float(m[0].weight.grad.abs().max()) > 0


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_upstream_optimizer_state_roundtrip_and_restart(kind):
    cls = torch.optim.Adam if kind == "Adam" else torch.optim.AdamW
    m = _model()
    upstream = cls(m.parameters(), lr=1e-3, weight_decay=0.01)  # what upstream's Trainer built
    flat = flat_optim.FlatParams(m.parameters())
    fopt = flat_optim.FlatAdam(flat, decoupled=kind == "AdamW", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    x = torch.randn(4, 5, dtype=torch.float64)
    for s in range(3):
        flat.grads_from_loss(_loss(m, x, s))
        fopt.step()
    fopt.sync_to_torch(upstream, lr=5e-4)
    st = upstream.state[next(iter(m.parameters()))]
    assert float(st["step"]) == 3 and st["exp_avg"].untyped_storage().data_ptr() == \
        fopt.state[0]["exp_avg"].untyped_storage().data_ptr()
    steps = [upstream.state[p]["step"] for p in m.parameters()]
    assert len({id(t) for t in steps}) == len(steps)  # torch increments each: no aliasing
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "optimizer": upstream.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    assert ck["optimizer"]["param_groups"][0]["lr"] == 5e-4
    # restart, upstream style: fresh model + upstream optimizer load the checkpoint ...
    m2 = _model(seed=5)
    m2.load_state_dict(ck["model"])
    up2 = cls(m2.parameters(), lr=1e-3, weight_decay=0.01)
    up2.load_state_dict(ck["optimizer"])
    # ... (a) upstream itself continues, (b) the flat optimizer takes the state over and continues
    m3 = _model(seed=6)
    m3.load_state_dict(ck["model"])
    up3 = cls(m3.parameters(), lr=1e-3, weight_decay=0.01)
    up3.load_state_dict(ck["optimizer"])
    f3 = flat_optim.FlatParams(m3.parameters())
    o3 = flat_optim.FlatAdam(f3, decoupled=kind == "AdamW", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    assert o3.load_from_torch(up3) and float(o3.step_t) == 3
    for s in range(3, 5):
        for g in up2.param_groups:
            g["lr"] = 1e-3
        up2.zero_grad()
        _loss(m2, x, s).backward()
        up2.step()
        f3.grads_from_loss(_loss(m3, x, s))
        o3.step()
    for p, q in zip(m3.parameters(), m2.parameters()):
        assert _rel(p, q) <= 1e-12


def _dp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        m = _model()
        flat = flat_optim.FlatParams(m.parameters())
        x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))
        flat.grads_from_loss(_loss(m, x, 0))
        flat.all_reduce_grads()
        flat.divide_grads(world)
        torch.save({"avg": flat.buckets[0]["grad"].clone(), "checksum": flat.checksum()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_data_parallel_gradient_is_mean_of_rank_gradients(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    world = 2
    out = str(tmp_path / "dp")
    mp.spawn(_dp_worker, args=(world, f"file://{tmp_path / 'store'}", out), nprocs=world, join=True)
    per_rank = []
    for r in range(world):
        m = _model()
        flat = flat_optim.FlatParams(m.parameters())
        x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + r))
        flat.grads_from_loss(_loss(m, x, 0))
        per_rank.append(flat.buckets[0]["grad"].clone())
    mean = sum(per_rank) / world
    res = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    for r in res:
        assert torch.allclose(r["avg"], mean, rtol=1e-14, atol=0)
    assert res[0]["checksum"] == res[1]["checksum"]
