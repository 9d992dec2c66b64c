"""The samples of the training-equivalence test (docs/accuracy.md, "Training equivalence"): the
variant's seeds from the sweep, the baseline's from the calibration at the system's gate_steps,
and the typed `accuracy.equivalence` part that records the judgement."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from harness.core.records import Equivalence, RunRecord, StoredRun
from harness.judge import equivalence as eq
from harness.judge.calibration import CALIBRATION, calibration_path
from harness.judge.processes import METRICS


def gate_steps(spec: dict[str, Any]) -> int | None:
    """The system's training length for the equivalence test (system.yaml `gate_steps`): where
    the baseline's validation force RMSE is <= 30 % of the untrained model's. None: not calibrated."""
    g = (spec or {}).get("gate_steps")
    return int(g) if g is not None else None


def samples(dps: Iterable[tuple[int, dict]]) -> tuple[list[int], dict[str, list[float | None]]]:
    """(seeds in order, metric -> values in that order) from (seed, dp test) pairs; a seed's first wins."""
    seen: dict[int, dict] = {}
    for seed, dp in dps:
        seen.setdefault(int(seed), dp)
    seeds = sorted(seen)
    return seeds, {m: [seen[s].get(m) for s in seeds] for m in METRICS}


def variant_samples(rec: RunRecord, dp: dict, peers: Iterable[StoredRun]) -> list[tuple[int, dict]]:
    """This run's dp test and those of the same variant in the same sweep (system, steps and
    device kind alike) with other seeds: `bench --seeds` runs them one after another."""
    out = [(rec.run.seed, dp)]
    for r in peers:
        if (r.variant == rec.run.variant.name and r.system == rec.run.system.name and r.sweep_id == rec.run.sweep_id
                and r.steps == rec.run.steps and r.device.kind == rec.run.device and r.status == "ok"
                and r.accuracy.dp_test and r.seed is not None and r.seed != rec.run.seed
                and (r.world_size or 1) == rec.run.gpus):
            out.append((int(r.seed), r.accuracy.dp_test))
    return out


def baseline_samples(rec: RunRecord, peers: Iterable[StoredRun], directory: Path = CALIBRATION,
                     current: tuple[int, dict] | None = None) -> tuple[list[tuple[int, dict]], str]:
    """The baseline's float64 calibration seeds at exactly (system, device, steps); without such a
    file, the sweep's own baseline runs of its seeds (same conditions, measured side by side).
    current: (seed, dp test) of the baseline this run is judged against: it is one of those runs,
    but the gate holds it as a record of this sweep's cell, not among the stored peers."""
    path = calibration_path(rec.run.system.name, rec.run.device, rec.run.steps, directory)
    if path.is_file():
        return calibration_samples(path), path.name
    own = [(int(r.seed), r.accuracy.dp_test) for r in peers
           if r.variant == "baseline" and r.system == rec.run.system.name and r.sweep_id == rec.run.sweep_id
           and r.steps == rec.run.steps and r.device.kind == rec.run.device and r.status == "ok"
           and r.accuracy.dp_test and r.seed is not None and (r.world_size or 1) == 1]
    if current is not None and current[0] is not None and current[1] and all(sd != current[0] for sd, _ in own):
        own.append((int(current[0]), current[1]))
    return own, f"the baseline runs of sweep {rec.run.sweep_id} (no {path.name})"


def training_equivalence(rec: RunRecord, dp: dict, peers: list[StoredRun], directory: Path = CALIBRATION,
                         planned: list[int] | None = None,
                         baseline: tuple[int, dict] | None = None) -> Equivalence:
    """The equivalence part for a reduced-precision run whose dp test is `dp`. verdict None (and
    the gate keeps its single-run dp-test check) until gate_steps is calibrated, the run is at
    gate_steps and both sides have enough seeds. planned: the sweep's seeds in order (bench
    --seeds); a run of an earlier one is `pending`, the last seed's run holds the verdict."""
    steps, g = rec.run.steps, gate_steps(rec.run.system.spec)
    base = Equivalence(steps=steps, gate_steps=g, alpha=eq.ALPHA)
    if g is None:
        base.detail = (f"not calibrated: systems/{rec.run.system.name}/system.yaml has no gate_steps "
                       "(docs/accuracy.md: how to determine it)")
        return base
    if steps != g:
        base.detail = f"not judged: run at {steps} steps, {rec.run.system.name}'s gate_steps is {g}"
        return base
    if planned and rec.run.seed in planned and rec.run.seed != planned[-1]:
        base.detail = (f"pending: seed {rec.run.seed} of {','.join(map(str, planned))}; the run of seed "
                       f"{planned[-1]} holds the verdict")
        return base
    vs = variant_samples(rec, dp, peers)
    bs, source = baseline_samples(rec, peers, directory, baseline)
    frames = {int(d.get("numb_test", -1)) for _, d in vs + bs}
    if len(frames) > 1:
        base.detail = f"not judged: dp test frame counts differ between the samples {sorted(frames)}"
        return base
    v_seeds, v = samples(vs)
    b_seeds, b = samples(bs)
    res = eq.judge(v, b)
    base.verdict, base.detail, base.calibration = res.verdict, res.detail, source
    base.seeds_variant, base.seeds_baseline = v_seeds, b_seeds
    base.metrics = metrics_record(res)
    return base


def metrics_record(res: eq.EquivalenceResult) -> dict[str, dict] | None:
    """The judgement per metric as a record holds it (accuracy.equivalence.metrics, and the
    `equivalence` command's record)."""
    return {m.metric: {"n_variant": m.n_variant, "n_baseline": m.n_baseline,
                       "mean_variant": m.mean_variant, "mean_baseline": m.mean_baseline,
                       "diff": m.diff, "ci90": list(m.ci90), "margin": m.margin,
                       "margin_rel": m.margin_rel, "p_lower": m.p_lower, "p_upper": m.p_upper,
                       "p_tost": m.p_tost, "equivalent": m.equivalent, "not_worse": m.not_worse,
                       "outcome": m.outcome, "seeds_needed": m.seeds_needed}
            for m in res.metrics.values()} or None


def calibration_samples(path: Path) -> list[tuple[int, dict]]:
    """(seed, dp test) of a calibration file's float64 baseline runs."""
    cal = json.loads(path.read_text())
    return [(int(r["seed"]), r["dp_test"]) for r in cal.get("runs", {}).get("float64", []) if r.get("dp_test")]
