"""The gate on frames too large for upstream: when upstream's own dp test (or the baseline's
parity reference, also unpatched upstream) runs out of memory, the run is "not judged" with the
reason, never a fail that blames the variant nor a pass; any other crash stays a fail."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from harness.judge import gate, parity, processes

OOM_LOG = ("Traceback (most recent call last):\n  File \"deepmd/dpmodel/utils/nlist.py\", line 211\n"
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 911.25 GiB. GPU 0 has a total "
           "capacity of 139.81 GiB\n")


def _exited(tmp_path: Path, text: str, rc: int = 1) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "child.log"
    log.write_text(text)
    proc = processes.track(subprocess.Popen([sys.executable, "-c", f"raise SystemExit({rc})"]))
    return proc, log


def test_dp_test_out_of_memory_is_upstreams_limit(tmp_path):
    with pytest.raises(processes.UpstreamOutOfMemory, match="911.25 GiB"):
        processes.finish_dp_test(*_exited(tmp_path, OOM_LOG), frames=0)
    # upstream's AutoBatchSize giving up at one frame says it with hyphens
    with pytest.raises(processes.UpstreamOutOfMemory):
        processes.finish_dp_test(*_exited(tmp_path, "RuntimeError: The callable still throws an "
                                                    "out-of-memory (OOM) error even when batch size is 1!"), 0)
    with pytest.raises(RuntimeError) as e:
        processes.finish_dp_test(*_exited(tmp_path, "ValueError: bad input\n"), frames=0)
    assert not isinstance(e.value, processes.UpstreamOutOfMemory)


def test_parity_reference_oom_is_upstreams_only_for_the_reference(tmp_path):
    out = tmp_path / "ref.npz"
    with pytest.raises(processes.UpstreamOutOfMemory):
        parity.finish_parity_eval(*_exited(tmp_path, OOM_LOG), out, upstream=True)
    # the variant's own child running out of memory is the variant's failure
    with pytest.raises(RuntimeError) as e:
        parity.finish_parity_eval(*_exited(tmp_path, OOM_LOG), out)
    assert not isinstance(e.value, processes.UpstreamOutOfMemory)


def _fused_record(tmp_path: Path):
    v = NS(name="fused", backend="pt", accuracy_class="float64", tree=tmp_path, modules=(), env={},
           upstream_only=False)
    run = NS(variant=v, system=NS(name="water-4x4x4", atoms_per_frame=12288, validation=(tmp_path,),
                                  train=(tmp_path,)),
             seed=1, steps=200, sweep_id="s", gpus=1, device="cuda")
    tr = NS(status="ok", checkpoint=tmp_path / "model.pt", work_dir=tmp_path, input_path=tmp_path / "input.json")
    return NS(run=run, train=tr, accuracy=None)


@pytest.mark.parametrize("strict", [False, True])
def test_gate_says_not_judged_when_upstream_cannot_evaluate(monkeypatch, tmp_path, strict):
    monkeypatch.setattr(gate, "baseline_tree", lambda prev=None: tmp_path)
    monkeypatch.setattr(gate, "start_dp_test", lambda *a, **k: (None, None))

    def oom(*a, **k):
        raise processes.UpstreamOutOfMemory("upstream's dp test ran out of memory (exit 1): CUDA out of memory")

    monkeypatch.setattr(gate, "finish_dp_test", oom)
    acc = gate.stage(strict=strict)(_fused_record(tmp_path), [])  # the sweep's baseline failed: none
    assert acc.verdict == ("fail" if strict else None)
    assert acc.detail.startswith("not judged: upstream cannot evaluate 12288-atom frames on this cuda device")
    assert "CUDA out of memory" in acc.detail

    def crash(*a, **k):
        raise RuntimeError("dp test exit 1: ValueError: bad input")

    monkeypatch.setattr(gate, "finish_dp_test", crash)
    acc = gate.stage(strict=strict)(_fused_record(tmp_path), [])
    assert acc.verdict == "fail" and acc.detail.startswith("accuracy gate error")
