"""The results history: every results JSON ingested into SQLite (results/results.sqlite), and
`compare A B` between two sweeps, git commits or variants.

Ingest is one transaction per call and idempotent by run_id (INSERT OR REPLACE keyed on run_id), so a
crash mid-ingest leaves the database exactly as before the call (SQLite's journal rolls it back).
The JSON files stay the source of truth; the database can always be rebuilt with `ingest --rebuild`."""
from __future__ import annotations

import json
import math
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.core.records import StoredRun
from harness.results import runs as results
from harness.results.runs import ROOT, RUNS

DB = ROOT / "results" / "results.sqlite"
THRESHOLD = 0.10

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    sweep_id TEXT NOT NULL,
    system TEXT NOT NULL,
    variant TEXT NOT NULL,
    variant_hash TEXT,
    status TEXT,
    steps INTEGER,
    device_kind TEXT,
    device_name TEXT,
    world_size INTEGER,
    step_s_median REAL,
    step_s_iqr REAL,
    step_s_q25 REAL,
    step_s_q75 REAL,
    startup_s REAL,
    wall_s REAL,
    gpu_peak_bytes INTEGER,
    verdict TEXT,
    harness_git TEXT,
    torch TEXT,
    created TEXT,
    source TEXT,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs(sweep_id);
CREATE INDEX IF NOT EXISTS runs_git ON runs(harness_git);
CREATE INDEX IF NOT EXISTS runs_sv ON runs(system, variant);
"""
COLUMNS = ("run_id", "sweep_id", "system", "variant", "variant_hash", "status", "steps", "device_kind",
           "device_name", "world_size", "step_s_median", "step_s_iqr", "step_s_q25", "step_s_q75", "startup_s",
           "wall_s", "gpu_peak_bytes", "verdict", "harness_git", "torch", "created", "source", "json")


# SQLite's WAL needs shared memory between processes, which network file systems do not give
# (sqlite.org/wal.html): there the rollback journal is the safe mode.
NETWORK_FS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph",
                        "cephfs", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "9p",
                        "afs", "panfs", "wekafs", "fuse.juicefs", "orangefs", "pvfs2"})
JOURNALS = ("auto", "wal", "delete")


def fs_type(path: Path, mounts: str | None = None) -> str | None:
    """The file system type of the mount holding `path` (longest mount-point prefix in
    /proc/mounts), or None where that cannot be read."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    p = str(Path(path).resolve())
    best, kind = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def journal_mode(db: Path, journal: str = "auto", mounts: str | None = None) -> str:
    """WAL on local disks; the rollback journal (DELETE) on a network file system or on request."""
    if journal not in JOURNALS:
        from harness.core.errors import UserError

        raise UserError(f"--journal must be one of {', '.join(JOURNALS)}, not {journal!r}")
    if journal != "auto":
        return journal.upper()
    return "DELETE" if fs_type(Path(db).parent, mounts) in NETWORK_FS else "WAL"


def connect(db: Path = DB, journal: str = "auto") -> sqlite3.Connection:
    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    mode = journal_mode(db, journal)
    con = sqlite3.connect(str(db), isolation_level=None)  # explicit BEGIN/COMMIT below
    con.row_factory = sqlite3.Row
    con.execute(f"PRAGMA journal_mode={mode}")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(SCHEMA_SQL)
    return con


def row_of(r: StoredRun, source: str | None = None) -> tuple:
    t, env = r.timing, r.environment
    return (
        r.run_id, r.sweep_id, r.system, r.variant, r.variant_hash, r.status,
        r.steps, r.device.kind, r.device.name, int(r.world_size or 1),
        t.step_s_median, t.step_s_iqr, t.step_s_q25, t.step_s_q75,
        t.startup_s, t.wall_s, r.memory.gpu_peak_bytes,
        r.accuracy.verdict, env.harness_git, env.torch, r.created,
        source, json.dumps(r.to_dict(), sort_keys=True),
    )


