"""The accuracy gate, the stage itself (ASC22 rule: an optimisation must give the same test results as the
reference). See docs/accuracy.md.

For every successful training run of a sweep, ``stage()`` returns a callable that

1. runs upstream's ``dp test`` in the run's backend (TF and JAX checkpoints are frozen first) on
   the run's checkpoint and the system's validation data, always with the *unpatched baseline*
   build (the judge is never patched by the variant), and parses energy RMSE/atom, force RMSE and
   virial RMSE/atom;
2. for a variant, compares those with the sweep's baseline run (same system, seed, steps) within
   a relative tolerance derived from a seed-spread calibration file
   (results/calibration/<system>-<device>-<steps>.json, written by ``dpharness calibrate``);
3. checks same-weights parity: the *baseline's* checkpoint evaluated (energy, force, virial) by
   the baseline build and by the variant's build + patch modules + input overrides, compared
   within a per-accuracy-class tolerance -- deterministic, independent of training noise;
4. checks one training step from those same weights on one fixed frame (gradients and the Adam
   update), which catches a wrong backward.

The verdict is "baseline" for the reference run itself, else "pass" or "fail" (with ``strict``
False, a variant that cannot be judged at all -- no baseline run, or no parity possible and no
calibration, or frames upstream's own dp test runs out of memory on -- gets verdict None and says
why). The gate never raises: a crash is a "fail" whose ``detail`` names the cause.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from harness.core.records import AccuracyResult, RunRecord, StoredRun
from harness.judge.processes import (DEFAULT_TEST_FRAMES, UpstreamOutOfMemory, baseline_tree, finish_dp_test,
                                    format_dp_test, run_dp_test, start_dp_test, start_v2_dp_test,
                                    stop_gates)
from harness.judge.parity import TOLERANCE, compare_eval, compare_step, finish_parity_eval, load_reference, parity_verdict, start_parity_eval, start_reference
from harness.judge.calibration import CALIBRATION, dp_test_verdict, find_calibration
from harness.judge.seeds import training_equivalence


# backends whose model the same-weights parity can load the baseline's weights into: pt directly,
# pt-expt through upstream's serialisation (parity_eval --backend pt-expt)
PARITY_BACKENDS = ("pt", "pt-expt")


def _pt_expt_parity(rec: RunRecord, base: RunRecord, dp_proc, nframes: int, tree: Path, out: Path):
    """dp test result and three same-weights evaluations for a pt-expt run: the PyTorch baseline's
    reference, the variant's (its tree and modules, --backend pt-expt) and upstream's unpatched
    pt_expt code on the variant's input (skipped, i.e. the variant's own, when the variant is
    upstream's code alone: same tree, no modules)."""
    v, s, device = rec.run.variant, rec.run.system, rec.run.device
    var_proc = start_parity_eval(v.tree, v.modules, v.env, v.name, rec.train.input_path, base.train.checkpoint,
                                 s.validation[0], s.train[0], out, device, backend="pt-expt")
    own = Path(v.tree).resolve() == Path(tree).resolve() and not v.modules
    ref_out = out.with_name("parity_reference_pt_expt.npz")
    ref_proc = None if own else start_parity_eval(
        tree, (), {}, "pt-expt-reference", rec.train.input_path, base.train.checkpoint, s.validation[0],
        s.train[0], ref_out, device, backend="pt-expt")
    pt_ref = load_reference(base, baseline_tree([base]))
    dp = finish_dp_test(*dp_proc, nframes)
    var_res = finish_parity_eval(*var_proc, out)
    expt_res = var_res if ref_proc is None else finish_parity_eval(*ref_proc, ref_out)
    if var_res[0].get("load") == "ok" and expt_res[0].get("load") != "ok":
        raise RuntimeError(f"unpatched pt-expt parity reference: {expt_res[0].get('load')}")
    return dp, pt_ref, var_res, expt_res


