"""Stage 7: the results store. One schema-versioned JSON per run under results/runs/,
written atomically (temp file + fsync + rename) so a crash never leaves half a record."""
from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from harness.core.records import RunRecord, to_jsonable

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
    return {
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
        "device": {"kind": run.device, "name": rec.environment.get("gpu_name") if run.device == "cuda" else "cpu",
                   "count": rec.environment.get("gpu_count", 0) if run.device == "cuda" else 0},
        "timing": {k: v for k, v in to_jsonable(timing).items()},
        "world_size": run.gpus,
        "throughput": _throughput(rec),
        "memory": {"gpu_peak_bytes": train.gpu_peak_bytes},
        "accuracy": to_jsonable(rec.accuracy),
        "profile": rec.profile,
        "artifacts": {
            "work_dir": _rel(train.work_dir),
            "lcurve": _rel(train.lcurve),
            "checkpoint": _rel(train.checkpoint),
            "input": _rel(train.input_path),
            "log": _rel(train.log_path),
        },
        "lcurve": _read_lcurve(train.lcurve),
        "environment": rec.environment,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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


def write_run(rec: RunRecord, runs_dir: Path = RUNS) -> Path:
    path = runs_dir / f"{rec.run.run_id}.json"
    atomic_write_json(path, to_dict(rec))
    return path


# what every reader indexes a record by; a record without them is older than run_id-keyed records
REQUIRED = ("run_id", "sweep_id", "system", "variant")
# the sub-objects readers call .get on: null is fine, anything but an object is not
OBJECTS = ("timing", "accuracy", "memory", "device", "environment", "artifacts", "throughput")


class BadRecord(ValueError):
    """A file under results/runs that is no readable run record; the message says why."""


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


def read_run(path: Path) -> dict[str, Any]:
    """One run record; BadRecord when the file is unreadable, truncated, foreign or of an older schema."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise BadRecord(f"unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BadRecord("not text (binary file)") from None
    except json.JSONDecodeError as e:
        raise BadRecord(f"not valid JSON, truncated? ({e})") from None
    problem = record_problem(d)
    if problem:
        raise BadRecord(problem)
    return d


def warn_stderr(msg: str) -> None:
    print(f"dpharness: warning: {msg}", file=sys.stderr)


def run_files(runs_dir: Path = RUNS) -> list[Path]:
    return sorted(Path(runs_dir).glob("*.json"))


def iter_runs(paths: Iterable[Path], warn: Callable[[str], None] = warn_stderr) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, record) for each readable run record; each other file is skipped with ONE warn() line
    naming it and why, so one bad file never stops a reader."""
    for p in paths:
        try:
            d = read_run(p)
        except BadRecord as e:
            warn(f"skipped {p}: {e}")
            continue
        yield Path(p), d


def load_runs(runs_dir: Path = RUNS, warn: Callable[[str], None] = warn_stderr) -> list[dict[str, Any]]:
    """Every run record under runs_dir (sorted by file name); bad files are skipped with a warning."""
    return [d for _, d in iter_runs(run_files(runs_dir), warn)]


def recent_wall_s(runs: list[dict[str, Any]], system: str, variant: str, device_kind: str,
                  last: int = 5, of: str = "timing") -> float | None:
    """The longest wall time of the variant's `last` most recent runs on this system and device
    kind ("cuda" / "cpu") among run records (load_runs), or None. of="timing": the run (start-up
    and compile included); of="accuracy": its accuracy gate. What a time-budgeted sweep expects
    a run or a gate to take before it has seen one."""
    walls = []
    for r in sorted(runs, key=lambda r: r.get("run_id", ""), reverse=True):
        if (r.get("system") == system and r.get("variant") == variant
                and (r.get("device") or {}).get("kind") == device_kind and r.get("world_size", 1) == 1):
            w = (r.get(of) or {}).get("wall_s")
            if w:
                walls.append(float(w))
                if len(walls) == last:
                    break
    return max(walls) if walls else None
