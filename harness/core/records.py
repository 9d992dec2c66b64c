"""Typed records passed between stages. Each stage takes records and returns records;
no stage reads another's files or internals except through these.

A run is written as a RunRecord (what the pipeline observed) and read back as a StoredRun (the
results JSON, typed: results/runs/*.json, the SQLite store), whose nested objects are typed parts
(Timing, AccuracyResult, Profile, Anchors, Environment, ...)."""
from __future__ import annotations

import json
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

# The only input settings a variant may change (ASC22 rule): everything else is science.
ALLOWED_OVERRIDES = (
    "model/descriptor/precision",
    "model/fitting_net/precision",
    "model/descriptor/type_one_side",
)


class Part:
    """What the typed parts of a results JSON share (each a dataclass whose fields are the keys of
    one JSON object). from_dict tolerates what an older record lacks (the field's default, None)
    and keeps what this code does not know; to_dict gives back exactly the dict it was read from
    (absent keys stay absent, unknown ones and the key order are kept), with what was changed.
    A nested part (or a list of parts) is named in PARTS; one whose field defaults to None stays None when the JSON
    has null, any other is an empty part then (attribute access never needs a None check)."""

    PARTS: dict[str, type[Part]] = {}
    _keys: tuple[str, ...] | None = None  # the keys read (None: built here, every field is written)
    _extra: dict[str, Any] = {}  # keys this code does not know, as read (never mutated: replaced)
    _null = False  # read from a JSON null

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None):
        d = d or {}
        known = {f.name: f for f in _json_fields(cls)}
        kw: dict[str, Any] = {}
        for name, f in known.items():
            if name in d:
                kw[name] = _load(cls.PARTS.get(name), f, d[name])
            elif _required(f):
                kw[name] = None
        obj = cls(**kw)
        object.__setattr__(obj, "_keys", tuple(d))
        object.__setattr__(obj, "_extra", {k: v for k, v in d.items() if k not in known})
        return obj

    def to_dict(self) -> dict[str, Any] | None:
        if self._null and self.is_empty():
            return None
        known = {f.name: f for f in _json_fields(type(self))}
        keys = self._keys
        order = list(known) if keys is None else [*keys, *(k for k in known if k not in keys)]
        out: dict[str, Any] = {}
        for k in order:
            if k in self._extra:
                out[k] = self._extra[k]
            elif k in known:
                v = getattr(self, k)
                if keys is None or k in keys or not _is_default(known[k], v):
                    out[k] = _dump(v)
        return out

    def is_empty(self) -> bool:
        """Nothing set: every field at its default and no unknown key."""
        return not self._extra and all(_is_default(f, getattr(self, f.name)) for f in _json_fields(type(self)))


def _json_fields(cls) -> list[Field]:
    return [f for f in fields(cls) if not f.metadata.get("transient")]


def _required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _load(part: type[Part] | None, f: Field, v: Any) -> Any:
    if part is None:
        return v
    if isinstance(v, list):  # a list of parts (a record's runs)
        return [part.from_dict(x) if isinstance(x, dict) else x for x in v]
    if isinstance(v, dict):
        return part.from_dict(v)
    if v is None and f.default is not None:  # an always-present part: empty, written back as null
        empty = part.from_dict({})
        object.__setattr__(empty, "_null", True)
        return empty
    return v  # None for an optional part; anything else (malformed) kept as it is


def _is_default(f: Field, v: Any) -> bool:
    if isinstance(v, Part):
        return v.is_empty()
    if f.default is not MISSING:
        return v == f.default
    if f.default_factory is not MISSING:
        return v == f.default_factory()
    return v is None


def _dump(v: Any) -> Any:
    if isinstance(v, Part):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    return v


@dataclass(frozen=True)
class UpstreamPin:
    """Which upstream DeePMD-kit a build starts from."""

    package: str
    version: str
    wheel: str  # file name of the pinned wheel
    sha256: str


