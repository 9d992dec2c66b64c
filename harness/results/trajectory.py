"""The trajectory records' store: one JSON per `dpharness trajectory` under results/trajectory/
(TrajectoryRecord), written atomically, read back typed."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from harness.core import fsutil
from harness.core.trajectory_records import TrajectoryRecord
from harness.results.runs import ROOT, warn_stderr

TRAJECTORY = ROOT / "results" / "trajectory"


def write(rec: TrajectoryRecord, directory: Path = TRAJECTORY) -> Path:
    rec.path = fsutil.atomic_write_json(Path(directory) / f"{rec.sweep_id}-{rec.system}.json", rec.to_dict())
    return rec.path


def load_records(directory: Path = TRAJECTORY, warn: Callable[[str], None] = warn_stderr) -> list[TrajectoryRecord]:
    """Every trajectory record directly under `directory` (its subfolders hold raw curves), newest
    first; unreadable files are skipped with a warning."""
    return TrajectoryRecord.read_dir(directory, warn)
