"""The per-stage precision budget without running parity: one row per stage in order, the gate's
parity numbers carried through, the TF32 stage not measured off CUDA (said so, not faked), the
table and the record; a missing checkpoint is one line, exit 2, nothing written."""
from __future__ import annotations

import json

from harness.cli.main import main
from harness.judge import precision_budget as pb


def fake_parity(seen):
    def parity(system, variant, checkpoint, device):
        seen.append((system, variant, device))
        err = {"fused-desc32": 5e-7, "fused-fit32": 1e-7, "fused-fp32": 6e-7, "fused-bf16": 5e-2}[variant]
        cls, tol = ("mixed", 1e-3) if variant == "fused-bf16" else ("float32", 1e-5)
        verdict = "pass" if err <= tol else "fail"
        return {"verdict": verdict, "detail": "within tolerance" if verdict == "pass" else f"f rel {err:.2e} > {tol:g}",
                "parity": {"class": cls, "tolerance": tol, "max_rel_f": err, "max_rel_e": err / 10}}
    return parity


def test_every_stage_is_measured_where_it_can_be(tmp_path):
    seen = []
    b = pb.measure("water", tmp_path / "c.pt", "cpu", "cpu", fake_parity(seen))
    assert [r.variant for r in b.rows] == ["fused-desc32", "fused-fit32", "fused-fp32", "fused-desc-tf32",
                                           "fused-fit-tf32", "fused-mixed", "fused-bf16"]
    assert seen == [("water", v, "cpu") for v in ("fused-desc32", "fused-fit32", "fused-fp32", "fused-bf16")]
    assert b.rows[0].metrics["max_rel_f"] == 5e-7 and b.rows[0].metrics["max_rel_v"] is None
    for r in b.rows[3:6]:  # TF32 exists on CUDA only
        assert r.verdict == "not measured" and "cuda" in r.detail and not r.metrics
    assert b.rows[6].verdict == "fail" and b.rows[6].accuracy_class == "mixed"
    text = pb.table(b)
    assert "5.00e-07" in text and "not measured: needs cuda" in text and "mixed): f rel 5.00e-02 > 0.001" in text
    assert json.loads(json.dumps(pb.to_dict(b)))["schema"] == pb.SCHEMA


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["precision-budget", "--device", "cpu", "--checkpoint", str(tmp_path / "no.pt"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and not out.exists()


def test_a_users_system_directory_reaches_the_parity_checks(tmp_path, tiny_system, monkeypatch):
    """--system may be a path (a user's data): the parity checks must load that path, the record
    names the system (found by the GPU script's first CPU run, which failed on 'unknown system')."""
    from harness.cli import calibrate

    seen = []
    monkeypatch.setattr(calibrate, "parity_check", fake_parity(seen))
    (tmp_path / "c.pt").write_bytes(b"")
    out = tmp_path / "b.json"
    assert main(["precision-budget", "--system", str(tiny_system), "--device", "cpu",
                 "--checkpoint", str(tmp_path / "c.pt"), "--out", str(out)]) == 0
    assert {s for s, _, _ in seen} == {str(tiny_system)}
    assert json.loads(out.read_text())["system"] == "tinywater"