@dataclass(frozen=True)
class Variant:
    """A manifest from patches/<name>/manifest.yaml, validated."""

    name: str
    description: str
    base: str | None  # None only for `baseline`
    upstream: tuple[str, ...]
    backend: str  # pt | jax | tf | pt-expt | tf2 | tf-v2
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
    # a family built in an environment of its own (the TF v2 family, backend tf-v2): what it runs
    # ("deepmd 2.0.3 tensorflow 2.6.0 ..."), or why it cannot be built here (its runs: unavailable)
    runtime: str | None = None
    unavailable: str | None = None


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
    # words put before the training child's command (e.g. `nsys profile ... -o base`, `ncu ...`):
    # how a later stage wraps a run without reaching into train's internals
    launch_prefix: tuple[str, ...] = ()
    launch_env: dict[str, str] = field(default_factory=dict)  # set in the child's environment last
    timeout_s: float | None = None  # the child is killed past this (None: no limit)


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
    command: tuple[str, ...] = ()  # what was launched (launch prefix included)
    returncode: int | None = None  # the child's exit status (None: not started, or killed by us)
    timed_out: bool = False  # killed past RunSpec.timeout_s
    # processes that trained, as the run's own log says (TF v2 under horovodrun); None: not read
    world_size: int | None = None
    # what the engine of a fast variant really ran (dpfast.ran.Ran as a dict); None: upstream's loop
    engine: dict[str, Any] | None = None
    # what of upstream's code the child replaced (harness.core.rebind: target, by, why); None: not written
    replaced: list[dict[str, str]] | None = None


@dataclass
class Timing(Part):
    """Steady-state statistics over per-step times (computed in harness.run.timing); a record's
    `timing`. The defaults (None) are what an older record without the key reads as."""

    step_s_median: float | None = None
    step_s_iqr: float | None = None
    step_s_mean: float | None = None
    step_s_q25: float | None = None
    step_s_q75: float | None = None
    steps_measured: int | None = None
    warmup_steps: int | None = None
    clock: str | None = None
    startup_s: float | None = None
    wall_s: float | None = None
    upstream_avg_step_s: float | None = None  # upstream's own average (TrainResult), for comparison


@dataclass
class Equivalence(Part):
    """`accuracy.equivalence`: the training-equivalence test of a reduced-precision variant over
    seeds (harness/judge/equivalence.py): per metric the effect size (variant - baseline mean)
    with its 90 % interval, the margin, the TOST and not-worse p-values and the outcome."""

    verdict: str | None = None  # pass | fail | None (not judged: detail says why)
    detail: str | None = None
    alpha: float | None = None
    steps: int | None = None
    gate_steps: int | None = None  # the system's, from system.yaml (None: not calibrated)
    calibration: str | None = None  # the file the baseline's seeds came from
    seeds_variant: list[int] | None = None
    seeds_baseline: list[int] | None = None
    metrics: dict[str, dict[str, Any]] | None = None


@dataclass
class AccuracyResult(Part):
    PARTS = {"equivalence": Equivalence}

    dp_test: dict[str, float] | None = None
    parity: dict[str, Any] | None = None
    verdict: str | None = None  # baseline | pass | fail | None (not checked)
    detail: str | None = None
    wall_s: float | None = None  # what the gate took (a time-budgeted sweep plans with it)
    equivalence: Equivalence | None = None  # reduced-precision classes with seeds on both sides


@dataclass
class NcuResult(Part):
    """A record's `profile.ncu`: the Nsight Compute run of its top kernels (harness.analyse.nsight),
    each kernel parse_ncu_csv's entry with its `figures`."""

    command: list[str] | None = None
    returncode: int | None = None
    error: str | None = None  # why there are no (or partial) figures: timed out, ncu's exit status
    wall_s: float | None = None
    kernels: list[dict[str, Any]] | None = None


@dataclass
class AnchorRef(Part):
    """One anchor of a sweep: the run a speed-up divides (harness.results.anchors)."""

    variant: str | None = None
    run_id: str | None = None
    step_s_median: float | None = None
    gated: bool | None = None


class _PerFamily(Part):
    """A part with one field per anchor family (harness.results.anchors.FAMILIES)."""

    def of(self, family: str) -> Any:
        if family not in ("legal", "native"):
            raise KeyError(family)
        return getattr(self, family)


@dataclass
class Anchors(_PerFamily):
    """A record's `anchors`: per family, the run its sweep's speed-ups are quoted against."""

    PARTS = {"legal": AnchorRef, "native": AnchorRef}

    legal: AnchorRef | None = None
    native: AnchorRef | None = None


@dataclass
class Speedups(_PerFamily):
    """A record's `speedup_vs`: anchor median / run median per family (None: no anchor or no speed)."""

    legal: float | None = None
    native: float | None = None


@dataclass
class RunRecord:
    """Everything one results JSON holds (see README 'Results schema'), as the pipeline has it;
    harness.results.runs writes it, StoredRun reads it back."""

    run: RunSpec
    train: TrainResult
    timing: Timing
    environment: dict[str, Any]
    accuracy: AccuracyResult = field(default_factory=AccuracyResult)
    profile: dict[str, Any] | None = None
    ncu: NcuResult | None = None  # written as profile.ncu
    # added once every run of the sweep is written (a stopped sweep has none)
    anchors: Anchors | None = None
    speedup_vs: Speedups | None = None
    created: str | None = None  # set when first written; a rewrite keeps it


