"""dpfast.stats: upstream's neighbour lists through cell lists (input statistics, validation
forward), on CPU, float64, water and replicated water:

1. the statistics path (deepmd.dpmodel.utils.nlist): extended coords/atypes/mapping and the
   neighbour list bitwise upstream's; descriptor davg/dstd from upstream's compute_input_stats
   equal with and without the patch (<= 1e-12 relative);
2. the forward path (deepmd.pt.utils.nlist): the same neighbours in every type block;
3. memory: the largest tensor an op produces grows linearly with the atoms with the patch,
   quadratically without (the same measure, so the check can fail);
4. trainer.install() rebinds both builders, uninstall() puts upstream's back.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from _upstream_fixtures import np, torch  # noqa: E402  (skips without an upstream tree)

from harness.prepare.workload import replicate_frames

REPO = Path(__file__).resolve().parents[2]
WATER = REPO / "systems" / "water" / "data" / "data_0"
RCUT, RCUT_SMTH, SEL = 6.0, 0.5, [46, 92]


def _water(reps=(1, 1, 1), nframes=2):
    coord = np.load(WATER / "set.000" / "coord.npy")[:nframes].astype(np.float64)
    box = np.load(WATER / "set.000" / "box.npy")[:nframes].astype(np.float64)
    types = np.loadtxt(WATER / "type.raw", dtype=int)
    if reps != (1, 1, 1):
        coord, box = replicate_frames(coord, box, reps)
    n = reps[0] * reps[1] * reps[2]
    atype = np.tile(np.tile(types, n), (coord.shape[0], 1))
    return (torch.tensor(coord).reshape(coord.shape[0], -1, 3), torch.tensor(atype, dtype=torch.int64),
            torch.tensor(box))


@pytest.fixture(autouse=True)
def cells_at_every_size(monkeypatch):
    """The cell path even where the patch leaves small frames to upstream's builder."""
    from dpfast import stats

    monkeypatch.setattr(stats, "DENSE_LIMIT", 0)


@pytest.fixture
def patched():
    from dpfast import stats

    stats.install()
    try:
        yield stats
    finally:
        stats.uninstall()


def _dp_lists(coord, atype, box):
    from deepmd.dpmodel.utils import nlist

    return nlist.extend_input_and_build_neighbor_list(coord, atype, RCUT, SEL, mixed_types=False, box=box)


def _pt_lists(coord, atype, box):
    from deepmd.pt.utils import nlist

    return nlist.extend_input_and_build_neighbor_list(coord, atype, RCUT, SEL, mixed_types=False, box=box)


@pytest.mark.parametrize("reps", [(1, 1, 1), (2, 2, 1)])
def test_statistics_path_list_is_upstreams_bitwise(reps):
    from dpfast import stats

    frames = _water(reps)
    ref = _dp_lists(*frames)
    stats.install()
    try:
        assert stats.installed()
        got = _dp_lists(*frames)
    finally:
        stats.uninstall()
    assert (ref[3] >= 0).sum() > 0.5 * ref[3].numel()  # a real list, not all padding
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
        assert torch.equal(r, g)


def _descriptor():
    from deepmd.pt.model.descriptor.se_a import DescrptSeA

    return DescrptSeA(rcut=RCUT, rcut_smth=RCUT_SMTH, sel=SEL, neuron=[4, 8], axis_neuron=2,
                      precision="float64", seed=1)


def _input_stats(sampled):
    d = _descriptor()
    d.compute_input_stats(sampled)
    return d.sea.mean.clone(), d.sea.stddev.clone()


@pytest.mark.parametrize("reps", [(1, 1, 1), (2, 2, 1)])
def test_descriptor_statistics_equal_upstreams(reps):
    from dpfast import stats

    coord, atype, box = _water(reps, nframes=3)
    sampled = [{"coord": coord, "atype": atype, "box": box}]
    mean0, std0 = _input_stats(sampled)
    stats.install()
    try:
        mean1, std1 = _input_stats(sampled)
    finally:
        stats.uninstall()
    assert float(std0.abs().min()) > 0 and float(mean0.abs().max()) > 0  # computed, not defaults
    for a, b in ((mean0, mean1), (std0, std1)):
        assert float(((a - b).abs() / a.abs().clamp(min=1e-300)).max()) <= 1e-12


