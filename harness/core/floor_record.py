"""The typed record of one hardware floor (`dpharness floor`, harness/analyse/floor.py): the card,
the step's GEMMs, the rates measured for them, bandwidth, CUDA-graph node cost and the floor in ms.
Written as results/floor/<sweep_id>-<system>-floor.json (schema dpharness.floor/1) and read back with
the same class; its own folder, so the run-record readers of results/runs/ never see it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.records import BadRecord, RecordFile

SCHEMA = "dpharness.floor/1"


@dataclass
class FloorRecord(RecordFile):
    SCHEMA = SCHEMA  # the module's schema id, what from_json requires
    WHAT = "floor record"
    schema: str | None = None
    sweep_id: str | None = None
    system: str | None = None
    device: str | None = None  # cpu | cuda
    card: str | None = None
    dtype: str | None = None
    repeats: int | None = None
    model: str | None = None  # the factor model, one line
    shapes: dict[str, Any] | None = None
    gemms: list[dict[str, Any]] | None = None  # m, k, n, count, group, pass, flops
    flops_by_group: dict[str, float] | None = None
    gemm_rates: list[dict[str, Any]] | None = None  # m, k, n, s_median, s_iqr, flops_per_s
    bandwidth: dict[str, Any] | None = None
    graph_node: dict[str, Any] | None = None
    kernels_per_step: float | None = None
    kernels_source: str | None = None  # the profiled run it came from
    gemm_ms: float | None = None
    node_ms: float | None = None
    floor_ms: float | None = None
    environment: dict[str, Any] | None = None
    created: str | None = None
    path: Path | None = field(default=None, compare=False, metadata={"transient": True})



def load_floors(folder: Path, warn=None) -> list[FloorRecord]:
    """Every readable floor record in `folder` (sorted by name); a bad file is one warn() line."""
    out = []
    for p in sorted(Path(folder).glob("*-floor.json")) if Path(folder).is_dir() else []:
        try:
            out.append(FloorRecord.from_json(p))
        except BadRecord as e:
            if warn:
                warn(f"{p}: skipped: {e}")
    return out