# ------------------------------------------------------------------ a results JSON read back

@dataclass
class DeviceInfo(Part):
    kind: str | None = None  # cuda | cpu
    name: str | None = None
    count: int | None = None


@dataclass
class Throughput(Part):
    batch_size_per_rank: float | None = None
    global_batch: float | None = None
    samples_per_s: float | None = None


@dataclass
class Memory(Part):
    gpu_peak_bytes: int | None = None


@dataclass
class Artifacts(Part):
    """Paths relative to the checkout (or absolute outside it)."""

    work_dir: str | None = None
    lcurve: str | None = None
    checkpoint: str | None = None
    input: str | None = None
    log: str | None = None


@dataclass
class Environment(Part):
    """harness.core.environment.capture(), as recorded."""

    harness_version: str | None = None
    harness_git: str | None = None
    python: str | None = None
    platform: str | None = None
    hostname: str | None = None
    cpu_count: int | None = None
    torch: str | None = None
    jax: str | None = None
    tensorflow: str | None = None
    gpu_name: str | None = None
    gpu_count: int | None = None
    cuda: str | None = None
    driver: str | None = None


@dataclass
class EngineRan(Part):
    """A record's `engine`: the path a fast engine really took (engines/dpfast/ran.py). None for
    runs of upstream's own loop and for records older than the field."""

    engine: str | None = None  # graph | fused
    device: str | None = None
    forces: str | None = None  # analytic | autograd
    kernels: str | None = None  # triton: fused's embedding nets by its Triton kernels (fused-kernels)
    order: str | None = None  # whose draw of the frames: engine | upstream (DPH_FOLLOW_UPSTREAM_ORDER)
    compiled: str | None = None  # step | predict | none
    compile_backend: str | None = None
    optimizer: str | None = None  # compiled | eager
    cuda_graphs: int | None = None
    graph_breaks: int | None = None
    graph_break_reasons: dict[str, int] | None = None  # dynamo's most frequent reasons, with counts
    fallback: str | None = None  # eager: the run is status "fallback", never the variant's speed
    fallback_reason: str | None = None
    options: dict[str, Any] | None = None  # the typed EngineOptions it ran with (engines/dpfast/options.py)
    error: str | None = None  # the report itself could not be written


@dataclass
class Profile(Part):
    """A record's `profile` (harness.analyse.profile.summarise; docs/profiling-and-report.md)."""

    PARTS = {"ncu": NcuResult}

    status: str | None = None  # ok | partial | unsupported | unreadable | ...
    reason: str | None = None
    steps: int | None = None
    window: dict[str, Any] | None = None  # start_step, steps, numb_steps
    wall_s_per_step: float | None = None
    gpu_busy_s_per_step: float | None = None
    host_gap_s_per_step: float | None = None
    kernels_per_step: float | None = None
    launches_per_step: float | None = None
    memcpy: dict[str, Any] | None = None
    categories: dict[str, Any] | None = None  # basis, by_name, by_range
    top_kernels: list[dict[str, Any]] | None = None
    top_ops: list[dict[str, Any]] | None = None
    xla_executions_per_step: float | None = None
    ncu: NcuResult | None = None
    nsys: dict[str, Any] | None = None


class BadRecord(ValueError):
    """A file under results/runs that is no readable run record; the message says why."""


