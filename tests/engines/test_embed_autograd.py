"""The embedding kernel as a differentiable torch op (engines/dpfast/embed_autograd.py, issue 39's
kernel 2): dpfast::embed_contract's VJP -- dE/dR~ by the cotangent kernel, the weights' gradients
by _weight_vjp_kernel with per-program partial sums -- against torch's autograd of the Inductor
path's analytic_nets, float64. On a CPU machine in Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from _upstream_fixtures import build_trainer, case_config, data, torch  # noqa: F401  (data is a fixture)

BOUND = 1e-12


@pytest.fixture(scope="module")
def ea():
    pytest.importorskip("triton", reason="Triton is in the dev pins (harness/pins/dev.txt); this venv lacks it")
    from dpfast import embed_autograd

    return embed_autograd


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layers(widths, gen, *, resnet=True, idt=True, acts=("tanh", "tanh", "tanh")):
    n = (1,) + tuple(widths)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(_dev()).requires_grad_()

    return [SimpleNamespace(matrix=(torch.randn(n[i], n[i + 1], generator=gen, dtype=torch.float64) / n[i] ** 0.5)
                            .to(_dev()).requires_grad_(),
                            bias=t(n[i + 1]), idt=(0.1 + torch.rand(n[i + 1], generator=gen, dtype=torch.float64))
                            .to(_dev()).requires_grad_() if idt else None,
                            activate_name=acts[i], resnet=resnet, prec=torch.float64) for i in range(3)]


def _params(layers):
    return [x for l in layers for x in (l.matrix, l.bias, l.idt) if x is not None]


def _reference(rr, layers):
    from dpfast import analytic_nets

    G, _ = analytic_nets.embed_with_tangent(rr[..., :1], layers)
    return torch.matmul(rr.transpose(-1, -2), G)


def _compare_grads(ea, rr, layers, gen):
    params = [rr] + _params(layers)
    gx = torch.randn(*rr.shape[:-2], 4, layers[-1].matrix.shape[1], generator=gen, dtype=torch.float64).to(rr.device)
    ref = (_reference(rr, layers) * gx).sum()
    out = (ea.embed_contract(rr, layers) * gx).sum()
    assert abs(out.item() - ref.item()) <= BOUND * abs(ref.item())
    for a, b in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params)):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= BOUND, f"gradient {tuple(b.shape)}: {err:.3g}"


@pytest.mark.parametrize("widths,kw", [
    ((25, 50, 100), {}),  # se_e2_a's default, concat skips, idt
    ((25, 50, 100), {"idt": False}),
    ((10, 10, 10), {}),  # identity skips
    ((8, 24, 40), {"resnet": False, "acts": ("tanh", "linear", "tanh")}),
])
@pytest.mark.parametrize("A,S", [(11, 37), (1, 1), (8, 92)])
def test_gradients_match_torch_autograd_of_the_analytic_path(ea, widths, kw, A, S):
    """A = 11: two programs, the second with 3 live atoms of 8; S = 37: a tile and a remainder."""
    gen = torch.Generator().manual_seed(A + S)
    rr = (0.5 * torch.randn(A, S, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare_grads(ea, rr, _layers(widths, gen, **kw), gen)


@pytest.mark.parametrize("atoms,slots", [(1, 16), (3, 32), (2, 1)])
def test_split_launches_give_the_same_gradients(ea, monkeypatch, atoms, slots):
    """vjp_split: fewer atoms and a chunk of slots per program (more programs for a small
    system): A = 11 atoms x S = 37 slots leave a partial atom group and a partial slot chunk;
    slots=1 rounds up to one tile of rows."""
    monkeypatch.setattr(ea, "ATOMS_PER_PROGRAM", atoms)
    monkeypatch.setattr(ea, "SLOTS_PER_PROGRAM", slots)
    programs, per, chunks = ea.vjp_split(11, 37, 16)
    assert per % 16 == 0 and chunks == -(-37 // per) and programs == -(-11 // atoms) * chunks
    gen = torch.Generator().manual_seed(atoms * 100 + slots)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare_grads(ea, rr, _layers((25, 50, 100), gen), gen)


def _poison_partials(monkeypatch, *modules):
    """Partials buffers filled with NaN instead of left as torch.empty gives them: a program that
    did not write its whole row would put NaN into a gradient."""
    from dpfast import embed_autograd

    real = embed_autograd.partials_buffer

    def poisoned(net, programs, device):
        return real(net, programs, device).fill_(float("nan"))

    for m in modules:
        monkeypatch.setattr(m, "partials_buffer", poisoned)


def test_every_program_writes_its_whole_partials_row(ea, monkeypatch):
    """The partials buffer is not zeroed (its memset was the step's largest write): dead atoms of
    the last group (11 atoms, 3 a program) and a short last slot chunk must still write theirs."""
    _poison_partials(monkeypatch, ea)
    monkeypatch.setattr(ea, "ATOMS_PER_PROGRAM", 3)
    monkeypatch.setattr(ea, "SLOTS_PER_PROGRAM", 16)
    gen = torch.Generator().manual_seed(7)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare_grads(ea, rr, _layers((25, 50, 100), gen), gen)


def test_gradcheck(ea):
    gen = torch.Generator().manual_seed(2)
    layers = _layers((4, 8, 16), gen)
    rr = (0.5 * torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    params = _params(layers)

    def f(rr, *ps):
        it = iter(ps)
        ls = [SimpleNamespace(matrix=next(it), bias=next(it), idt=next(it), activate_name=l.activate_name,
                              resnet=l.resnet, prec=torch.float64) for l in layers]
        return ea.embed_contract(rr, ls)

    assert torch.autograd.gradcheck(f, (rr, *params), eps=1e-6, atol=1e-9, rtol=1e-7, fast_mode=True)


def test_upstreams_water_nets_reach_their_parameters(ea, data, tmp_path):
    """The gradient reaches upstream's own nn.Parameters through the padding."""
    tr = build_trainer(case_config("water-tos-false", data), tmp_path)
    sea = tr.model.atomic_model.descriptor.sea
    gen = torch.Generator().manual_seed(4)
    emb = sea.filter_layers.networks[1]
    layers = list(emb.layers)
    dev = layers[0].matrix.device
    rr = (0.3 * torch.randn(5, int(sea.sel[1]), 4, generator=gen, dtype=torch.float64)).to(dev).requires_grad_()
    _compare_grads(ea, rr, layers, gen)
    assert all(isinstance(p, torch.nn.Parameter) for p in _params(layers))


def test_gradients_are_reproducible_and_once_differentiable(ea):
    gen = torch.Generator().manual_seed(6)
    layers = _layers((25, 50, 100), gen)
    rr = (0.5 * torch.randn(19, 46, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    gx = torch.randn(19, 4, 100, generator=gen, dtype=torch.float64).to(_dev())
    params = [rr] + _params(layers)
    g1 = torch.autograd.grad((ea.embed_contract(rr, layers) * gx).sum(), params)
    g2 = torch.autograd.grad((ea.embed_contract(rr, layers) * gx).sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))  # no atomics: bit for bit
    out = (ea.embed_contract(rr, layers) * gx).sum()
    with pytest.raises(RuntimeError, match="no autograd formula"):  # a second derivative is refused, never silently zero
        (g_rr,) = torch.autograd.grad(out, [rr], create_graph=True)
        torch.autograd.grad(g_rr.sum(), _params(layers)[:1])


def test_torch_compile_keeps_the_op_whole(ea):
    """Traced by dynamo as one opaque op (its fake implementation gives the shape): no graph break."""
    import torch._dynamo

    gen = torch.Generator().manual_seed(8)
    layers = _layers((25, 50, 100), gen)
    rr = (0.5 * torch.randn(4, 46, 4, generator=gen, dtype=torch.float64)).to(_dev())
    net = ea.ek.pack_net(layers)

    def f(rr):
        return ea.embed_contract_op(rr, *ea.ek._weights(net), ea._meta_of(net)).sum(-1)

    ex = torch._dynamo.explain(f)(rr)
    assert ex.graph_count == 1 and ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    ops = [str(n.target) for gm in ex.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("embed_contract" in o for o in ops)
    got = torch.compile(f, backend="aot_eager")(rr)
    assert torch.allclose(got, _reference(rr, layers).sum(-1), rtol=BOUND, atol=0)


@pytest.mark.parametrize("rows,warps", [(16, None), (32, 8)])  # each fits sm_90 (test_kernel_resources)
def test_the_weight_vjp_tile_gives_the_same_gradients(ea, monkeypatch, rows, warps):
    """DPH_FUSED_VJP_ROWS / _WARPS (WEIGHT_VJP_ROWS / _WARPS): a wider tile of neighbour rows per
    iteration; 11 atoms x 37 slots in chunks of 16 slots leave a partial tile at every size (the
    chunk is rounded up to the tile). Warps are a GPU launch option (the interpreter has none)."""
    monkeypatch.setattr(ea, "WEIGHT_VJP_ROWS", rows)
    monkeypatch.setattr(ea, "WEIGHT_VJP_WARPS", warps)
    monkeypatch.setattr(ea, "SLOTS_PER_PROGRAM", 16)
    seen = []
    real = ea.ek._meta

    def meta(*a, **k):
        m = real(*a, **k)
        if k.get("kind") == "vjp":
            seen.append(m["BS"])
        return m

    monkeypatch.setattr(ea.ek, "_meta", meta)
    gen = torch.Generator().manual_seed(rows)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare_grads(ea, rr, _layers((25, 50, 100), gen), gen)
    assert seen and set(seen) == {rows}  # every weight-VJP launch ran at this tile


@pytest.mark.parametrize("widths,kw", [
    ((25, 50, 100), {}),  # se_e2_a's default: a concat last layer, halved
    ((8, 24, 40), {"resnet": False, "acts": ("tanh", "linear", "tanh")}),  # no concat: the whole layer
    ((25, 50, 100), {"acts": ("tanh", "tanh", "linear")}),  # a linear last layer, halved
])
def test_the_last_layer_by_halves_gives_the_same_gradients(ea, monkeypatch, widths, kw):
    """DPH_FUSED_VJP_HALVES (WEIGHT_VJP_HALVES): a concat last layer's two column halves, each with
    its weight slice and gx columns, summed into x2's cotangent and stored as one layer's
    gradients; 11 atoms x 37 slots (a partial tile), 1e-12 against torch's autograd."""
    monkeypatch.setattr(ea, "WEIGHT_VJP_HALVES", True)
    seen = []
    real = ea._weight_vjp_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.append(k["HALVES"])
                return real[grid](*a, **k)
            return launch

    monkeypatch.setattr(ea, "_weight_vjp_kernel", Spy())
    gen = torch.Generator().manual_seed(5)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev()).requires_grad_()
    _compare_grads(ea, rr, _layers(widths, gen, **kw), gen)
    assert seen == [widths == (25, 50, 100)]  # halved exactly where the last layer is a concat


def test_training_skips_the_r_gradient_and_keeps_the_weights(ea, monkeypatch):
    """Where R~ needs no gradient (a training step: it is data), the backward runs the weights' VJP
    alone -- no env_cotangent launch -- and gives the same weight gradients as the full VJP."""
    from dpfast import embed_kernels as ek

    gen = torch.Generator().manual_seed(5)
    layers = _layers((25, 50, 100), gen)
    rr = (0.5 * torch.randn(11, 37, 4, generator=gen, dtype=torch.float64)).to(_dev())
    gx = torch.randn(11, 4, 100, generator=gen, dtype=torch.float64).to(_dev())
    full = torch.autograd.grad((ea.embed_contract(rr.clone().requires_grad_(), layers) * gx).sum(), _params(layers))
    calls = []
    real = ek.env_cotangent
    monkeypatch.setattr(ek, "env_cotangent", lambda *a, **k: calls.append(1) or real(*a, **k))
    alone = torch.autograd.grad((ea.embed_contract(rr, layers) * gx).sum(), _params(layers))
    assert not calls  # the cotangent kernel did not run
    for a, b in zip(alone, full):
        assert torch.equal(a, b)
    (ea.embed_contract(rr.clone().requires_grad_(), layers) * gx).sum().backward()
    assert calls  # ... and does where R~ wants its gradient
