"""Where the suite's time goes, per test module, from the JUnit XML `make test` writes
(build/test-report.xml). pytest's --durations lists single tests; a module's share is what a
worker spends on it (setup of its module fixtures included), which is what decides the wall time
under --dist loadfile. Usage: python tools/test_time.py [build/test-report.xml] [--top 25]"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd


def module_table(report: Path) -> pd.DataFrame:
    """One row per test module: tests, worker-seconds (setup + call + teardown), slowest test."""
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        parts = (case.get("classname") or "?").split(".")
        module = ".".join(parts[:-1] if len(parts) > 1 and parts[-1].startswith("Test") else parts)  # a Test class
        rows.append({"module": module, "test": case.get("name"), "s": float(case.get("time") or 0)})
    if not rows:
        raise ValueError(f"{report}: no test cases")
    df = pd.DataFrame(rows)
    g = df.groupby("module")
    slowest = df.loc[g["s"].idxmax()].set_index("module")
    table = pd.DataFrame({"tests": g.size(), "seconds": g["s"].sum(), "slowest_s": slowest["s"],
                          "slowest": slowest["test"]})
    return table.sort_values("seconds", ascending=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", nargs="?", default="build/test-report.xml")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    path = Path(a.report)
    if not path.is_file():
        print(f"test_time: {path} does not exist (make test writes it)", file=sys.stderr)
        return 2
    try:
        t = module_table(path)
    except (ET.ParseError, ValueError) as e:
        print(f"test_time: {path} is not a JUnit report with test cases ({e})", file=sys.stderr)
        return 2
    total = t["seconds"].sum()
    print(f"worker time per module ({len(t)} modules, {int(t['tests'].sum())} tests, {total / 60:.1f} worker-minutes):")
    print(f"{'min':>6} {'share':>6} {'tests':>5} {'slowest s':>9}  module / slowest test")
    for mod, r in t.head(a.top).iterrows():
        share = r.seconds / total if total else 0.0  # a run stopped at collection timed nothing
        print(f"{r.seconds / 60:6.1f} {share:6.1%} {int(r.tests):5d} {r.slowest_s:9.0f}  {mod} / {str(r.slowest)[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
