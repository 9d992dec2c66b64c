"""The report's Precision budget section (harness/report/precision.py): each budget record beside
the runs is a table of its stages' errors, tolerance and verdict (a failing row says why), linked
from the contents; a file that is not a record is skipped with a warning; no records, no section."""
from __future__ import annotations

import json

from harness.judge import precision_budget as pb
from harness.report import render as report
from tests._fixtures_report import run_record, write_runs


def _budget(device: str):
    def parity(system, variant, checkpoint, dev, emulate_tf32=False):
        err = 3.0e-3 if variant == "fused-mixed" else 2.5e-4 if "tf32" in variant else 6.0e-7
        cls, tol = ("float32", 1e-5) if err < 1e-5 else ("mixed", 1e-3)
        ok = err <= tol and variant != "fused-bf16"
        return {"verdict": "pass" if ok else "fail", "detail": "within tolerance" if ok else f"v rel {err:.2e} > {tol:g}",
                "parity": {"class": cls, "tolerance": tol, "max_rel_f": err / 3, "max_rel_v": err}}
    return pb.to_dict(pb.measure("copper", "ckpt.pt", device, "NVIDIA H100" if device == "cuda" else "cpu", parity))


def test_each_budget_is_a_table_with_its_verdicts(tmp_path, capsys):
    write_runs(tmp_path / "runs", [run_record("20260202T000000Z-bbb", "copper", "baseline", 0.1, 0.01)])
    (tmp_path / "precision").mkdir()
    for dev in ("cpu", "cuda"):
        (tmp_path / "precision" / f"copper-{dev}.json").write_text(json.dumps(_budget(dev)))
    (tmp_path / "precision" / "notes.json").write_text('{"schema": "something else"}')
    text = report.write_report(tmp_path / "runs", tmp_path / "report" / "index.html").read_text()
    assert 'href="#precision"' in text and 'id="precision"' in text
    assert "copper — cpu (cpu), checkpoint ckpt.pt" in text and "copper — NVIDIA H100 (cuda)" in text
    assert "TF32 GEMMs [TF32 emulated]" in text  # the CPU record's TF32 rows say how they were measured
    assert "3.00e-03" in text and "fail: v rel 3.00e-03 &gt; 0.001" in text and "0.001 (mixed)" in text
    assert "fused-tf32-nets" in text
    assert "notes.json: not a dpharness.precision-budget/1 record" in capsys.readouterr().err


def test_no_budget_records_no_section(tmp_path):
    write_runs(tmp_path / "runs", [run_record("20260202T000000Z-bbb", "copper", "baseline", 0.1, 0.01)])
    text = report.write_report(tmp_path / "runs", tmp_path / "index.html").read_text()
    assert 'id="precision"' not in text and 'href="#precision"' not in text
