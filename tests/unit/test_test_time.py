"""tools/test_time.py: the suite's worker time per module, from the JUnit report make test writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import test_time  # noqa: E402

REPORT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.unit.test_a" name="test_one" time="2.5"/>
<testcase classname="tests.unit.test_a" name="test_two" time="7.0"><skipped message="x"/></testcase>
<testcase classname="tests.integration.test_b.TestGroup" name="test_three" time="60.0"/>
<testcase classname="tests.integration.test_b" name="test_four[1]" time="30.0"><failure message="y"/></testcase>
</testsuite></testsuites>"""


def test_worker_seconds_are_summed_per_module_slowest_first(tmp_path):
    (tmp_path / "r.xml").write_text(REPORT)
    t = test_time.module_table(tmp_path / "r.xml")
    assert list(t.index) == ["tests.integration.test_b", "tests.unit.test_a"]  # a Test class folds into its module
    assert t.loc["tests.integration.test_b", "seconds"] == 90.0 and t.loc["tests.integration.test_b", "tests"] == 2
    assert t.loc["tests.integration.test_b", "slowest"] == "test_three"
    assert t.loc["tests.unit.test_a", "seconds"] == 9.5 and t.loc["tests.unit.test_a", "slowest_s"] == 7.0


def test_a_missing_or_empty_report_is_one_line_exit_2(tmp_path):
    for path, text in ((tmp_path / "none.xml", None), (tmp_path / "empty.xml", "<testsuites/>"),
                       (tmp_path / "bad.xml", "not xml")):
        if text is not None:
            path.write_text(text)
        r = subprocess.run([sys.executable, str(REPO / "tools" / "test_time.py"), str(path)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr, r.stderr


def test_a_run_stopped_at_collection_prints_its_table_without_a_warning(tmp_path):
    """Collection errors are test cases of 0 s: the shares are 0 %, not nan with a RuntimeWarning
    (the log of a fresh clone whose collection failed, 4954a2a)."""
    (tmp_path / "r.xml").write_text(
        '<testsuites><testsuite name="pytest"><testcase classname="" name="tests.engines.test_x" time="0.000">'
        '<error message="collection failure"/></testcase></testsuite></testsuites>')
    r = subprocess.run([sys.executable, "-W", "error", str(REPO / "tools" / "test_time.py"), str(tmp_path / "r.xml")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr and "0.0%" in r.stdout and "nan" not in r.stdout, r.stdout + r.stderr