def read_json_object(path: Path, schema: str | None = None, what: str = "record") -> Any:
    """The JSON in `path`; BadRecord naming why when it is unreadable, not text, truncated or
    (with `schema`) not an object of that schema. Every record kind's from_json starts here."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise BadRecord(f"unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BadRecord("not text (binary file)") from None
    except json.JSONDecodeError as e:
        raise BadRecord(f"not valid JSON, truncated? ({e})") from None
    if schema is not None and (not isinstance(d, dict) or d.get("schema") != schema):
        raise BadRecord(f'not a {what} (no "schema": "{schema}")')
    return d


class RecordFile(Part):
    """A Part that is a whole results file (a run, convergence, trajectory or floor record):
    read from one JSON whose "schema" is SCHEMA, remembering the path it came from (the
    subclass declares the transient `path` field)."""

    SCHEMA = None  # the "schema" value the file must carry (None: the subclass checks its own)
    WHAT = "record"  # how an error names the kind of file

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, path: Path | None = None):
        rec = super().from_dict(d)
        rec.path = None if path is None else Path(path)
        return rec

    @classmethod
    def from_json(cls, path: Path):
        return cls.from_dict(read_json_object(path, cls.SCHEMA, cls.WHAT), path)

    @classmethod
    def read_dir(cls, directory: Path, warn: Callable[[str], None]) -> list:
        """Every record of this kind directly under `directory` (*.json; subfolders hold raw
        files), newest first by name (sweep ids sort by time); an unreadable file is skipped with
        one warn() line."""
        directory = Path(directory)
        out = []
        for p in sorted(directory.glob("*.json"), reverse=True) if directory.is_dir() else []:
            try:
                out.append(cls.from_json(p))
            except BadRecord as e:
                warn(f"skipping {p}: {e}")
        return out


# what every reader indexes a record by; a record without them is older than run_id-keyed records
REQUIRED = ("run_id", "sweep_id", "system", "variant")
# the sub-objects read as typed parts: null is fine, anything but an object is not
OBJECTS = ("timing", "accuracy", "memory", "device", "environment", "artifacts", "throughput")


def record_problem(d: Any) -> str | None:
    """Why `d` is no usable run record (None: it is one)."""
    if not isinstance(d, dict) or not str(d.get("schema", "")).startswith("dpharness.run/"):
        return 'not a dpharness run record (no "schema": "dpharness.run/...")'
    missing = [k for k in REQUIRED if not isinstance(d.get(k), str) or not d[k]]
    if missing:
        return f"older or incomplete record schema (no {', '.join(missing)})"
    bad = [k for k in OBJECTS if d.get(k) is not None and not isinstance(d[k], dict)]
    if bad:
        return f"malformed record ({', '.join(bad)} not an object)"
    return None


@dataclass
class StoredRun(RecordFile):
    """One results JSON read back (docs/results-schema.md), every schema version: what a key of
    an older record lacks reads as None (an empty part for the objects), what this code does not
    know is kept, and to_dict() is the JSON again. `path`: the file it was read from or written
    to (not part of the JSON)."""

    PARTS = {"device": DeviceInfo, "timing": Timing, "throughput": Throughput, "memory": Memory,
             "accuracy": AccuracyResult, "profile": Profile, "artifacts": Artifacts,
             "environment": Environment, "anchors": Anchors, "speedup_vs": Speedups, "engine": EngineRan}

    schema: str | None = None
    run_id: str | None = None
    sweep_id: str | None = None
    system: str | None = None
    variant: str | None = None
    variant_hash: str | None = None
    variant_chain: list[str] | None = None
    variant_description: str | None = None
    backend: str | None = None
    overrides: dict[str, Any] | None = None
    upstream_options: dict[str, Any] | None = None
    upstream_only: bool | None = None  # None: a record older than the field
    accuracy_class: str | None = None
    status: str | None = None  # ok | failed | interrupted | unavailable | fallback (timed, never counted)
    error: str | None = None
    steps: int | None = None
    seed: int | None = None
    engine: EngineRan | None = None  # what a fast engine ran (None: upstream's loop, or an older record)
    # what of upstream's code the training child replaced (harness.core.rebind): target, by, why
    # each; [] for upstream's code as written; None: an older record or a child that wrote none
    upstream_replaced: list[dict[str, str]] | None = None
    atoms_per_frame: int | None = None  # None: a record older than the field
    workload: dict[str, Any] | None = None  # replicate / batch size a derived system was made with
    device: DeviceInfo = field(default_factory=DeviceInfo)
    timing: Timing = field(default_factory=Timing)
    world_size: int | None = None  # None: a record older than multi-GPU runs (one process)
    throughput: Throughput = field(default_factory=Throughput)
    memory: Memory = field(default_factory=Memory)
    accuracy: AccuracyResult = field(default_factory=AccuracyResult)
    profile: Profile | None = None
    artifacts: Artifacts = field(default_factory=Artifacts)
    lcurve: dict[str, list] | None = None
    environment: Environment = field(default_factory=Environment)
    created: str | None = None
    anchors: Anchors | None = None
    speedup_vs: Speedups | None = None
    path: Path | None = field(default=None, compare=False, metadata={"transient": True})

    @classmethod
    def from_json(cls, path: Path) -> StoredRun:
        """The record in `path`; BadRecord when the file is unreadable, truncated, foreign or of
        an older schema."""
        d = read_json_object(path)
        problem = record_problem(d)
        if problem:
            raise BadRecord(problem)
        return cls.from_dict(d, path)

    def card(self, unknown: str = "unknown") -> str:
        """The device the run trained on: the GPU's name, else the device kind."""
        return str(self.device.name or self.device.kind or unknown)

    @property
    def ncu(self) -> NcuResult | None:
        """The profile's Nsight Compute result (None: none, or an empty one)."""
        n = self.profile.ncu if isinstance(self.profile, Profile) else None
        return n if isinstance(n, NcuResult) and not n.is_empty() else None


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