def _find_baseline(rec: RunRecord, previous: list[RunRecord]) -> RunRecord | None:
    """The sweep's baseline run of the same system and steps, of the same seed where the sweep
    has one (else its first seed's: `bench --seeds --upstream-once` trains upstream on the first
    seed only; same-weights parity compares code on the same weights, so any seed's baseline is
    a reference, and the gate says which it used); of those, the one with the same GPU count (an
    N-GPU run trains on N times the frames, so it is judged against the N-GPU baseline when the
    sweep has one)."""
    cands = [r for r in previous
             if r is not rec and r.run.variant.name == "baseline" and r.run.system.name == rec.run.system.name
             and r.run.steps == rec.run.steps
             and r.run.sweep_id == rec.run.sweep_id and r.train.status == "ok"
             and r.train.checkpoint is not None]
    cands = ([r for r in cands if r.run.seed == rec.run.seed]
             or [r for r in cands if r.run.seed == cands[0].run.seed])  # the first seed's, every GPU count
    same = [r for r in cands if r.run.gpus == rec.run.gpus]
    return (same or cands or [None])[-1]


def evaluate(rec: RunRecord, previous: list[RunRecord], *, strict: bool = False,
             frames: int | None = None, calibration_dir: Path = CALIBRATION,
             peers: Iterable[StoredRun] = (), planned: list[int] | None = None) -> AccuracyResult:
    """The gate for one run (may raise; `stage` wraps it). peers: stored runs of the same sweep
    from earlier seeds (`bench --seeds`, in that order: `planned`), the variant's samples of the
    equivalence test."""
    device = rec.run.device
    nframes = DEFAULT_TEST_FRAMES.get(device, 0) if frames is None else int(frames)
    tree = baseline_tree(previous + ([rec] if rec.run.variant.name == "baseline" else []))
    acc_dir = Path(rec.train.work_dir) / "accuracy"
    if rec.train.checkpoint is None:
        raise RuntimeError("training left no checkpoint")
    v = rec.run.variant
    if v.backend == "tf-v2":  # the TF v2 family is judged by its own dp (freeze + test of the .pb)
        dp_proc = start_v2_dp_test(rec.train.checkpoint, rec.run.system.validation, acc_dir, device, nframes,
                                   Path(v.tree))
    else:
        dp_proc = start_dp_test(rec.train.checkpoint, rec.run.system.validation, acc_dir, device, nframes, tree,
                                v.backend, convert_to_pt=v.backend in ("jax", "tf2") and not v.upstream_only)
    # A baseline on N > 1 GPUs trains on N times the frames: with a 1-GPU baseline in the sweep it
    # is judged like a variant (same code, so parity is exact; dp test against the seed spread)
    # rather than taken as a reference.
    multi_gpu_baseline = (rec.run.variant.name == "baseline" and rec.run.gpus > 1
                          and _find_baseline(rec, previous) is not None)
    if rec.run.variant.name == "baseline" and not multi_gpu_baseline:
        # the reference of every variant's same-weights parity, computed once per sweep baseline
        ref_proc, ref_log, ref_out = start_reference(rec, tree)
        dp = finish_dp_test(*dp_proc, nframes)
        meta, _ = finish_parity_eval(ref_proc, ref_log, ref_out, upstream=True)
        if meta.get("load") != "ok":
            raise RuntimeError(f"baseline parity reference: {meta.get('load')}")
        return AccuracyResult(dp_test=dp, parity=None, verdict="baseline",
                              detail=f"reference run; {format_dp_test(dp)}")
    base = _find_baseline(rec, previous)
    if base is None:
        dp = finish_dp_test(*dp_proc, nframes)
        why = (f"no baseline run of sweep {rec.run.sweep_id} with the same system and steps "
               "to compare with")
        return AccuracyResult(dp_test=dp, verdict="fail" if strict else None,
                              detail=f"not judged: {why}; {format_dp_test(dp)}")
    cls = rec.run.variant.accuracy_class
    s = rec.run.system
    out = acc_dir / "parity_variant.npz"
    reasons: list[str] = []
    notes: list[str] = []
    if base.run.seed != rec.run.seed:
        notes.append(f"judged against the sweep's baseline of seed {base.run.seed} (no baseline run of "
                     f"this run's seed {rec.run.seed})")
    parity: dict[str, Any] | None = None
    if v.backend not in PARITY_BACKENDS:
        # parity loads the baseline's PyTorch weights into the variant's model: for another backend
        # that would only re-test PyTorch code, so the judge there is dp test against the seed spread
        dp = finish_dp_test(*dp_proc, nframes)
        var_meta = {"load": f"not applicable to the {v.backend} backend"}
        ref_meta = {"load": "ok"}
    elif v.backend == "pt-expt":
        dp, (ref_meta, ref), (var_meta, var), (expt_meta, expt_ref) = _pt_expt_parity(
            rec, base, dp_proc, nframes, tree, out)
    else:
        var_proc = start_parity_eval(v.tree, v.modules, v.env, v.name, rec.train.input_path,
                                     base.train.checkpoint, s.validation[0], s.train[0], out, device)
        ref_meta, ref = load_reference(base, baseline_tree([base]))
        dp = finish_dp_test(*dp_proc, nframes)
        var_meta, var = finish_parity_eval(*var_proc, out)
    if ref_meta.get("load") != "ok":
        raise RuntimeError(f"baseline parity reference: {ref_meta.get('load')}")
    if v.backend not in PARITY_BACKENDS:
        notes.append(f"same-weights parity {var_meta['load']}")
    elif var_meta.get("load") != "ok":
        notes.append("same-weights parity not applicable (the variant's parameters differ in shape: "
                     f"{str(var_meta.get('load'))[:120]})")
    elif v.backend == "pt-expt":
        # the step and the forward against upstream's unpatched pt_expt code (same backend, same
        # input); the forward also against the PyTorch baseline's (pt_expt's loss differs from
        # pt's by ~1e-8 relative on the same batch, so pt's step is no reference for it)
        parity = compare_eval(expt_ref, var, TOLERANCE[cls])
        parity["class"] = cls
        parity.update(compare_step(expt_ref, var, TOLERANCE[cls]))
        parity["reference"] = "unpatched pt-expt" + (" (the variant itself: it is upstream's code)"
                                                      if expt_meta is var_meta else "")
        parity["vs_pt"] = compare_eval(ref, var, TOLERANCE[cls])
        reasons += parity_verdict(parity, cls)
        reasons += [f"vs the PyTorch baseline: {r}" for r in parity_verdict(parity["vs_pt"], cls)]
        notes.append(f"pt-expt parity through pt_expt's own model/loss (eager; a compiled graph is judged "
                     f"by dp test); forward vs the PyTorch baseline F rel {parity['vs_pt']['max_rel_f']:.1e}")
    else:
        parity = compare_eval(ref, var, TOLERANCE[cls])
        parity["class"] = cls
        parity.update(compare_step(ref, var, TOLERANCE[cls]))
        if isinstance(var_meta.get("step"), str):
            notes.append(var_meta["step"])
        reasons += parity_verdict(parity, cls)
    base_dp = base.accuracy.dp_test if base.accuracy and base.accuracy.dp_test else None
    if base_dp is None:
        base_dp = run_dp_test(base.train.checkpoint, s.validation, Path(base.train.work_dir) / "accuracy",
                              device, nframes, tree)
    cal, cal_note = find_calibration(s.name, device, rec.run.steps, calibration_dir)
    notes.append(cal_note)
    # reduced precision: n seeds of the variant against the baseline's seeds by TOST, when the
    # system's gate_steps is calibrated and both sides have the seeds; else today's check
    equiv = (training_equivalence(rec, dp, list(peers), calibration_dir, planned, (base.run.seed, base_dp))
             if cls != "float64" and rec.run.gpus == 1 else None)
    if equiv is not None and equiv.verdict is not None:
        if equiv.verdict == "fail":
            reasons.append(equiv.detail)
        else:
            notes.append(equiv.detail)
    elif equiv is not None and (equiv.detail or "").startswith("pending"):
        notes.append(f"training equivalence {equiv.detail}")  # no single-run check: the test is coming
    elif cal is not None:
        if equiv is not None:
            notes.append(f"training equivalence {equiv.detail}; single-run dp test vs seed spread instead")
        bad, note = dp_test_verdict(dp, base_dp, cal, cls)
        reasons += bad
        if note:
            notes.append(note)
    elif equiv is not None:
        notes.append(f"training equivalence {equiv.detail}")
    judged = parity is not None or cal is not None or (equiv is not None and equiv.verdict is not None)
    if not judged:
        return AccuracyResult(dp_test=dp, parity=parity, verdict="fail" if strict else None, equivalence=equiv,
                              detail="not judged: " + "; ".join(notes) + f"; {format_dp_test(dp)}")
    if parity is not None:
        head = (f"parity F rel {parity['max_rel_f']:.1e} (tol {TOLERANCE[cls]:.0e}, {cls})"
                + (f", step {parity['step_update_max_rel']:.1e}" if parity.get("step_update_max_rel") is not None else ""))
    elif equiv is not None and equiv.verdict is not None:
        head = "training equivalence over seeds only"
    else:
        head = "dp test vs calibrated seed spread only"
    if reasons:
        return AccuracyResult(dp_test=dp, parity=parity, verdict="fail", equivalence=equiv,
                              detail="; ".join(reasons + notes))
    return AccuracyResult(dp_test=dp, parity=parity, verdict="pass", equivalence=equiv,
                          detail="; ".join([head] + notes))


