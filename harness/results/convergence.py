"""The convergence records' store: one JSON per proof over a full training under
results/convergence/ (ConvergenceRecord), written atomically, read back typed."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from harness.core import fsutil
from harness.core.convergence_records import ConvergenceRecord
from harness.results.runs import ROOT, warn_stderr

CONVERGENCE = ROOT / "results" / "convergence"


def write(rec: ConvergenceRecord, directory: Path = CONVERGENCE) -> Path:
    rec.path = fsutil.atomic_write_json(Path(directory) / f"{rec.sweep_id}-{rec.system}.json", rec.to_dict())
    return rec.path


def load_records(directory: Path = CONVERGENCE, warn: Callable[[str], None] = warn_stderr) -> list[ConvergenceRecord]:
    """Every convergence record under `directory`, newest first; unreadable files are skipped
    with a warning."""
    return ConvergenceRecord.read_dir(directory, warn)