def ingest(paths: Iterable[Path] | None = None, db: Path = DB, runs_dir: Path = RUNS,
           rebuild: bool = False, _fail_after: int | None = None,
           warn: Callable[[str], None] = results.warn_stderr, journal: str = "auto") -> dict[str, int]:
    """Ingest results JSONs (default: every runs_dir/*.json) in ONE transaction. Returns counts.
    A file that is no readable run record is skipped with one warn() line (results.iter_runs).
    `_fail_after` (tests only) raises after that many rows, to prove the rollback."""
    files = sorted(Path(p) for p in paths) if paths is not None else results.run_files(runs_dir)
    counts = {"files": len(files), "inserted": 0, "updated": 0, "unchanged": 0, "skipped": 0}

    def skip(msg: str) -> None:
        counts["skipped"] += 1
        warn(msg)

    with closing(connect(db, journal)) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            if rebuild:
                con.execute("DELETE FROM runs")
            for i, (f, rec) in enumerate(results.iter_runs(files, skip)):
                if _fail_after is not None and i >= _fail_after:
                    raise RuntimeError("simulated crash during ingest")
                row = row_of(rec, _rel(f))
                old = con.execute("SELECT json FROM runs WHERE run_id = ?", (rec.run_id,)).fetchone()
                if old is not None and old["json"] == row[-1]:
                    counts["unchanged"] += 1
                    continue
                con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", row)
                counts["updated" if old is not None else "inserted"] += 1
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return counts


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def load(db: Path = DB, journal: str = "auto") -> list[StoredRun]:
    with closing(connect(db, journal)) as con:
        return [StoredRun.from_dict(json.loads(r["json"]))
                for r in con.execute("SELECT json FROM runs ORDER BY created, run_id")]


# ------------------------------------------------------------------ compare

def select(runs: list[StoredRun], key: str) -> tuple[str, list[StoredRun]]:
    """Runs matching `key`: a sweep_id prefix, a harness git sha prefix, or a variant name (tried in
    that order; the first kind that matches wins). Returns (kind, runs)."""
    sweeps = [r for r in runs if str(r.sweep_id or "").startswith(key)]
    if sweeps:
        return "sweep", sweeps
    git = [r for r in runs if str(r.environment.harness_git or "").startswith(key)]
    if git and len(key) >= 4:
        return "git", git
    var = [r for r in runs if r.variant == key]
    if var:
        return "variant", var
    return "none", []


def _card(r: StoredRun) -> str:
    return r.card(unknown="?")


def _latest_per(runs: list[StoredRun], key) -> dict[Any, StoredRun]:
    out: dict[Any, StoredRun] = {}
    for r in sorted(runs, key=lambda r: (r.created or "", r.run_id)):
        if r.status == "ok" and r.timing.step_s_median:
            out[key(r)] = r
    return out


def rel_noise(r: StoredRun) -> float:
    """Relative noise of a run's median: IQR / median (0 when unknown)."""
    med, iqr = r.timing.step_s_median, r.timing.step_s_iqr
    return float(iqr) / float(med) if med and iqr is not None else 0.0


def compare(runs: list[StoredRun], a: str, b: str, threshold: float = THRESHOLD) -> dict[str, Any]:
    """Ratio B/A of step_s_median per (system, card, variant) (or per (system, card) when A and B are
    variants), its noise (relative IQRs added in quadrature), and a regression flag when the ratio is
    beyond 1 + threshold AND beyond the noise. Only runs of the same system on the same card are
    paired: never across cards."""
    ka, ra = select(runs, a)
    kb, rb = select(runs, b)
    if not ra or not rb:
        missing = a if not ra else b
        return {"error": f"nothing matches {missing!r} (a sweep_id prefix, a git sha prefix or a variant)",
                "rows": []}
    if ka == "variant" and kb == "variant":
        key = lambda r: (r.system, _card(r), "")  # noqa: E731
        # variant vs variant: within the latest sweep that has both, per system and card
        pa, pb = {}, {}
        both = {r.sweep_id for r in ra} & {r.sweep_id for r in rb}
        for sweep in sorted(both):
            pa.update(_latest_per([r for r in ra if r.sweep_id == sweep], key))
            pb.update(_latest_per([r for r in rb if r.sweep_id == sweep], key))
    else:
        key = lambda r: (r.system, _card(r), r.variant)  # noqa: E731
        pa, pb = _latest_per(ra, key), _latest_per(rb, key)
    rows = []
    for k in sorted(set(pa) & set(pb)):
        x, y = pa[k], pb[k]
        ma, mb = x.timing.step_s_median, y.timing.step_s_median
        ratio = mb / ma
        noise = math.hypot(rel_noise(x), rel_noise(y)) * ratio
        regression = ratio > 1 + threshold and ratio - noise > 1
        improvement = ratio < 1 - threshold and ratio + noise < 1
        rows.append({"system": k[0], "card": k[1], "variant": k[2] or f"{x.variant}->{y.variant}",
                     "a_run": x.run_id, "b_run": y.run_id, "a_step_s": ma, "b_step_s": mb,
                     "ratio": ratio, "noise": noise,
                     "flag": "REGRESSION" if regression else "improved" if improvement else ""})
    only = sorted({k for k in set(pa) ^ set(pb)})
    return {"a": {"key": a, "kind": ka, "runs": len(ra)}, "b": {"key": b, "kind": kb, "runs": len(rb)},
            "threshold": threshold, "rows": rows, "unpaired": [list(k) for k in only]}


