"""The force path's kernel as a differentiable torch op (engines/dpfast/cotangent_autograd.py,
issue 39): dpfast::env_cotangent (dE/dR~ with G, dG/ds on chip) and its VJP kernel -- the
gradients of R~, gx and every weight through the net's value-and-tangent pair (tanh'' included)
-- against torch's autograd of analytic_nets.embed_with_tangent + env_cotangent, float64; in
Triton's interpreter on a CPU machine (tests/conftest.py). With embed_contract's VJP this is
all a force loss needs: the fused engine forms forces analytically, so each op is
differentiated once."""
from __future__ import annotations

import pytest

from _upstream_fixtures import build_trainer, case_config, data, torch  # noqa: F401  (data is a fixture)
from test_embed_autograd import BOUND, _dev, _layers, _params, _poison_partials

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ca():
    pytest.importorskip("triton", reason="Triton is in the dev pins (harness/pins/dev.txt); this venv lacks it")
    from dpfast import cotangent_autograd

    return cotangent_autograd


def _reference(rr, layers, gx):
    from dpfast import analytic_nets

    G, dG = analytic_nets.embed_with_tangent(rr[..., :1], layers)
    return analytic_nets.env_cotangent(rr, G, dG, gx)


def _compare(ca, rr, layers, gen):
    ng = layers[-1].matrix.shape[1]
    gx = torch.randn(*rr.shape[:-2], 4, ng, generator=gen, dtype=torch.float64).to(rr.device).requires_grad_()
    ob = torch.randn(*rr.shape, generator=gen, dtype=torch.float64).to(rr.device)
    params = [rr, gx] + _params(layers)
    ref = (_reference(rr, layers, gx) * ob).sum()
    out = (ca.env_cotangent(rr, layers, gx) * ob).sum()
    assert abs(out.item() - ref.item()) <= BOUND * abs(ref.item())
    for a, b in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params)):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= BOUND, f"gradient {tuple(b.shape)}: {err:.3g}"


@pytest.mark.parametrize("widths,kw", [
    ((25, 50, 100), {}),
    ((25, 50, 100), {"idt": False}),
    ((10, 10, 10), {}),
    ((8, 24, 40), {"resnet": False, "acts": ("tanh", "linear", "tanh")}),
])
@pytest.mark.parametrize("A,S", [(11, 37), (1, 1), (8, 92)])
def test_gradients_match_torch_autograd_of_the_analytic_path(ca, widths, kw, A, S):
    gen = torch.Generator().manual_seed(10 * A + S)
    rr = (0.5 * torch.randn(A, S, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare(ca, rr, _layers(widths, gen, **kw), gen)


@pytest.mark.parametrize("atoms,slots", [(1, 16), (3, 32)])
def test_split_launches_give_the_same_gradients(ca, monkeypatch, atoms, slots):
    """embed_autograd.vjp_split over atoms and slot chunks: gx's gradient is summed over the
    chunks that share an atom, R~'s is written by the one chunk that holds the row."""
    from dpfast import embed_autograd

    monkeypatch.setattr(embed_autograd, "ATOMS_PER_PROGRAM", atoms)
    monkeypatch.setattr(embed_autograd, "SLOTS_PER_PROGRAM", slots)
    gen = torch.Generator().manual_seed(atoms * 100 + slots)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare(ca, rr, _layers((25, 50, 100), gen), gen)


def test_every_program_writes_its_whole_partials_row(ca, monkeypatch):
    """As embed_autograd's: the unzeroed partials buffer, NaN-poisoned, gives the same gradients."""
    from dpfast import embed_autograd

    _poison_partials(monkeypatch, embed_autograd, ca)
    monkeypatch.setattr(embed_autograd, "ATOMS_PER_PROGRAM", 3)
    monkeypatch.setattr(embed_autograd, "SLOTS_PER_PROGRAM", 16)
    gen = torch.Generator().manual_seed(7)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare(ca, rr, _layers((25, 50, 100), gen), gen)


def test_gradcheck(ca):
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(12)
    layers = _layers((4, 8, 16), gen)
    rr = (0.5 * torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    gx = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64).to(_dev()).requires_grad_()

    def f(rr, gx, *ps):
        it = iter(ps)
        ls = [SimpleNamespace(matrix=next(it), bias=next(it), idt=next(it), activate_name=l.activate_name,
                              resnet=l.resnet, prec=torch.float64) for l in layers]
        return ca.env_cotangent(rr, ls, gx)

    assert torch.autograd.gradcheck(f, (rr, gx, *_params(layers)), eps=1e-6, atol=1e-9, rtol=1e-7, fast_mode=True)


def test_upstreams_water_net(ca, data, tmp_path):
    tr = build_trainer(case_config("water-tos-false", data), tmp_path)
    sea = tr.model.atomic_model.descriptor.sea
    layers = list(sea.filter_layers.networks[2].layers)
    gen = torch.Generator().manual_seed(14)
    rr = (0.3 * torch.randn(6, int(sea.sel[0]), 4, generator=gen, dtype=torch.float64)).to(layers[0].matrix.device)
    _compare(ca, rr.requires_grad_(), layers, gen)


def test_reproducible_and_one_opaque_op(ca):
    import torch._dynamo

    gen = torch.Generator().manual_seed(16)
    layers = _layers((25, 50, 100), gen)
    rr = (0.5 * torch.randn(9, 46, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    gx = torch.randn(9, 4, 100, generator=gen, dtype=torch.float64).to(_dev()).requires_grad_()
    ob = torch.randn(9, 46, 4, generator=gen, dtype=torch.float64).to(_dev())
    params = [rr, gx] + _params(layers)
    g1 = torch.autograd.grad((ca.env_cotangent(rr, layers, gx) * ob).sum(), params)
    g2 = torch.autograd.grad((ca.env_cotangent(rr, layers, gx) * ob).sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    net = ca.ek.pack_net(layers)

    def f(rr, gx):
        return ca.env_cotangent_op(rr, *ca.ek._weights(net), ca._meta_of(net), gx)

    ex = torch._dynamo.explain(f)(rr.detach(), gx.detach())
    assert ex.graph_count == 1 and ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]


def test_training_skips_the_r_gradient_and_keeps_the_others(ca):
    """Where R~ needs no gradient (a training step: it is data), the VJP kernel is built without
    R~_bar (NEED_RR off): gx's and every weight's gradient are the same bit for bit."""
    gen = torch.Generator().manual_seed(9)
    layers = _layers((25, 50, 100), gen)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev())
    gx = torch.randn(11, 4, 100, generator=gen, dtype=torch.float64).to(_dev()).requires_grad_()
    ob = torch.randn(11, 37, 4, generator=gen, dtype=torch.float64).to(_dev())
    rq = rr.clone().requires_grad_()
    full = torch.autograd.grad((ca.env_cotangent(rq, layers, gx) * ob).sum(), [rq, gx] + _params(layers))
    alone = torch.autograd.grad((ca.env_cotangent(rr, layers, gx) * ob).sum(), [gx] + _params(layers))
    assert full[0].abs().max() > 0  # R~'s gradient is real where it is asked for
    for a, b in zip(alone, full[1:]):
        assert torch.equal(a, b)
