"""A bad file under results/runs (truncated, foreign JSON, an older schema without run_id, a
malformed sub-object) never stops a reader: report, ingest, compare and export skip it with ONE
warning line naming the file and why, process the rest and exit 0 (harness.results.runs.iter_runs)."""
from __future__ import annotations

import json

import pytest

from harness.cli import main as cli
from harness.cli import regress
from harness.results import runs as results
from tests._fixtures_report import run_record, write_runs

BAD = {
    "truncated.json": lambda good: json.dumps(good)[:200],
    "foreign.json": lambda good: json.dumps({"name": "some other tool", "version": 3}),
    "old-schema.json": lambda good: json.dumps({k: v for k, v in good.items() if k != "run_id"}),
    "malformed.json": lambda good: json.dumps({**good, "run_id": "x-bad", "timing": [0.1, 0.2]}),
}
WHY = {"truncated.json": "not valid JSON", "foreign.json": "not a dpharness run record",
       "old-schema.json": "no run_id", "malformed.json": "timing not an object"}


@pytest.fixture()
def runs_dir(tmp_path):
    d = tmp_path / "runs"
    good = [run_record("20260101T000000Z-aaa", "water", "baseline", 0.04, created="2026-01-01T00:00:00Z"),
            run_record("20260101T000000Z-aaa", "water", "fused", 0.002, created="2026-01-01T00:00:01Z"),
            run_record("20260202T000000Z-bbb", "water", "baseline", 0.04, created="2026-02-02T00:00:00Z"),
            run_record("20260202T000000Z-bbb", "water", "fused", 0.003, created="2026-02-02T00:00:01Z")]
    write_runs(d, good)
    for name, make in BAD.items():
        (d / name).write_text(make(good[0]))
    return d


def _check_warnings(err: str) -> None:
    """Exactly one warning line per bad file, naming it and why; nothing else warned."""
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(lines) == len(BAD), lines
    for name, why in WHY.items():
        (line,) = [ln for ln in lines if name in ln]
        assert why in line, line


def test_load_runs_skips_each_bad_file_with_one_reason(runs_dir):
    seen = []
    runs = results.load_runs(runs_dir, warn=seen.append)
    assert sorted(r.variant for r in runs) == ["baseline", "baseline", "fused", "fused"]
    _check_warnings("\n".join(f"warning: {m}" for m in seen))


@pytest.mark.parametrize("bad", sorted(BAD))
def test_read_run_names_the_problem(runs_dir, bad):
    with pytest.raises(results.BadRecord, match=WHY[bad]):
        results.read_run(runs_dir / bad)


def test_report_cli(runs_dir, tmp_path, capsys):
    out = tmp_path / "report" / "index.html"
    assert cli.main(["report", "--runs", str(runs_dir), "--out", str(out)]) == 0
    _check_warnings(capsys.readouterr().err)
    text = out.read_text()
    assert "20260202T000000Z-bbb" in text and "x-bad" not in text


def test_ingest_cli(runs_dir, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    assert cli.main(["ingest", "--db", str(db), "--runs", str(runs_dir)]) == 0
    cap = capsys.readouterr()
    _check_warnings(cap.err)
    assert "4 inserted" in cap.out and "4 skipped of 8 files" in cap.out


def test_ingest_cli_named_files(runs_dir, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    assert cli.main(["ingest", "--db", str(db), *map(str, sorted(runs_dir.glob("*.json")))]) == 0
    cap = capsys.readouterr()
    _check_warnings(cap.err)
    assert "4 inserted" in cap.out


def test_compare_cli(runs_dir, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    assert cli.main(["compare", "20260101", "20260202", "--db", str(db), "--runs", str(runs_dir)]) == 0
    cap = capsys.readouterr()
    _check_warnings(cap.err)
    assert "fused" in cap.out and "1.500" in cap.out


def test_export_cli(runs_dir, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    assert cli.main(["export", "--runs", str(runs_dir), "--out", str(out)]) == 0
    _check_warnings(capsys.readouterr().err)
    assert len(out.read_text().splitlines()) == 5  # header + 4 records


@pytest.mark.parametrize("text", ['{"ratios": {"fp32/baseline": 0.7', '["not", "a reference"]'])
def test_regress_bad_reference_is_one_line_exit_2(tmp_path, monkeypatch, capsys, text):
    """regress reads no results/runs record (its sweep runs in a temp dir); its one input file is
    the reference, and a truncated or foreign one is bad input, not a traceback."""
    ref = tmp_path / "ref.json"
    ref.write_text(text)
    monkeypatch.setattr(regress, "run_sweep", lambda *a, **k: pytest.fail("sweep ran on a bad reference"))
    assert cli.main(["regress", "--reference", str(ref)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ref) in err[0] and "--write-reference" in err[0]


def test_every_committed_record_reads_back_typed_and_writes_back_the_same_json():
    """Every schema version under results/runs: typed parts for its objects, and to_dict() is the
    file's JSON again (the store and the export table see the record on disk)."""
    from harness.core.records import Profile, StoredRun, Timing

    paths = results.run_files()
    assert paths
    for p in paths:
        rec = StoredRun.from_json(p)
        assert rec.to_dict() == json.loads(p.read_text()), p
        assert isinstance(rec.timing, Timing) and rec.run_id and rec.path == p
        assert rec.profile is None or isinstance(rec.profile, Profile)


def test_an_old_record_reads_with_defaults_and_keeps_what_it_does_not_know():
    from harness.core.records import StoredRun

    d = {"schema": "dpharness.run/1", "run_id": "r", "sweep_id": "s", "system": "w", "variant": "v",
         "timing": None, "device": {"kind": "cpu"}, "someday": {"x": 1}}
    rec = StoredRun.from_dict(d)
    assert rec.timing.step_s_median is None and rec.world_size is None and rec.accuracy.verdict is None
    assert rec.device.kind == "cpu" and rec.device.name is None and rec.profile is None
    assert rec.to_dict() == d
    rec.accuracy.verdict = "pass"
    assert rec.to_dict()["accuracy"]["verdict"] == "pass" and "someday" in rec.to_dict()
