"""The Triton embedding kernels (engines/dpfast/embed_kernels.py, issue 39's first slice) against
the Inductor path's own analytic_nets, in float64: the contraction xyz = R~^T G(s) and the
cotangent dE/dR~ with G and dG/ds recomputed on chip. On a CPU machine the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set here before they are defined); on a GPU they are compiled.
Bound: 1e-12 of the largest reference entry (the kernels sum in another order than cuBLAS/numpy;
measured ~3e-16)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from _upstream_fixtures import build_trainer, case_config, data, torch  # noqa: F401  (data is a fixture)

BOUND = 1e-12


@pytest.fixture(scope="module")
def ek():
    """The kernel module: under Triton's interpreter when there is no GPU (tests/conftest.py sets
    TRITON_INTERPRET=1 before any kernel is defined), compiled on a GPU."""
    pytest.importorskip("triton", reason="Triton is in the dev pins (harness/pins/dev.txt); this venv lacks it")
    from dpfast import embed_kernels

    if not torch.cuda.is_available():
        assert type(embed_kernels._embed_contract_kernel).__name__ == "InterpretedFunction"
    return embed_kernels


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layer(nin, nout, *, resnet=True, idt=True, act="tanh", gen=None):
    f64 = dict(dtype=torch.float64, device=_dev())
    return SimpleNamespace(matrix=(torch.randn(nin, nout, generator=gen, dtype=torch.float64) / nin ** 0.5).to(_dev()),
                           bias=torch.randn(nout, generator=gen, dtype=torch.float64).to(_dev()),
                           idt=(0.1 + torch.rand(nout, generator=gen, dtype=torch.float64)).to(**f64) if idt else None,
                           activate_name=act, resnet=resnet, prec=torch.float64)


def _reference(rr, layers, gx=None):
    from dpfast import analytic_nets

    G, dG = analytic_nets.embed_with_tangent(rr[..., :1], layers)
    if gx is None:
        return torch.matmul(rr.transpose(-1, -2), G)
    return analytic_nets.env_cotangent(rr, G, dG, gx)


def _close(out, ref):
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= BOUND * max(scale, 1e-300), f"max |kernel - reference| {err:.3g} of {scale:.3g}"


NETS = {
    # se_e2_a's default: 1 -> 25 -> 50 -> 100, concat skips, resnet_dt
    "25-50-100": ((25, 50, 100), dict()),
    "no-idt": ((25, 50, 100), dict(idt=False)),
    # identity skips (equal widths), odd widths padded to 16/32
    "10-10-10": ((10, 10, 10), dict()),
    "no-resnet": ((8, 24, 40), dict(resnet=False)),
}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("A,S", [(5, 46), (3, 92), (2, 13), (1, 1), (4, 33)])
def test_kernels_match_the_analytic_path(ek, name, A, S):
    """Odd neighbour counts (tile remainders: 33 = 32 + 1, 13 < one tile), one atom, one row."""
    gen = torch.Generator().manual_seed(A * 1000 + S)
    widths, kw = NETS[name]
    n = (1,) + widths
    layers = [_layer(n[i], n[i + 1], gen=gen, **kw) for i in range(3)]
    net = ek.pack_net(layers)
    rr = torch.randn(A, S, 4, generator=gen, dtype=torch.float64).to(_dev())
    _close(ek.embed_contract(rr, net), _reference(rr, layers))
    gx = torch.randn(A, 4, widths[-1], generator=gen, dtype=torch.float64).to(_dev())
    _close(ek.env_cotangent(rr, net, gx), _reference(rr, layers, gx))


def test_a_linear_layer_and_leading_dims(ek):
    gen = torch.Generator().manual_seed(7)
    layers = [_layer(1, 16, gen=gen), _layer(16, 32, gen=gen, act="linear"), _layer(32, 64, gen=gen)]
    net = ek.pack_net(layers)
    rr = torch.randn(2, 3, 20, 4, generator=gen, dtype=torch.float64).to(_dev())  # frames x atoms x rows
    out = ek.embed_contract(rr, net)
    assert out.shape == (2, 3, 4, 64)
    _close(out, _reference(rr, layers))
    assert ek.embed_contract(rr[:0], net).shape == (0, 3, 4, 64)


@pytest.mark.parametrize("case", ["water-tos-false", "water-tos-true"])
def test_upstreams_own_nets_and_padding_rows(ek, case, data, tmp_path):
    """Every embedding net of a model upstream built, on R~ rows of which the last ones are
    upstream's padding (a slot without a neighbour: R~ = -davg/dstd, not zero)."""
    tr = build_trainer(case_config(case, data), tmp_path)
    sea = tr.model.atomic_model.descriptor.sea
    gen = torch.Generator().manual_seed(3)
    pad = (-sea.mean / sea.stddev)[0]  # [nnei, 4] of centre type 0
    for k, emb in enumerate(sea.filter_layers.networks):
        layers = list(emb.layers)
        assert ek.unsupported(layers) is None
        net = ek.pack_net(layers)
        S = int(sea.sel[k % len(sea.sel)])
        rr = torch.randn(6, S, 4, generator=gen, dtype=torch.float64).to(_dev()) * 0.3
        rr[:, S // 2:] = pad[: S - S // 2].to(rr)  # the second half of every atom's slots is padding
        rr = rr.to(layers[0].matrix.device)
        _close(ek.embed_contract(rr, net), _reference(rr, layers))
        gx = torch.randn(6, 4, net.widths[-1], generator=gen, dtype=torch.float64).to(rr.device)
        _close(ek.env_cotangent(rr, net, gx), _reference(rr, layers, gx))


def test_nets_outside_the_kernels_are_named(ek):
    gen = torch.Generator().manual_seed(1)
    two = [_layer(1, 25, gen=gen), _layer(25, 50, gen=gen)]
    assert "2 embedding layers" in ek.unsupported(two)
    f32 = [_layer(1, 25, gen=gen), _layer(25, 50, gen=gen), _layer(50, 100, gen=gen)]
    f32[1].matrix = f32[1].matrix.float()
    assert "precision torch.float32" in ek.unsupported(f32)
    with pytest.raises(ValueError, match="embed_kernels: 2 embedding layers"):
        ek.pack_net(two)


def test_a_broken_tangent_is_caught(ek, monkeypatch):
    """The cotangent check can fail: a kernel net whose tangent drops the first layer's idt
    (a plausible bug) is more than the bound away from the reference."""
    gen = torch.Generator().manual_seed(5)
    layers = [_layer(1, 25, gen=gen), _layer(25, 50, gen=gen), _layer(50, 100, gen=gen)]
    net = ek.pack_net(layers)
    rr = torch.randn(3, 46, 4, generator=gen, dtype=torch.float64).to(_dev())
    gx = torch.randn(3, 4, 100, generator=gen, dtype=torch.float64).to(_dev())
    broken = ek.PackedNet(**{**net.__dict__, "i0": torch.ones_like(net.i0)})
    with pytest.raises(AssertionError, match="max \\|kernel - reference\\|"):
        _close(ek.env_cotangent(rr, broken, gx), _reference(rr, layers, gx))
