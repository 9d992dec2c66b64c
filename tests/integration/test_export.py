"""harness.results.export: run records as one flat table (CSV / parquet), written atomically; bad input is
one line on stderr and exit 2 with nothing written."""
from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from harness.cli import main as cli
from harness.results import export
from tests._fixtures_report import gpu_profile, run_record, typed, write_runs


def _records():
    prof = run_record("S1", "water", "fused", 0.001, verdict="pass", profile=gpu_profile())
    return [run_record("S1", "water", "baseline", 0.04, verdict="baseline"), prof]


def test_flatten_keeps_figures_and_drops_bulky_lists():
    df = export.flatten(typed(_records()))
    assert len(df) == 2 and list(df.columns[:4]) == ["run_id", "sweep_id", "system", "variant"]
    for c in ("timing.step_s_median", "memory.gpu_peak_bytes", "accuracy.dp_test.rmse_f", "accuracy.verdict",
              "profile.gpu_busy_s_per_step", "profile.categories.by_range.embedding", "environment.torch"):
        assert c in df.columns, c
    assert not [c for c in df.columns if c.startswith("lcurve") or "top_kernels" in c or "ncu.kernels" in c]
    assert "profile" not in df.columns  # null for baseline beside fused's profile.* leaves
    fused = df[df.variant == "fused"].iloc[0]
    assert fused["profile.gpu_busy_s_per_step"] == 0.013
    assert json.loads(fused["variant_chain"]) == ["baseline", "fused"]  # lists as JSON strings
    assert all(not isinstance(x, (list, dict)) for c in df.columns for x in df[c])


def test_flatten_leaves_the_records_whole():
    recs = typed(_records())
    export.flatten(recs)
    assert recs[1].lcurve and recs[1].profile.top_kernels


def test_cli_csv_default_out(tmp_path, monkeypatch):
    write_runs(tmp_path / "runs", _records())
    monkeypatch.setattr(export, "OUT_DIR", tmp_path / "export")
    assert cli.main(["export", "--runs", str(tmp_path / "runs")]) == 0
    df = pd.read_csv(tmp_path / "export" / "runs.csv")
    assert sorted(df.variant) == ["baseline", "fused"]
    assert df.set_index("variant").loc["fused", "timing.step_s_median"] == pytest.approx(0.001)


def test_cli_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    write_runs(tmp_path / "runs", _records())
    out = tmp_path / "t.parquet"
    assert cli.main(["export", "--format", "parquet", "--out", str(out), "--runs", str(tmp_path / "runs")]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 2 and df["accuracy.verdict"].tolist() == ["baseline", "pass"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch, capsys):
    write_runs(tmp_path / "runs", _records())
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    out = tmp_path / "t.parquet"
    assert cli.main(["export", "--format", "parquet", "--out", str(out), "--runs", str(tmp_path / "runs")]) == 2
    assert "pip install pyarrow" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--format", "xlsx"], "unknown export format 'xlsx'"),
    (["--out", "{tmp}/a-file/runs.csv"], "cannot write"),   # parent is a regular file
    (["--runs", "{tmp}/nowhere"], "no run records directory"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, words):
    write_runs(tmp_path / "runs", _records())
    (tmp_path / "a-file").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = ["export", "--out", str(tmp_path / "out.csv"), "--runs", str(tmp_path / "runs")]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    assert words in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no file, no temp file left


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "runs.csv"
    out.write_text("old\n")

    def boom(self, path, **kw):
        open(path, "w").write("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(export.UserError, match="No space left"):
        export.write_table(export.flatten(typed(_records())), out, "csv")
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["runs.csv"]
