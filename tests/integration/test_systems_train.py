"""Each shipped system trains for a few steps through the whole harness, and `dpharness systems`
lists all three with neighbour statistics that sel covers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main as cli
from harness.prepare import systems

REPO = Path(__file__).resolve().parents[2]


def _have(name: str) -> bool:
    return not systems.checksum_problems(systems.load_system(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["water", "copper", "alcumg"])
def test_system_trains_through_the_harness(name, tmp_path):
    if not _have(name):
        pytest.skip(f"{name} data absent (run `make systems`)")
    rc = cli.main(["bench", "--system", name, "--steps", "3", "--device", "cpu", "--no-accuracy",
                   "--results-dir", str(tmp_path)])
    assert rc == 0
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert rec["system"] == name and rec["status"] == "ok" and rec["lcurve"]["step"][0] == 1
    assert rec["timing"]["step_s_median"] > 0


def test_systems_lists_all_three_with_neighbour_stats():
    r = subprocess.run([sys.executable, "-m", "harness", "systems", "--json"], cwd=REPO, capture_output=True,
                       text=True)
    rows = {row["system"]: row for row in json.loads(r.stdout)}
    assert {"water", "copper", "alcumg"} <= set(rows)
    for name in ("copper", "alcumg"):
        nb = rows[name]["neighbours"]
        assert nb["sel_covers"] is True and len(nb["max_neighbours"]) == len(rows[name]["types"])
    assert rows["alcumg"]["types"] == ["Al", "Cu", "Mg"]


def test_water_ships_verified_and_shared_is_never_needed(tmp_path, monkeypatch):
    """Water's data is committed and checksummed; with ../shared hidden (CI's DPH_IGNORE_SHARED),
    a damaged copy is refused naming the sources instead of being repaired from ../shared."""
    import shutil

    from harness.prepare import systems
    from harness.core.errors import UserError

    water = systems.load_system("water")
    assert systems.checksum_problems(water) == [] and len(water.spec["files"]) == 28
    d = tmp_path / "water"
    shutil.copytree(water.directory, d)
    (d / "data" / "data_3" / "set.000" / "force.npy").unlink()
    shared = tmp_path / "shared-water"
    shutil.copytree(water.directory / "data", shared)  # a good copy where ../shared would be
    monkeypatch.setattr(systems, "SHARED_WATER", shared)
    monkeypatch.delenv("DEEPMD_SOURCE_DIR", raising=False)
    monkeypatch.setattr(systems.shutil, "which", lambda name: None)  # no git clone either
    monkeypatch.setenv("DPH_IGNORE_SHARED", "1")
    damaged = systems.load_system(str(d))
    assert systems.checksum_problems(damaged) == ["data/data_3/set.000/force.npy: missing"]
    with pytest.raises(UserError, match="upstream data not found"):
        systems.ensure_data(damaged, log=lambda m: None)
    monkeypatch.delenv("DPH_IGNORE_SHARED")
    systems.ensure_data(damaged, log=lambda m: None)  # outside CI ../shared still repairs it
    assert systems.checksum_problems(systems.load_system(str(d))) == []
