"""Typed records passed between stages. Each stage takes records and returns records;
no stage reads another's files or internals except through these."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The only input settings a variant may change (ASC22 rule): everything else is science.
ALLOWED_OVERRIDES = (
    "model/descriptor/precision",
    "model/fitting_net/precision",
    "model/descriptor/type_one_side",
)


@dataclass(frozen=True)
class UpstreamPin:
    """Which upstream DeePMD-kit a build starts from."""

    package: str
    version: str
    wheel: str  # file name of the pinned wheel
    sha256: str
    source_path: Path | None = None  # set when building from a local source checkout
    source_ref: str | None = None


@dataclass(frozen=True)
class Variant:
    """A manifest from patches/<name>/manifest.yaml, validated."""

    name: str
    description: str
    base: str | None  # None only for `baseline`
    upstream: tuple[str, ...]
    backend: str  # pt | jax | tf | pt-expt | tf2
    env: dict[str, str]
    overrides: dict[str, Any]
    diffs: tuple[Path, ...]
    modules: tuple[Path, ...]
    directory: Path
    accuracy_class: str = "float64"  # float64 | float32 | mixed: which parity threshold applies
    engine: str | None = None  # a package under engines/ that the patch modules import (e.g. dpfast)
    # upstream-native settings (variants.UPSTREAM_OPTIONS), outside the three-parameter rule
    upstream_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltVariant:
    """A variant resolved through its base chain and materialised under build/."""

    name: str
    chain: tuple[str, ...]  # variant names from the root, this one last
    hash: str
    tree: Path  # importable upstream tree (site dir) with diffs applied
    backend: str
    env: dict[str, str]
    overrides: dict[str, Any]
    modules: tuple[Path, ...]  # patch modules of the whole chain, in load order
    accuracy_class: str
    description: str
    cached: bool
    log: tuple[str, ...]
    engine: str | None = None  # frozen under <build>/engines/<engine>, first on the child's path
    upstream_options: dict[str, Any] = field(default_factory=dict)  # the chain's, merged
    upstream_only: bool = False  # the chain has no diffs and no patch modules (anchors.py reads it)


@dataclass(frozen=True)
class System:
    """A training system: data, its description and the upstream input it trains with."""

    name: str
    directory: Path
    type_map: tuple[str, ...]
    atoms_per_frame: int
    train: tuple[Path, ...]
    validation: tuple[Path, ...]
    input: dict[str, Any]
    spec: dict[str, Any]  # the whole system.yaml


@dataclass(frozen=True)
class RunSpec:
    """One training run of one variant on one system."""

    run_id: str
    sweep_id: str
    system: System
    variant: BuiltVariant
    steps: int
    device: str  # cpu | cuda
    seed: int
    work_dir: Path
    profile: bool = False
    gpus: int = 1  # processes/GPUs of one node (torchrun for PT; see harness/run/distributed.py)
    # words put before the training child's command (e.g. `nsys profile ... -o base`): how a
    # later stage wraps a run without reaching into train's internals
    launch_prefix: tuple[str, ...] = ()


@dataclass
class TrainResult:
    """What the train stage observed. Times are seconds."""

    status: str  # ok | failed | interrupted
    error: str | None
    step_s: list[float]
    clock: str  # cuda_event | host
    startup_s: float | None
    wall_s: float
    gpu_peak_bytes: int | None
    work_dir: Path
    checkpoint: Path | None
    lcurve: Path | None
    input_path: Path
    log_path: Path
    # upstream's own "average training time: X s/batch" log line (its host clock over display
    # intervals; None when the backend's loop does not print it)
    upstream_avg_step_s: float | None = None


@dataclass(frozen=True)
class Timing:
    """Steady-state statistics over per-step times (computed in harness.run.timing)."""

    step_s_median: float | None
    step_s_iqr: float | None
    step_s_mean: float | None
    step_s_q25: float | None
    step_s_q75: float | None
    steps_measured: int
    warmup_steps: int
    clock: str
    startup_s: float | None
    wall_s: float
    upstream_avg_step_s: float | None = None  # upstream's own average (TrainResult), for comparison


@dataclass
class AccuracyResult:
    dp_test: dict[str, float] | None = None
    parity: dict[str, Any] | None = None
    verdict: str | None = None  # baseline | pass | fail | None (not checked)
    detail: str | None = None
    wall_s: float | None = None  # what the gate took (a time-budgeted sweep plans with it)


@dataclass
class RunRecord:
    """Everything one results JSON holds (see README 'Results schema')."""

    run: RunSpec
    train: TrainResult
    timing: Timing
    environment: dict[str, Any]
    accuracy: AccuracyResult = field(default_factory=AccuracyResult)
    profile: dict[str, Any] | None = None


def to_jsonable(obj: Any) -> Any:
    """dataclasses/Paths/tuples -> plain JSON types."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
