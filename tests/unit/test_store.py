"""harness.results.store: transactional idempotent ingest and compare()."""
from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from harness.results import store
from tests._fixtures_report import run_record, typed, write_runs


def _count(db):
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        con.close()


def test_ingest_is_idempotent_and_updates(tmp_path):
    runs, db = tmp_path / "runs", tmp_path / "r.sqlite"
    write_runs(runs, [run_record("S1", "water", "baseline", 0.02), run_record("S1", "water", "fp32", 0.01)])
    (runs / "junk.json").write_text("{not json")
    c1 = store.ingest(db=db, runs_dir=runs)
    assert (c1["inserted"], c1["skipped"]) == (2, 1)
    c2 = store.ingest(db=db, runs_dir=runs)
    assert (c2["inserted"], c2["unchanged"]) == (0, 2)
    write_runs(runs, [run_record("S1", "water", "fp32", 0.012)])  # same run_id, new content
    c3 = store.ingest(db=db, runs_dir=runs)
    assert c3["updated"] == 1 and _count(db) == 2
    got = {r.variant: r.timing.step_s_median for r in store.load(db)}
    assert got == {"baseline": 0.02, "fp32": 0.012}


def test_crash_mid_ingest_leaves_db_unchanged(tmp_path):
    runs, db = tmp_path / "runs", tmp_path / "r.sqlite"
    write_runs(runs, [run_record("S1", "water", "baseline", 0.02)])
    store.ingest(db=db, runs_dir=runs)
    write_runs(runs, [run_record("S2", "water", v, 0.02) for v in ("baseline", "fp32", "tos")])
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.ingest(db=db, runs_dir=runs, _fail_after=2)
    assert _count(db) == 1  # nothing of the failed transaction is visible
    assert store.ingest(db=db, runs_dir=runs)["inserted"] == 3
    assert _count(db) == 4


def _runs():
    return [
        run_record("20260101T000000Z-aaa", "water", "baseline", 0.100, 0.002, git="1111111aaa", created="2026-01-01T00:00:00Z"),
        run_record("20260101T000000Z-aaa", "water", "fp32", 0.050, 0.001, git="1111111aaa", created="2026-01-01T00:00:01Z"),
        run_record("20260202T000000Z-bbb", "water", "baseline", 0.101, 0.002, git="2222222bbb", created="2026-02-02T00:00:00Z"),
        run_record("20260202T000000Z-bbb", "water", "fp32", 0.070, 0.001, git="2222222bbb", created="2026-02-02T00:00:01Z"),
        # another card in sweep bbb: never paired with the H100 runs
        run_record("20260202T000000Z-ccc", "water", "baseline", 0.300, 0.01, card="NVIDIA A100", git="2222222bbb",
                   created="2026-02-02T00:00:02Z"),
    ]


def test_compare_sweeps_flags_regression_beyond_threshold_and_noise():
    res = store.compare(typed(_runs()), "20260101", "20260202T000000Z-bbb")
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"baseline", "fp32"}
    assert rows["fp32"]["ratio"] == pytest.approx(1.4)
    assert rows["fp32"]["flag"] == "REGRESSION"
    assert rows["baseline"]["flag"] == ""  # 1 % slower: within threshold
    text = store.format_compare(res)
    assert "REGRESSION" in text and "fp32" in text


def test_compare_noise_suppresses_flag():
    rs = _runs()
    rs[3]["timing"]["step_s_iqr"] = 0.07  # relative IQR 1.0: the 40 % change is within the noise
    res = store.compare(typed(rs), "20260101", "20260202T000000Z-bbb")
    fp = next(r for r in res["rows"] if r["variant"] == "fp32")
    assert fp["flag"] == "" and fp["noise"] > 0.4


def test_compare_by_git_and_by_variant_and_cards_not_mixed():
    res = store.compare(typed(_runs()), "1111111", "2222222")
    assert res["a"]["kind"] == "git" and {r["card"] for r in res["rows"]} == {"NVIDIA H100"}
    assert ["water", "NVIDIA A100", "baseline"] in res["unpaired"]
    v = store.compare(typed(_runs()), "baseline", "fp32")
    assert v["a"]["kind"] == "variant"
    (row,) = v["rows"]
    assert row["ratio"] == pytest.approx(0.070 / 0.101)  # latest sweep holding both, same card
    assert row["flag"] == "improved"
    assert "error" in store.compare(typed(_runs()), "nope", "fp32")


def test_cli_ingest_and_compare(tmp_path, capsys):
    import argparse

    runs, db = tmp_path / "runs", tmp_path / "r.sqlite"
    paths = write_runs(runs, _runs())
    p = argparse.ArgumentParser()
    store.register_cli(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["ingest", "--db", str(db), *map(str, paths)])
    assert a.func(a) == 0
    a = p.parse_args(["compare", "20260101", "20260202T000000Z-bbb", "--db", str(db), "--no-ingest",
                      "--fail-on-regression"])
    assert a.func(a) == 1
    assert "REGRESSION" in capsys.readouterr().out


# ------------------------------------------------------------------ journal mode on cluster file systems

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
fs1:/export/home /home nfs4 rw,relatime 0 0
10.0.0.1@o2ib:/scratch /lus/scratch lustre rw 0 0
tmpfs /tmp tmpfs rw 0 0
"""


@pytest.mark.parametrize("path,mode", [("/home/team/dpharness/results/results.sqlite", "DELETE"),
                                       ("/lus/scratch/u/results.sqlite", "DELETE"),
                                       ("/tmp/x/results.sqlite", "WAL"),
                                       ("/opt/dph/results.sqlite", "WAL")])
def test_journal_mode_follows_the_file_system(path, mode):
    from harness.results import store

    assert store.journal_mode(Path(path), "auto", mounts=MOUNTS) == mode
    assert store.journal_mode(Path(path), "wal", mounts=MOUNTS) == "WAL"
    assert store.journal_mode(Path(path), "delete", mounts=MOUNTS) == "DELETE"


def test_journal_flag_reaches_sqlite(tmp_path, capsys):
    from harness.cli import main as cli
    from harness.results import store

    db = tmp_path / "r.sqlite"
    assert cli.main(["ingest", "--db", str(db), "--journal", "delete", str(tmp_path / "none.json")]) == 0
    with closing(store.connect(db, "delete")) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with closing(store.connect(db)) as con:  # this test's tmp dir is local: auto is WAL
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(SystemExit) as e:
        cli.main(["ingest", "--db", str(db), "--journal", "memory"])
    assert e.value.code == 2