def format_compare(res: dict[str, Any]) -> str:
    if res.get("error"):
        return res["error"]
    a, b = res["a"], res["b"]
    lines = [f"A = {a['kind']} {a['key']} ({a['runs']} runs)   B = {b['kind']} {b['key']} ({b['runs']} runs)   "
             f"ratio = B/A of median s/step; regression when > {1 + res['threshold']:.2f} beyond noise"]
    head = f"{'system':8} {'card':24} {'variant':20} {'A ms':>9} {'B ms':>9} {'B/A':>7} {'noise':>7}  flag"
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        lines.append(f"{r['system']:8} {r['card'][:24]:24} {r['variant'][:20]:20} {r['a_step_s'] * 1e3:9.2f} "
                     f"{r['b_step_s'] * 1e3:9.2f} {r['ratio']:7.3f} {'±' + format(r['noise'], '.3f'):>7}  {r['flag']}")
    if not res["rows"]:
        lines.append("(no (system, card, variant) present in both A and B)")
    for k in res.get("unpaired", []):
        lines.append(f"unpaired: {' / '.join(x for x in k if x)}")
    return "\n".join(lines)


def _ingest_cmd(a) -> int:
    paths = [Path(p) for p in a.paths] if a.paths else None
    c = ingest(paths, db=Path(a.db), runs_dir=Path(a.runs), rebuild=a.rebuild, journal=a.journal)
    print(f"{a.db}: {c['inserted']} inserted, {c['updated']} updated, {c['unchanged']} unchanged, "
          f"{c['skipped']} skipped of {c['files']} files")
    return 0


def _compare_cmd(a) -> int:
    if not a.no_ingest:
        ingest(db=Path(a.db), runs_dir=Path(a.runs), journal=a.journal)
    res = compare(load(Path(a.db), a.journal), a.a, a.b, threshold=a.threshold)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(format_compare(res))
    if res.get("error"):
        return 2
    return 1 if a.fail_on_regression and any(r["flag"] == "REGRESSION" for r in res["rows"]) else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("ingest", help="ingest results/runs/*.json into results/results.sqlite")
    p.add_argument("paths", nargs="*", help="results JSONs (default: all of results/runs)")
    p.add_argument("--db", default=str(DB))
    p.add_argument("--runs", default=str(RUNS), help="directory of results JSONs (when no FILES are given)")
    p.add_argument("--rebuild", action="store_true", help="empty the database first (same transaction)")
    p.add_argument("--journal", choices=JOURNALS, default="auto", help="SQLite journal: auto (WAL, or the rollback journal on NFS/Lustre/GPFS/...), wal, delete")
    p.set_defaults(func=_ingest_cmd)
    c = subparsers.add_parser("compare", help="step-time ratios B/A between sweeps, git commits or variants")
    c.add_argument("a", help="sweep_id prefix | harness git sha prefix | variant")
    c.add_argument("b", help="sweep_id prefix | harness git sha prefix | variant")
    c.add_argument("--db", default=str(DB))
    c.add_argument("--runs", default=str(RUNS), help="directory of results JSONs ingested first")
    c.add_argument("--threshold", type=float, default=THRESHOLD, help="regression threshold (default 0.10)")
    c.add_argument("--no-ingest", action="store_true", help="do not ingest results/runs first")
    c.add_argument("--json", action="store_true")
    c.add_argument("--journal", choices=JOURNALS, default="auto", help="SQLite journal: auto (WAL, or the rollback journal on NFS/Lustre/GPFS/...), wal, delete")
    c.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression is flagged")
    c.set_defaults(func=_compare_cmd)
