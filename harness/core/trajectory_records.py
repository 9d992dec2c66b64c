"""The typed record of one `dpharness trajectory`: upstream trained twice with one seed (its
run-to-run floor) and each variant once on upstream's own sampler order from the same initial
weights, each training's full-precision learning curve, and every curve's divergence from the
first upstream run (harness/judge/trajectory.py). One JSON under results/trajectory/ (schema
dpharness.trajectory/1), read back with the same class."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.records import Part, RecordFile

SCHEMA = "dpharness.trajectory/1"


@dataclass
class TrajectoryRun(Part):
    role: str | None = None  # upstream | upstream-again | variant
    variant: str | None = None
    status: str | None = None  # ok | failed | interrupted | unavailable
    error: str | None = None
    order: str | None = None  # whose sampler drew the frames: upstream (always so when it ran)
    engine: dict[str, Any] | None = None  # what the engine ran (dpfast's Ran); None: upstream's loop
    wall_s: float | None = None
    step_ms_median: float | None = None
    work_dir: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # lcurve_full.jsonl as trained


@dataclass
class TrajectoryComparison(Part):
    """One training's curve and final weights against the first upstream run's."""

    run: str | None = None  # the compared run's role or variant name
    steps: list[int] = field(default_factory=list)
    max_rel: list[float | None] = field(default_factory=list)  # per step, over the columns
    by_column: dict[str, list[float | None]] = field(default_factory=dict)
    worst: float | None = None
    worst_at: str | None = None
    horizon: int | None = None  # first step beyond horizon_rtol; None: none within the run
    problems: list[str] = field(default_factory=list)
    weights_max_rel: float | None = None  # final checkpoints, the largest per-tensor difference
    weights_worst: str | None = None
    follows: bool | None = None  # variant's horizon >= upstream's own (None for upstream-again)


@dataclass
class TrajectoryRecord(RecordFile):
    SCHEMA = SCHEMA  # the module's schema id, what from_json requires
    WHAT = "trajectory record"
    PARTS = {"runs": TrajectoryRun, "comparisons": TrajectoryComparison}

    schema: str | None = None
    sweep_id: str | None = None
    system: str | None = None
    steps: int | None = None
    seed: int | None = None
    device: str | None = None
    card: str | None = None
    disp_freq: int | None = None
    learning_rate: dict[str, Any] | None = None
    input_sha256: str | None = None
    builds: dict[str, str] | None = None
    horizon_rtol: float | None = None
    verdict: str | None = None  # pass: every variant follows as long as upstream follows itself
    runs: list[TrajectoryRun] = field(default_factory=list)
    comparisons: list[TrajectoryComparison] = field(default_factory=list)
    environment: dict[str, Any] | None = None
    created: str | None = None
    path: Path | None = field(default=None, compare=False, metadata={"transient": True})

