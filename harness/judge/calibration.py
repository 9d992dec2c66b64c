"""Seed-spread calibration: statistics of dp-test errors over seeds, the tolerance derived from
them, the calibration files, and the dp-test verdict against the baseline."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any
import numpy as np

from harness.core.paths import ROOT
from harness.judge.processes import METRICS
from harness.judge.parity import relative


CALIBRATION = ROOT / "results" / "calibration"
CAL_SCHEMA = "dpharness.calibration/1"


def calibration_path(system: str, device: str, steps: int, directory: Path = CALIBRATION,
                     reference: str = "baseline") -> Path:
    """The file of (system, device, steps)'s calibration; one trained by another float64 variant
    than upstream's baseline (calibrate --reference, a stand-in where upstream's length does not
    fit a GPU call) carries that variant's name, so the gate never reads it as upstream's."""
    tail = "" if reference == "baseline" else f"-{reference}"
    return directory / f"{system}-{device}-{int(steps)}{tail}.json"


def find_calibration(system: str, device: str, steps: int,
                     directory: Path = CALIBRATION) -> tuple[dict | None, str]:
    """The calibration for (system, device, steps), else the nearest steps for system/device."""
    exact = calibration_path(system, device, steps, directory)
    if exact.is_file():
        return json.loads(exact.read_text()), f"calibration {exact.name}"
    cands = []
    for p in directory.glob(f"{system}-{device}-*.json"):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (d.get("schema") == CAL_SCHEMA and d.get("system") == system and d.get("device") == device
                and d.get("reference", "baseline") == "baseline"):  # a stand-in's file judges nothing
            cands.append((abs(int(d["steps"]) - int(steps)), int(d["steps"]), p.name, d))
    if not cands:
        return None, f"no seed-spread calibration for {system}"
    cands.sort(key=lambda c: c[:2])
    _, s, name, d = cands[0]
    return d, f"calibration {name} (nearest: {s} steps, none at {steps})"


def summarise(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


# Lower 5 % quantiles of chi-square with k degrees of freedom (k = seeds - 1), for the upper
# confidence bound on the seed-to-seed std; beyond the table the Wilson-Hilferty form is within 1 %.
_CHI2_LOWER_05 = {1: 0.003932, 2: 0.1026, 3: 0.3518, 4: 0.7107, 5: 1.1455, 6: 1.6354, 7: 2.1673,
                  8: 2.7326, 9: 3.3251, 10: 3.9403, 11: 4.5748, 12: 5.2260, 13: 5.8919, 14: 6.5706,
                  15: 7.2609}


# Two-sided normal quantile for a 1 % false-fail rate per metric.
GATE_Z = 2.576


def chi2_lower_05(k: int) -> float:
    if k in _CHI2_LOWER_05:
        return _CHI2_LOWER_05[k]
    return k * (1.0 - 2.0 / (9.0 * k) - 1.6449 * math.sqrt(2.0 / (9.0 * k))) ** 3


def std_upper_bound(st: dict[str, float]) -> float:
    """One-sided 95 % upper confidence bound on the seed-to-seed std, from n seeds: a spread
    estimated from 3 seeds can be 4x too small, and a gate built on it fails correct variants."""
    n = int(st["n"])
    if n < 2:
        return math.inf
    return st["std"] * math.sqrt((n - 1) / chi2_lower_05(n - 1))


def derive_threshold(st: dict[str, float], offset: float = 0.0) -> float:
    """Relative tolerance of a dp-test metric from its seed spread.

    The variant and the baseline are two independent draws of one training (other data order,
    other rounding), so their difference has std sqrt(2)*sigma; the gate admits
    GATE_Z * sqrt(2) * sigma_upper (sigma_upper: std_upper_bound), i.e. a correct variant fails
    at most ~1 % of the time per metric when the calibration's seeds are honest.  Never tighter
    than the observed range (max - min) / mean, nor than `offset` (reduced-precision classes
    only): the largest same-seed relative difference between the class's reference variant
    (upstream's fp32 override) and the baseline, i.e. what the allowed override itself changes."""
    if st["mean"] <= 0:
        return math.inf
    stat = GATE_Z * math.sqrt(2.0) * std_upper_bound(st) / st["mean"]
    return max(stat, (st["max"] - st["min"]) / st["mean"], offset)


RULE = ("rel_tol[class][metric] = max(2.576*sqrt(2)*std_upper/mean, (max-min)/mean over seeds "
        "[, max same-seed |x_class - x_float64| / x_float64 for reduced-precision classes]); "
        "std_upper = std*sqrt((n-1)/chi2_0.05(n-1)), the 95 % upper bound on the seed std")


def rederive(cal: dict[str, Any]) -> dict[str, Any]:
    """The calibration with thresholds recomputed from its own recorded runs by this rule (so a
    rule change never needs the GPU runs again)."""
    fresh = build_calibration(cal["system"], cal["device"], cal["steps"], cal["runs"], cal.get("numb_test", 0),
                              cal.get("reference", "baseline"))
    fresh["created"] = cal.get("created", fresh["created"])
    fresh["rederived"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return fresh


def build_calibration(system: str, device: str, steps: int, runs: dict[str, list[dict]],
                      frames: int, reference: str = "baseline") -> dict[str, Any]:
    """runs: class -> [{"seed", "variant", "dp_test"}]. Stats and thresholds per class and metric.
    reference: the float64 variant that trained the float64 seeds (upstream's baseline unless
    calibrate --reference named a stand-in)."""
    stats: dict[str, dict] = {}
    thresholds: dict[str, dict] = {}
    ref = {r["seed"]: r["dp_test"] for r in runs.get("float64", []) if r.get("dp_test")}
    for cls, rs in runs.items():
        stats[cls], thresholds[cls] = {}, {}
        for m in METRICS:
            vals = [r["dp_test"][m] for r in rs if r.get("dp_test") and r["dp_test"].get(m) is not None]
            if len(vals) < 2:
                continue
            st = summarise(vals)
            offset = 0.0
            if cls != "float64":
                offs = [relative(abs(r["dp_test"][m] - ref[r["seed"]][m]), abs(ref[r["seed"]][m]))
                        for r in rs if r["seed"] in ref and r["dp_test"].get(m) is not None
                        and ref[r["seed"]].get(m) is not None]
                if offs:
                    offset = max(offs)
                    st["max_rel_offset_vs_float64"] = offset
            stats[cls][m] = st
            thresholds[cls][m] = derive_threshold(st, offset)
    return {
        "schema": CAL_SCHEMA, "system": system, "device": device, "steps": int(steps),
        "numb_test": int(frames), "seeds": sorted({r["seed"] for rs in runs.values() for r in rs}),
        "reference": reference,
        "rule": RULE,
        "runs": runs, "stats": stats, "thresholds": thresholds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def dp_test_verdict(var: dict, base: dict, cal: dict, cls: str) -> tuple[list[str], str]:
    """Reasons the variant's dp test differs from the baseline's by more than the calibrated
    seed spread of its class (empty: pass), and a note on which thresholds were used."""
    th = cal.get("thresholds") or {}
    note = ""
    if cls not in th:
        present = [c for c in ("float32", "float64") if c in th]
        if not present:
            return [], "calibration has no thresholds"
        used = max(present, key=lambda c: max(th[c].values(), default=0))
        note = f"class {cls} uncalibrated, using {used} thresholds"
        cls = used
    bad = []
    for m in METRICS:
        a, b, t = var.get(m), base.get(m), th[cls].get(m)
        if a is None or b is None or t is None:
            continue
        r = relative(abs(a - b), abs(b))
        if not r <= t:
            bad.append(f"dp test {m} {a:.4g} vs baseline {b:.4g} (rel {r:.2e} > seed spread {t:.2e})")
    return bad, note