@pytest.mark.parametrize("reps", [(1, 1, 1), (2, 1, 1)])
def test_forward_path_same_neighbours(reps, patched):
    frames = _water(reps)
    got = _pt_lists(*frames)
    patched.uninstall()
    ref = _pt_lists(*frames)
    for r, g in zip(ref[:3], got[:3]):
        assert torch.equal(r, g)
    off = 0
    for st in SEL:  # topk's order among exactly equal distances may differ: compare as sets
        rb, gb = ref[3][..., off:off + st], got[3][..., off:off + st]
        assert torch.equal(torch.sort(rb, -1).values, torch.sort(gb, -1).values)
        off += st


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel() * t.element_size())
        return out


def _largest(reps) -> int:
    frames = _water(reps, nframes=1)
    with _LargestTensor() as m:
        _dp_lists(*frames)
    return m.peak


def test_memory_linear_in_atoms_with_the_patch():
    from dpfast import stats

    # the measure sees upstream's all-pairs matrix: 2x the atoms (same images) -> ~4x the bytes
    base1, base2 = _largest((1, 1, 1)), _largest((2, 1, 1))
    assert base2 / base1 > 3.5
    stats.install()
    try:
        p1, p2, p8 = _largest((1, 1, 1)), _largest((2, 1, 1)), _largest((2, 2, 2))
    finally:
        stats.uninstall()
    assert p2 / p1 < 2.5
    assert p8 / p1 < 8 * 1.3
    assert p1 < base1 / 4  # and far below upstream's already at 192 atoms


def test_small_frames_go_to_upstreams_builder(monkeypatch, patched):
    import deepmd.dpmodel.utils.nlist as dp_nlist

    calls = []
    cells = patched.cell_neighbor_list
    monkeypatch.setattr(patched, "cell_neighbor_list", lambda *a, **k: calls.append(1) or cells(*a, **k))
    monkeypatch.setattr(patched, "DENSE_LIMIT", 192 * 192 * 27)  # water 1x1x1: nloc x nall
    _dp_lists(*_water((1, 1, 1), nframes=1))
    assert calls == []  # at the limit: upstream's own
    _dp_lists(*_water((2, 1, 1), nframes=1))
    assert calls == [1]  # above it: cells
    assert dp_nlist.build_neighbor_list is patched.build_neighbor_list_dpmodel


def test_trainer_install_rebinds_and_uninstall_restores():
    """Every replacement of upstream's code goes through harness.core.rebind: listed (target,
    installer, reason) while in place, idempotent, and after uninstall upstream's functions are
    the originals again -- the training loop, the gate's hooks, both list builders, and
    upstream_compile's forward_common_lower and dynamo setting."""
    import deepmd.dpmodel.utils.nlist as dp_nlist
    import deepmd.pt.utils.nlist as pt_nlist
    import torch._dynamo.config as dynamo_config
    from deepmd.pt.train import training

    from dpfast import stats, trainer, upstream_compile

    from harness.child import runtime
    from harness.core import rebind

    targets = [(training.Trainer, "run"), (runtime, "parity_forward"), (runtime, "parity_train_step"),
               (dp_nlist, "build_neighbor_list"), (pt_nlist, "build_neighbor_list"),
               (upstream_compile.TARGET, "forward_common_lower"), (dynamo_config, "optimize_ddp")]
    before = [rebind._own(o, n) for o, n in targets]
    trainer.install("fused")
    try:
        assert dp_nlist.build_neighbor_list is stats.build_neighbor_list_dpmodel
        assert pt_nlist.build_neighbor_list is stats.build_neighbor_list_pt
        once = rebind.replaced()
        trainer.install("fused")  # idempotent: nothing replaced twice, upstream's stays the original
        assert rebind.replaced() == once
        upstream_compile.install()
        listed = rebind.replaced()
        upstream_compile.install()
        assert rebind.replaced() == listed
        assert rebind.original(pt_nlist, "build_neighbor_list") is before[4]
        mine = {(r["by"], r["target"]) for r in listed}
        assert {("dpfast.trainer", "deepmd.pt.train.training.Trainer.run"),
                ("dpfast.stats", "deepmd.pt.utils.nlist.build_neighbor_list"),
                ("dpfast.upstream_compile", f"{upstream_compile.TARGET.__module__}.{upstream_compile.TARGET.__qualname__}.forward_common_lower")
                } <= mine
        assert all(r["why"] for r in listed)
    finally:
        upstream_compile.uninstall()
        trainer.uninstall()
    assert [rebind._own(o, n) for o, n in targets] == before
    assert not stats.installed() and not any(r["by"].startswith("dpfast.") for r in rebind.replaced())