def stage(strict: bool = False, frames: int | None = None, calibration_dir: Path = CALIBRATION,
          peers: list[StoredRun] | None = None,
          planned: list[int] | None = None) -> Callable[[RunRecord, list[RunRecord]], AccuracyResult]:
    """The accuracy stage bench.run calls after each successful training run. peers: a list the
    caller extends with each finished seed's stored runs (read when a gate runs)."""
    peers = [] if peers is None else peers
    baselines: list[RunRecord] = []  # the sweep's baseline runs from earlier benches (seeds) of this stage

    def accuracy_stage(rec: RunRecord, previous: list[RunRecord]) -> AccuracyResult:
        earlier = [b for b in baselines if b.run.sweep_id == rec.run.sweep_id and all(b is not r for r in previous)]
        if rec.run.variant.name == "baseline":
            baselines.append(rec)
        try:
            res = evaluate(rec, earlier + list(previous), strict=strict, frames=frames,
                           calibration_dir=calibration_dir, peers=list(peers), planned=planned)
            if rec.run.variant.name == "baseline" and res.verdict != "baseline":
                # a judged N-GPU baseline is still the parity reference of the sweep's N-GPU
                # variants: cache it now, before their gates may run concurrently
                load_reference(rec, baseline_tree(previous + [rec]))
            return res
        except UpstreamOutOfMemory as e:
            # upstream cannot evaluate frames this large here: no verdict either way, said so
            atoms = rec.run.system.atoms_per_frame
            return AccuracyResult(verdict="fail" if strict else None,
                                  detail=f"not judged: upstream cannot evaluate {atoms}-atom frames on this "
                                         f"{rec.run.device} device ({e})")
        except Exception as e:  # the gate must never crash the bench: a crash is a fail
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            return AccuracyResult(verdict="fail", detail=f"accuracy gate error: {msg}")

    accuracy_stage.stop = stop_gates  # bench calls it when the sweep is stopped mid-gate
    return accuracy_stage
