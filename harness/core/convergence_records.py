"""The typed record of one proof over a full training (`dpharness convergence`): every variant x
seed training of one sweep, its learning curve and final `dp test`, the rule and its verdict, and
the wall time each variant took to reach the baseline seeds' final force RMSE. Written as one JSON
under results/convergence/ (schema dpharness.convergence/1), read back with the same class.

A separate module from records.py (the run records), which is at its size limit; the same Part
machinery, so an older or newer file reads back with what it has and writes back what it read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.records import Part, RecordFile

SCHEMA = "dpharness.convergence/1"


@dataclass
class LcurveRows(Part):
    """The lcurve columns the rule reads, plus each row's wall time since the process started."""

    step: list[float] = field(default_factory=list)
    rmse_e_val: list[float | None] = field(default_factory=list)
    rmse_f_val: list[float | None] = field(default_factory=list)
    lr: list[float | None] = field(default_factory=list)
    wall_s: list[float | None] = field(default_factory=list)


@dataclass
class ConvergenceRun(Part):
    PARTS = {"lcurve": LcurveRows}

    variant: str | None = None
    seed: int | None = None
    status: str | None = None  # ok | failed | interrupted | not started
    error: str | None = None
    wall_s: float | None = None
    startup_s: float | None = None
    step_ms_median: float | None = None
    concurrent: int | None = None  # most trainings of the sweep running at once during this one
    sweep_id: str | None = None  # the sweep that trained it (another one's for reused baseline seeds)
    dp_test: dict[str, Any] | None = None
    lcurve: LcurveRows = field(default_factory=LcurveRows)
    work_dir: str | None = None


@dataclass
class ConvergenceRecord(RecordFile):
    SCHEMA = SCHEMA  # the module's schema id, what from_json requires
    WHAT = "convergence record"
    PARTS = {"runs": ConvergenceRun}

    schema: str | None = None
    sweep_id: str | None = None
    system: str | None = None
    steps: int | None = None
    device: str | None = None  # cpu | cuda
    card: str | None = None
    parallel: int | None = None
    learning_rate: dict[str, Any] | None = None  # the schedule every run trained with
    input_sha256: str | None = None  # the training input and data every run trained from
    builds: dict[str, str] | None = None  # variant -> its build's content hash
    baseline_from: list[str] | None = None  # sweep ids whose baseline seeds this record reuses (None: its own)
    # `convergence --rejudge`: the sweep whose trainings this record judges again (nothing retrained)
    rejudged_from: str | None = None
    rule: str | None = None
    verdict: str | None = None  # pass | fail | incomplete
    checks: dict[str, Any] | None = None  # bands, finals, spread sources, reasons
    control: dict[str, Any] | None = None  # the rule on each baseline seed against the others (leave one out)
    time_to_rmse: dict[str, Any] | None = None  # target and, per variant, per-seed seconds
    runs: list[ConvergenceRun] = field(default_factory=list)
    environment: dict[str, Any] | None = None
    created: str | None = None
    path: Path | None = field(default=None, compare=False, metadata={"transient": True})

