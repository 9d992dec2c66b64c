"""`dpharness export --format csv|parquet`: every run record as one flat table row
(pandas.json_normalize: `timing.step_s_median`, `accuracy.dp_test.rmse_f`, `profile.gpu_busy_s_per_step`,
`environment.torch`, ...) for notebooks. Bulky per-step / per-kernel lists are left out (they stay in
the JSON records); other lists become JSON strings, so every cell is a scalar."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from harness.results import runs as results
from harness.core.errors import UserError
from harness.core.records import StoredRun
from harness.core import fsutil

FORMATS = ("csv", "parquet")
OUT_DIR = results.ROOT / "results" / "export"
# dotted paths of lists with one entry per step or kernel: a table cell is the wrong place for them
BULKY = ("lcurve", "profile.top_kernels", "profile.top_ops", "profile.ncu.kernels", "profile.nsys.top_kernels")
# identity first, the rest alphabetical: the columns a reader looks for first
FIRST = ("run_id", "sweep_id", "system", "variant", "status", "device.name", "world_size", "created")


def _drop(d: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for k in parents:
        d = d.get(k) if isinstance(d, dict) else None
    if isinstance(d, dict):
        d.pop(leaf, None)


def _slim(r: StoredRun) -> dict[str, Any]:
    d = json.loads(json.dumps(r.to_dict()))  # deep copy: the caller's records stay whole
    for dotted in BULKY:
        _drop(d, dotted)
    return d


def _scalar_column(col):
    """Lists as JSON strings; a column mixing kinds (str and numbers) as strings, which parquet needs."""
    col = col.map(lambda x: json.dumps(x) if isinstance(x, (list, dict)) else x)
    kinds = {type(x) for x in col if x is not None and x == x}
    if len(kinds) > 1 and str in kinds:
        col = col.map(lambda x: str(x) if x is not None and x == x else None)
    return col


def flatten(records: list[StoredRun]):
    """One row per record, one column per leaf field (dotted names)."""
    import pandas as pd

    df = pd.json_normalize([_slim(r) for r in records], sep=".")
    # a parent that is null in some records (profile: null) beside its leaves (profile.status) says nothing
    parents = [c for c in df.columns if any(o.startswith(c + ".") for o in df.columns)]
    df = df.drop(columns=parents)
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = _scalar_column(df[c])
    first = [c for c in FIRST if c in df.columns]
    return df[first + sorted(c for c in df.columns if c not in first)]


def _need_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("parquet export needs pyarrow: pip install pyarrow") from None


def write_table(df, out: Path, fmt: str) -> Path:
    """Atomically (temp file + rename): a failed export never leaves half a file under `out`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "parquet":
        _need_pyarrow()
    out = Path(out)
    try:
        fsutil.atomic_write(out, lambda tmp: df.to_csv(tmp, index=False) if fmt == "csv"
                            else df.to_parquet(tmp, index=False))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def export(runs_dir: Path, out: Path, fmt: str = "csv", warn: Callable[[str], None] = results.warn_stderr) -> int:
    """Write every readable record of runs_dir to `out`; returns the number of rows."""
    if not Path(runs_dir).is_dir():
        raise UserError(f"no run records directory {runs_dir}")
    df = flatten(results.load_runs(Path(runs_dir), warn))
    write_table(df, out, fmt)
    return len(df)


def _export_cmd(a) -> int:
    out = Path(a.out) if a.out else OUT_DIR / f"runs.{a.format}"
    n = export(Path(a.runs), out, a.format)
    print(f"wrote {out} ({n} runs)", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("export", help="every run record as one flat CSV / parquet table (for notebooks)")
    p.add_argument("--format", default="csv", help="csv (default) | parquet (needs pyarrow)")
    p.add_argument("--out", default=None, help="output file (default results/export/runs.<format>)")
    p.add_argument("--runs", default=str(results.RUNS), help="directory of results JSONs")
    p.set_defaults(func=_export_cmd)
