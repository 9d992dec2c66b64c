"""Stage 7: the results store. One schema-versioned JSON per run under results/runs/,
written atomically (temp file + fsync + rename) so a crash never leaves half a record."""
from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from harness.core.records import BadRecord, RunRecord, StoredRun, to_jsonable

from harness.core.paths import ROOT
from harness.core.fsutil import atomic_write_json  # noqa: F401 (results.atomic_write_json)
RUNS = ROOT / "results" / "runs"
WORK = ROOT / "results" / "work"
SCHEMA = "dpharness.run/1"


def new_sweep_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def run_id(sweep_id: str, system: str, variant: str, extra: str = "") -> str:
    return f"{sweep_id}-{system}-{variant}{'-' + extra if extra else ''}"


def to_dict(rec: RunRecord) -> dict[str, Any]:
    """The results JSON (documented in README 'Results schema')."""
    run, train, timing = rec.run, rec.train, rec.timing
    profile = rec.profile
    if rec.ncu is not None:
        profile = {**(profile or {}), "ncu": rec.ncu.to_dict()}
    d = {
        "schema": SCHEMA,
        "run_id": run.run_id,
        "sweep_id": run.sweep_id,
        "system": run.system.name,
        # work size: atoms per frame, and the knobs a derived system was made with (bench
        # --replicate / --batch-size; None for a system as given)
        "atoms_per_frame": run.system.atoms_per_frame,
        "workload": run.system.spec.get("workload"),
        "variant": run.variant.name,
        "variant_hash": run.variant.hash,
        "variant_chain": list(run.variant.chain),
        "variant_description": run.variant.description,
        "backend": run.variant.backend,
        "overrides": run.variant.overrides,
        # upstream-native settings (training.enable_compile / enable_tf32): outside the
        # three-parameter rule, shown as such; upstream_only: the chain has no diffs, no modules
        "upstream_options": run.variant.upstream_options,
        "upstream_only": run.variant.upstream_only,
        "accuracy_class": run.variant.accuracy_class,
        "status": train.status,
        "error": train.error,
        "steps": run.steps,
        "seed": run.seed,
        "engine": train.engine,
        "upstream_replaced": train.replaced,
        "device": {"kind": run.device, "name": rec.environment.get("gpu_name") if run.device == "cuda" else "cpu",
                   "count": rec.environment.get("gpu_count", 0) if run.device == "cuda" else 0},
        "timing": {k: v for k, v in to_jsonable(timing).items()},
        "world_size": train.world_size or run.gpus,
        "throughput": _throughput(rec),
        "memory": {"gpu_peak_bytes": train.gpu_peak_bytes},
        "accuracy": to_jsonable(rec.accuracy),
        "profile": profile,
        "artifacts": {
            "work_dir": _rel(train.work_dir),
            "lcurve": _rel(train.lcurve),
            "checkpoint": _rel(train.checkpoint),
            "input": _rel(train.input_path),
            "log": _rel(train.log_path),
        },
        "lcurve": _read_lcurve(train.lcurve),
        "environment": rec.environment,
        "created": rec.created or _now(),
    }
    if rec.anchors is not None:
        d["anchors"] = rec.anchors.to_dict()
        d["speedup_vs"] = rec.speedup_vs.to_dict() if rec.speedup_vs is not None else None
    return d


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def stored(rec: RunRecord, path: Path | None = None) -> StoredRun:
    """The record as its results JSON reads back."""
    return StoredRun.from_dict(to_dict(rec), path)


def _throughput(rec: RunRecord) -> dict[str, Any]:
    """Global frames/s = world_size x per-rank batch (the run's input.json) / median step
    (docs/distributed.md)."""
    from harness.run import distributed

    bs = None
    try:
        inp = json.loads(Path(rec.train.input_path).read_text())
        bs = inp["training"]["training_data"].get("batch_size", "auto")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    frames = distributed.frames_per_step(bs, rec.run.system.atoms_per_frame)
    return {"batch_size_per_rank": frames, "global_batch": frames * rec.run.gpus if frames else None,
            "samples_per_s": distributed.samples_per_s(rec.run.gpus, frames, rec.timing.step_s_median)}


def _rel(p: Path | None) -> str | None:
    if p is None:
        return None
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def _read_lcurve(path: Path | None) -> dict[str, list] | None:
    """lcurve.out columns, kept in the record so the report never needs the work dir."""
    if path is None or not Path(path).is_file():
        return None
    header: list[str] | None = None
    rows: list[list[float]] = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            words = line.lstrip("#").split()
            if words[:1] == ["step"]:  # upstream also writes a comment line after the header
                header = words
            continue
        try:
            rows.append([float(x) for x in line.split()])
        except ValueError:
            continue
    if not header or not rows:
        return None
    cols = list(zip(*rows))
    return {h: list(c) for h, c in zip(header, cols)}


read_lcurve = _read_lcurve  # public name for other stages (the convergence run)


def write_run(rec: RunRecord, runs_dir: Path = RUNS) -> Path:
    """Write (or rewrite: same file, same `created`) the run's results JSON, atomically."""
    path = runs_dir / f"{rec.run.run_id}.json"
    rec.created = rec.created or _now()
    atomic_write_json(path, to_dict(rec))
    return path


def read_run(path: Path) -> StoredRun:
    """One run record; BadRecord when the file is unreadable, truncated, foreign or of an older schema."""
    return StoredRun.from_json(path)


def warn_stderr(msg: str) -> None:
    print(f"dpharness: warning: {msg}", file=sys.stderr)


def run_files(runs_dir: Path = RUNS) -> list[Path]:
    return sorted(Path(runs_dir).glob("*.json"))


def iter_runs(paths: Iterable[Path], warn: Callable[[str], None] = warn_stderr) -> Iterator[tuple[Path, StoredRun]]:
    """(path, record) for each readable run record; each other file is skipped with ONE warn() line
    naming it and why, so one bad file never stops a reader."""
    for p in paths:
        try:
            rec = read_run(p)
        except BadRecord as e:
            warn(f"skipped {p}: {e}")
            continue
        yield Path(p), rec


def load_runs(runs_dir: Path = RUNS, warn: Callable[[str], None] = warn_stderr) -> list[StoredRun]:
    """Every run record under runs_dir (sorted by file name); bad files are skipped with a warning."""
    return [rec for _, rec in iter_runs(run_files(runs_dir), warn)]


def recent_wall_s(runs: list[StoredRun], system: str, variant: str, device_kind: str,
                  last: int = 5, of: str = "timing") -> float | None:
    """The longest wall time of the variant's `last` most recent runs on this system and device
    kind ("cuda" / "cpu") among run records (load_runs), or None. of="timing": the run (start-up
    and compile included); of="accuracy": its accuracy gate. What a time-budgeted sweep expects
    a run or a gate to take before it has seen one."""
    walls = []
    for r in sorted(runs, key=lambda r: r.run_id or "", reverse=True):
        if (r.system == system and r.variant == variant and r.device.kind == device_kind
                and r.world_size in (None, 1)):
            w = (r.timing if of == "timing" else r.accuracy).wall_s
            if w:
                walls.append(float(w))
                if len(walls) == last:
                    break
    return max(walls) if walls else None
