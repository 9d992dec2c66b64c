"""The CI regression job (`dpharness regress`): a short fixed CPU sweep on a tiny system, whose
same-run ratios are compared with the committed reference results/reference/cpu-regression.json.

Only ratios measured within one sweep on one machine are compared (variant/baseline step time), plus
the harness's own overhead (wall - steps x median step - start-up), with thresholds wide enough for
noisy 2-core CI machines. Absolute step times are recorded for information only."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.paths import ROOT
from harness.core.records import StoredRun
REFERENCE = ROOT / "results" / "reference" / "cpu-regression.json"
SCHEMA = "dpharness.cpu-regression/1"
VARIANTS = ("baseline", "fp32")
STEPS = 16
RATIO_FACTOR = 1.5  # variant/baseline ratio may move by up to x1.5 either way
OVERHEAD_FACTOR = 3.0  # overhead may grow to 3x reference + OVERHEAD_SLACK_S
OVERHEAD_SLACK_S = 10.0


def make_tiny_system(dest: Path, train_frames: int = 4, valid_frames: int = 2, source: str = "water") -> Path:
    """A reduced-size copy of the water system under dest: a few frames of upstream's data and a
    small se_e2_a model (same rcut/sel, narrow nets). Returns the system directory."""
    from harness.prepare import systems

    src = systems.load_system(source)
    systems.ensure_data(src, log=lambda m: print(m, file=sys.stderr))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    def cut(d_from: Path, d_to: Path, n: int) -> None:
        sets = sorted(p for p in d_from.glob("set.*") if p.is_dir())
        (d_to / "set.000").mkdir(parents=True, exist_ok=True)
        for f in ("type.raw", "type_map.raw"):
            if (d_from / f).is_file():
                shutil.copy(d_from / f, d_to / f)
        for arr in sets[0].glob("*.npy"):
            np.save(d_to / "set.000" / arr.name, np.load(arr)[:n])

    cut(src.train[0], dest / "data" / "train", train_frames)
    cut(src.validation[0], dest / "data" / "valid", valid_frames)
    inp = json.loads(json.dumps(src.input))
    inp["model"]["descriptor"].update({"neuron": [4, 8, 16], "axis_neuron": 4})
    inp["model"]["fitting_net"]["neuron"] = [16, 16, 16]
    inp["training"]["validation_data"]["numb_btch"] = 1
    (dest / "input.json").write_text(json.dumps(inp, indent=2))
    spec = {"name": "tiny", "description": f"{train_frames} frames of {source}, narrow se_e2_a (CI only)",
            "type_map": list(src.type_map), "atoms_per_frame": src.atoms_per_frame,
            "train": ["data/train"], "validation": ["data/valid"],
            "frames": {"train": train_frames, "validation": valid_frames},
            "provenance": {"source": "derived", "from": source}}
    import yaml

    (dest / "system.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def measure(rows: list[StoredRun]) -> dict[str, Any]:
    """Same-run ratios and overheads from the run records of one sweep (baseline first)."""
    by_v = {r.variant: r for r in rows}
    base = by_v.get("baseline")
    out: dict[str, Any] = {"variants": {}, "ratios": {}, "overhead_s": {}}
    for v, r in by_v.items():
        t = r.timing
        med = t.step_s_median
        out["variants"][v] = {"status": r.status, "step_s_median": med, "step_s_iqr": t.step_s_iqr,
                              "startup_s": t.startup_s, "wall_s": t.wall_s, "steps": r.steps}
        if med is not None and t.startup_s is not None:
            out["overhead_s"][v] = overhead_s(t.wall_s, r.steps, med, t.startup_s)
        if base and v != "baseline" and med and base.timing.step_s_median:
            out["ratios"][f"{v}/baseline"] = med / base.timing.step_s_median
    return out


def overhead_s(wall_s: float, steps: int, median_step_s: float, startup_s: float) -> float:
    """What the harness adds around training: wall - steps x median step - start-up."""
    return wall_s - steps * median_step_s - startup_s


def compare(cur: dict[str, Any], ref: dict[str, Any], ratio_factor: float = RATIO_FACTOR,
            overhead_factor: float = OVERHEAD_FACTOR, overhead_slack_s: float = OVERHEAD_SLACK_S) -> list[str]:
    """Clear regressions of `cur` against `ref` (empty list: none)."""
    problems = []
    for v, d in cur["variants"].items():
        if d["status"] != "ok":
            problems.append(f"{v}: run {d['status']}")
    for k, rr in (ref.get("ratios") or {}).items():
        c = cur["ratios"].get(k)
        if c is None:
            problems.append(f"{k}: no ratio measured (reference {rr:.3f})")
        elif not (rr / ratio_factor <= c <= rr * ratio_factor):
            problems.append(f"{k}: ratio {c:.3f} is outside x{ratio_factor} of the reference {rr:.3f} "
                            f"(allowed {rr / ratio_factor:.3f}..{rr * ratio_factor:.3f})")
    for v, ro in (ref.get("overhead_s") or {}).items():
        c = cur["overhead_s"].get(v)
        limit = overhead_factor * max(ro, 0.0) + overhead_slack_s
        if c is not None and c > limit:
            problems.append(f"{v}: harness overhead {c:.1f} s exceeds {limit:.1f} s "
                            f"({overhead_factor:g}x reference {ro:.1f} s + {overhead_slack_s:g} s)")
    return problems


def read_reference(path: Path) -> dict[str, Any]:
    """The committed reference; a truncated or foreign file is bad input (exit 2), not a traceback."""
    from harness.core.errors import UserError

    try:
        ref = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable regression reference ({e}); re-record it with --write-reference") from None
    if not isinstance(ref, dict) or not isinstance(ref.get("ratios"), dict):
        raise UserError(f"{path}: not a regression reference (no ratios); re-record it with --write-reference")
    return ref
