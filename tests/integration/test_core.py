"""Harness core: manifests, the strict diff applier, cached builds, inputs, timing, result
writing, bad-input handling, and one real short training run through the CLI."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.prepare import build
from harness.cli import main as cli
from harness.prepare import diffs
from harness.results import runs as results
from harness.run import timing
from harness.run import train
from harness.prepare import variants
from harness.core.errors import UserError
from harness.core.records import ALLOWED_OVERRIDES

REPO = Path(__file__).resolve().parents[2]


def _manifest(d: Path, name: str, **extra) -> Path:
    d = d / name
    d.mkdir(parents=True)
    body = {"name": name, "description": "test", "base": "baseline", "upstream": ["3.2.0"], "backend": "pt",
            **extra}
    import yaml

    (d / "manifest.yaml").write_text(yaml.safe_dump(body))
    return d


@pytest.fixture
def patches(tmp_path) -> Path:
    """A private patches dir holding the real baseline plus whatever a test adds."""
    p = tmp_path / "patches"
    shutil.copytree(REPO / "patches" / "baseline", p / "baseline")
    return p


# ---------------------------------------------------------------- manifests

def test_shipped_variants_load_and_only_use_allowed_overrides():
    names = variants.list_variant_names()
    assert {"baseline", "fp32", "tos", "fp32-tos"} <= set(names)
    for n in names:
        v = variants.load_variant(n)
        assert set(v.overrides) <= set(ALLOWED_OVERRIDES)
        assert variants.chain(n)[0].name == "baseline"


def test_chain_env_lets_a_variant_override_its_base():
    """fused's manifest turns the compiled whole step on; fused-predict (base fused) turns it off,
    fused-onthefly keeps it and adds its geometry knob."""
    fused = variants.chain_env(variants.chain("fused"))
    assert fused["DPH_FUSED_COMPILE_STEP"] == fused["DPH_FLAT_ADAM_COMPILE"] == "1"
    pred = variants.chain_env(variants.chain("fused-predict"))
    assert pred["DPH_FUSED_COMPILE_STEP"] == pred["DPH_FLAT_ADAM_COMPILE"] == "0"
    otf = variants.chain_env(variants.chain("fused-onthefly"))
    assert otf["DPH_FUSED_COMPILE_STEP"] == "1" and otf["DPH_GEOM"] == "onthefly"
    assert "DPH_FUSED_COMPILE_STEP" not in variants.chain_env(variants.chain("graph"))


def test_forbidden_override_is_rejected(patches):
    _manifest(patches, "cheat", overrides={"model/descriptor/rcut": 4.0})
    with pytest.raises(UserError, match="not allowed"):
        variants.load_variant("cheat", patches)


@pytest.mark.parametrize("body,msg", [
    ({"backend": "cuda"}, "backend"),
    ({"colour": "red"}, "unknown key"),
    ({"base": None}, "base"),
    ({"overrides": {"model/descriptor/precision": "float128"}}, "not one of"),
])
def test_bad_manifests_name_the_problem(patches, body, msg):
    _manifest(patches, "bad", **body)
    with pytest.raises(UserError, match=msg):
        variants.load_variant("bad", patches)


def test_base_cycle_is_detected(patches):
    _manifest(patches, "a", base="b")
    _manifest(patches, "b", base="a")
    with pytest.raises(UserError, match="cycle"):
        variants.chain("a", patches)


# ---------------------------------------------------------------- diffs

DIFF = """--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -1,3 +1,3 @@
 def f():
-    return 1
+    return 2
 # end
"""


def test_diff_applies_exactly(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("def f():\n    return 1\n# end\n")
    d = tmp_path / "0001.diff"
    d.write_text(DIFF)
    log: list[str] = []
    diffs.apply(d, tmp_path, log)
    assert (tmp_path / "pkg" / "mod.py").read_text() == "def f():\n    return 2\n# end\n"
    assert "0001.diff" in log[0]


def test_diff_conflict_names_file_and_hunk_and_changes_nothing(tmp_path):
    (tmp_path / "pkg").mkdir()
    original = "def f():\n    return 42\n# end\n"
    (tmp_path / "pkg" / "mod.py").write_text(original)
    d = tmp_path / "0001.diff"
    d.write_text(DIFF)
    with pytest.raises(UserError, match=r"0001\.diff: hunk #1 .* does not apply to pkg/mod\.py"):
        diffs.apply(d, tmp_path, [])
    assert (tmp_path / "pkg" / "mod.py").read_text() == original


# ---------------------------------------------------------------- builds

def test_build_is_cached_and_fixups_are_logged(tmp_path, patches):
    first = build.build_variant("baseline", build_dir=tmp_path / "b", patches_dir=patches)
    again = build.build_variant("baseline", build_dir=tmp_path / "b", patches_dir=patches)
    assert not first.cached and again.cached and first.tree == again.tree and first.hash == again.hash
    log = "\n".join(first.log)
    assert "CIBUILDWHEEL = 1 -> 0" in log and "libdeepmd_op_pt.so" in log and "sha256" in log
    assert "CIBUILDWHEEL = 0" in (first.tree / "deepmd/lib/run_config.ini").read_text()


def test_patch_conflict_fails_the_build_and_leaves_no_tree(tmp_path, patches):
    d = _manifest(patches, "conflict", diffs=["0001-bad.diff"])
    (d / "0001-bad.diff").write_text(
        "--- a/deepmd/pt/train/training.py\n+++ b/deepmd/pt/train/training.py\n"
        "@@ -1,2 +1,2 @@\n-this line is not in upstream\n+neither is this\n context that does not exist\n")
    with pytest.raises(UserError, match=r"0001-bad\.diff: hunk #1 .*deepmd/pt/train/training\.py"):
        build.build_variant("conflict", build_dir=tmp_path / "b", patches_dir=patches)
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(("conflict", ".tmp"))]


def test_a_diff_changes_the_tree_key_a_manifest_only_change_does_not(tmp_path, patches):
    from harness.prepare import upstream

    pin = upstream.default_pin()
    base = variants.chain("baseline", patches)
    _manifest(patches, "onlymanifest", overrides={"model/descriptor/type_one_side": True})
    d = _manifest(patches, "withdiff", diffs=["x.diff"])
    (d / "x.diff").write_text(DIFF)
    assert build.tree_hash(pin, variants.chain("onlymanifest", patches)) == build.tree_hash(pin, base)
    assert build.tree_hash(pin, variants.chain("withdiff", patches)) != build.tree_hash(pin, base)
    assert build.content_hash(pin, variants.chain("onlymanifest", patches)) != build.content_hash(pin, base)


def _build_in_child(args):
    bdir, pdir = args
    b = build.build_variant("baseline", build_dir=Path(bdir), patches_dir=Path(pdir))
    return str(b.tree)


def test_concurrent_builds_of_one_variant_give_one_valid_tree(tmp_path, patches):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        trees = pool.map(_build_in_child, [(str(tmp_path / "b"), str(patches))] * 2)
    assert trees[0] == trees[1]
    assert (Path(trees[0]) / "deepmd" / "main.py").is_file()
    assert list((Path(trees[0]) / "deepmd" / "__pycache__").glob(f"main.{sys.implementation.cache_tag}.pyc"))
    assert not list((tmp_path / "b").glob(".tmp-*"))


def test_a_built_tree_carries_its_bytecode_and_refuses_a_bad_diff(tmp_path):
    """Every child imports the tree's ~900 modules; with PYTHONDONTWRITEBYTECODE (CI's image)
    they were recompiled from source in each one. The build writes the bytecode, which must
    stay valid after the atomic rename (tracebacks name the final path) and be what imports read."""
    import importlib.util

    pkg = tmp_path / "tmp-tree" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def f():\n    raise ValueError('from the tree')\n")
    build._compile_tree(tmp_path / "tmp-tree")
    assert Path(importlib.util.cache_from_source(str(pkg / "__init__.py"))).is_file()
    final = tmp_path / "final"
    (tmp_path / "tmp-tree").rename(final)
    env = {**os.environ, "PYTHONPATH": str(final), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-v", "-c", "import pkg; pkg.f()"], env=env, capture_output=True, text=True)
    assert "ValueError: from the tree" in r.stderr
    assert f'File "{final / "pkg" / "__init__.py"}"' in r.stderr and "tmp-tree" not in r.stderr.split("Traceback")[-1]
    assert f"code object from '{final / 'pkg' / '__pycache__'}" in r.stderr  # read, not recompiled
    (final / "pkg" / "bad.py").write_text("def g(:\n")
    with pytest.raises(UserError, match=r"patched tree has syntax errors: pkg/bad.py:1"):
        build._compile_tree(final)


# ---------------------------------------------------------------- inputs, timing, records

def test_run_input_changes_only_allowed_settings_and_benchmark_knobs(tiny_system):
    from harness.prepare import systems

    s = systems.load_system(str(tiny_system))
    over = {"model/descriptor/precision": "float32", "model/descriptor/type_one_side": True}
    inp = train.make_input(s, over, steps=7, seed=3)
    assert inp["model"]["descriptor"]["precision"] == "float32"
    assert inp["model"]["descriptor"]["type_one_side"] is True
    assert inp["training"]["numb_steps"] == 7 and inp["training"]["seed"] == 3
    ref = train.make_input(s, {}, steps=7, seed=3)
    ref["model"]["descriptor"].update(precision="float32", type_one_side=True)
    assert ref == inp  # nothing else differs
    with pytest.raises(UserError):
        train.make_input(s, {"loss/start_pref_f": 1}, steps=7)


def test_steady_state_drops_warmup_and_the_last_interval():
    steps = [5.0] * 5 + [1.0, 1.0, 2.0, 3.0, 1.0] * 4 + [99.0]
    t = timing.steady_state(steps, "host", 1.0, 10.0)
    assert t.warmup_steps == 5 and t.steps_measured == 20
    assert t.step_s_median == 1.0 and t.step_s_q75 == 2.0 and t.step_s_iqr == 1.0


def test_result_file_is_never_half_written(tmp_path, monkeypatch):
    target = tmp_path / "r.json"

    def explode(obj, f, **kw):
        f.write('{"schema": "dpharness.run/1", "trunc')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.json, "dump", explode)
    with pytest.raises(OSError):
        results.atomic_write_json(target, {"a": 1})
    assert not target.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CLI: bad input and a real run

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("args,needle", [
    (["--system", "nosuch"], "unknown system"),
    (["--variant", "nosuch"], "unknown variant"),
    (["--device", "tpu"], "--device"),
    (["--steps", "1"], "--steps"),
])
def test_bad_bench_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    r = _cli("bench", "--results-dir", str(tmp_path / "res"), *args)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("dpharness: error:") and needle in err[0]
    assert not (tmp_path / "res").exists()


def test_device_cuda_without_gpu_is_rejected(tmp_path):
    from harness.core import environment

    if environment.cuda_available():
        pytest.skip("this machine has a GPU")
    r = _cli("bench", "--device", "cuda", "--results-dir", str(tmp_path / "res"))
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_short_real_training_through_the_cli_writes_complete_records(tiny_system, tmp_path, capsys):
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "fp32", "--steps", "8", "--device", "cpu",
                   "--no-accuracy", "--results-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "fp32" in out and "1.00x" in out
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*.json"))]
    assert [r["variant"] for r in sorted(recs, key=lambda r: r["variant"])] == ["baseline", "fp32"]
    assert len({r["sweep_id"] for r in recs}) == 1
    for r in recs:
        assert r["schema"] == "dpharness.run/1" and r["status"] == "ok" and r["error"] is None
        assert r["steps"] == 8 and r["device"]["kind"] == "cpu" and r["backend"] == "pt"
        assert r["timing"]["step_s_median"] > 0 and r["timing"]["steps_measured"] >= 1
        assert r["timing"]["wall_s"] > r["timing"]["step_s_median"]
        assert r["lcurve"] and "rmse_trn" in r["lcurve"]
        ckpt = tmp_path.parent / r["artifacts"]["checkpoint"] if not Path(r["artifacts"]["checkpoint"]).is_absolute() \
            else Path(r["artifacts"]["checkpoint"])
        assert ckpt.exists()
        assert "variant_hash" in r and "memory" in r and "gpu_peak_bytes" in r["memory"]
        # what of upstream's code did not run as written: the harness's own hooks, each with its reason
        by_target = {x["target"]: x for x in r["upstream_replaced"]}
        assert by_target["deepmd.pt.train.training.Trainer._write_checkpoint"]["by"] == "harness.child.launch"
        assert "deepmd.pt.train.training.Trainer.print_on_training" in by_target
        assert all(x["why"] for x in r["upstream_replaced"])
        assert not any(x["by"].startswith(("dpfast.", "patches/")) for x in r["upstream_replaced"])  # no variant code
    fp32 = next(r for r in recs if r["variant"] == "fp32")
    inp = json.loads(Path(fp32["artifacts"]["input"]).read_text())
    assert inp["model"]["descriptor"]["precision"] == "float32"


def test_concurrent_builds_from_threads_of_one_process_give_one_valid_tree(tmp_path, patches):
    """calibrate --jobs builds from several threads: temp dirs must not collide."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        built = list(pool.map(lambda _: build.build_variant("baseline", build_dir=tmp_path / "b",
                                                            patches_dir=patches), range(3)))
    assert len({b.tree for b in built}) == 1
    assert (built[0].tree / "deepmd" / "main.py").is_file()
    assert (built[0].tree / "deepmd" / "pt" / "train" / "training.py").is_file()
    assert not list((tmp_path / "b").glob(".tmp-*"))


# ---------------------------------------------------------------- deferred accuracy gates

def _fake_training(events: list[str]):
    """train.run_training stand-in: records the order of events, writes nothing heavy."""
    from harness.core.records import TrainResult

    def run_training(spec, progress=None):
        events.append(f"train {spec.variant.name}")
        wd = Path(spec.work_dir)
        wd.mkdir(parents=True, exist_ok=True)
        return TrainResult(status="ok", error=None, step_s=[0.01] * 20, clock="host", startup_s=1.0, wall_s=1.2,
                           gpu_peak_bytes=None, work_dir=wd, checkpoint=wd / "model.pt", lcurve=None,
                           input_path=wd / "input.json", log_path=wd / "train.log")

    return run_training


def _sweep_clock(monkeypatch) -> None:
    """The budget tests' sweep clock: time passes only by the (fake) runs' wall_s, so what starts
    depends on the guesses under test, not on how loaded the test machine is (a slow input check
    or build on a busy 2-core CI machine ate real seconds of a 70 s budget)."""
    import time as _time
    import types

    from harness.run import bench
    from harness.run import train

    now = [1000.0]
    inner = train.run_training

    def run_training(spec, progress=None):
        tr = inner(spec, progress)
        now[0] += tr.wall_s
        return tr

    monkeypatch.setattr(train, "run_training", run_training)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(monotonic=lambda: now[0], perf_counter=_time.perf_counter))


def test_gate_jobs_times_every_variant_before_any_variant_gate(tiny_system, tmp_path, monkeypatch):
    import threading
    import time as _time

    from harness.run import bench
    from harness.run import train
    from harness.core.records import AccuracyResult

    events: list[str] = []
    monkeypatch.setattr(train, "run_training", _fake_training(events))
    running, peak, lock = [0], [0], threading.Lock()

    def gate(rec, previous):
        name = rec.run.variant.name
        events.append(f"gate {name}")
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        _time.sleep(0.2)
        with lock:
            running[0] -= 1
        if name == "baseline":
            return AccuracyResult(verdict="baseline", detail="reference")
        assert any(p.run.variant.name == "baseline" and p.accuracy for p in previous)  # judged against it
        return AccuracyResult(verdict="pass", detail="ok")

    req = bench.BenchRequest(system=str(tiny_system), variants=["baseline", "fp32", "tos", "fp32-tos"], steps=20,
                             device="cpu", runs_dir=tmp_path / "runs", work_root=tmp_path / "work", gate_jobs=3)
    rows = bench.run(req, log=lambda m: None, accuracy_stage=gate)
    trains = [i for i, e in enumerate(events) if e.startswith("train")]
    gates = [i for i, e in enumerate(events) if e.startswith("gate")]
    assert max(trains) < min(gates), events  # no gate overlaps a timed run
    assert events[min(gates)] == "gate baseline"
    assert peak[0] >= 2  # the variants' gates ran concurrently
    assert [r.variant for r in rows] == ["baseline", "fp32", "tos", "fp32-tos"]  # table keeps sweep order
    assert [r.accuracy.verdict for r in rows] == ["baseline", "pass", "pass", "pass"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(Path(r.path).name for r in rows)


@pytest.mark.parametrize("gate_jobs", [1, 3])
def test_a_sweep_stopped_during_its_gates_keeps_every_timed_run(tiny_system, tmp_path, monkeypatch, gate_jobs):
    """A time limit's SIGTERM (cli turns it into KeyboardInterrupt) or Ctrl-C while gates run:
    every timed run is still written, the judged ones with their verdict, the rest said to be
    unjudged (never the "fail" a killed judge would return), and the judges are stopped."""
    import threading

    from harness.run import bench
    from harness.run import train
    from harness.core.records import AccuracyResult

    events: list[str] = []
    monkeypatch.setattr(train, "run_training", _fake_training(events))
    release = threading.Event()
    stopped = []

    def gate(rec, previous):
        if rec.run.variant.name == "baseline":
            return AccuracyResult(verdict="baseline", detail="reference")
        if rec.run.variant.name == "fp32":
            raise KeyboardInterrupt  # the signal lands while this gate runs
        release.wait(5)  # a judge still running when the stop comes
        return AccuracyResult(verdict="fail", detail="killed judge")

    def stop():
        stopped.append(1)
        release.set()

    gate.stop = stop
    req = bench.BenchRequest(system=str(tiny_system), variants=["baseline", "fp32", "tos"], steps=20, device="cpu",
                             runs_dir=tmp_path / "runs", work_root=tmp_path / "work", gate_jobs=gate_jobs)
    with pytest.raises(KeyboardInterrupt):
        bench.run(req, log=lambda m: None, accuracy_stage=gate)
    assert stopped == [1]
    recs = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in (tmp_path / "runs").iterdir()}
    # one gate at a time judges each run right after it: the stop at fp32's gate comes before tos trained
    timed = ["fp32"] if gate_jobs == 1 else ["fp32", "tos"]
    assert set(recs) == {"baseline", *timed}
    assert recs["baseline"]["accuracy"]["verdict"] == "baseline"
    for v in timed:
        assert recs[v]["status"] == "ok" and recs[v]["timing"]["step_s_median"]
        assert recs[v]["accuracy"]["verdict"] is None and "stopped" in recs[v]["accuracy"]["detail"], recs[v]["accuracy"]


@pytest.mark.parametrize("kw,msg", [({"gate_jobs": 0}, "gate-jobs"), ({"time_budget_s": 0}, "time-budget"),
                                    ({"time_budget_s": -5.0}, "time-budget")])
def test_bad_gate_jobs_or_time_budget_is_bad_input(tiny_system, tmp_path, kw, msg):
    from harness.run import bench
    from harness.core.errors import UserError

    req = bench.BenchRequest(system=str(tiny_system), variants=["baseline"], device="cpu",
                             runs_dir=tmp_path / "runs", work_root=tmp_path / "work", **kw)
    with pytest.raises(UserError, match=msg):
        bench.run(req, log=lambda m: None, accuracy_stage=lambda r, p: None)
    assert not (tmp_path / "runs").exists()


def test_the_sender_named_commit_wins_over_a_stale_git(monkeypatch):
    from harness.core import environment

    monkeypatch.setenv("DPH_GIT_SHA", "abc1234")
    assert environment._git_sha() == "abc1234"
    monkeypatch.delenv("DPH_GIT_SHA")
    assert environment._git_sha() != "abc1234"


@pytest.mark.parametrize("gate_jobs,budget,expect", [
    # guesses: each gate 60 s, each run its wall (1.2 s); baseline always starts
    (3, 200.0, ["baseline", "fp32", "tos", "fp32-tos"]),  # 1 + ceil(3/3) gates = 120 s: all fit
    (2, 150.0, ["baseline", "fp32", "tos"]),  # fp32-tos would owe 1 + ceil(3/2) = 3 gates = 180 s
    (3, 100.0, ["baseline"]),  # fp32 would owe 2 gates = 120 s
    (1, 70.0, ["baseline", "fp32", "tos", "fp32-tos"]),  # gate after each run: one gate owed at a time
    (1, 50.0, ["baseline"]),
])
def test_time_budget_starts_only_runs_whose_gates_still_fit(tiny_system, tmp_path, monkeypatch, gate_jobs, budget,
                                                            expect):
    """--time-budget: a run starts only if it and the gates still owed fit; the runs that did
    start are all judged, and the sweep says which runs it did not start."""
    from harness.run import bench
    from harness.run import train
    from harness.core.records import AccuracyResult

    events: list[str] = []
    monkeypatch.setattr(train, "run_training", _fake_training(events))
    _sweep_clock(monkeypatch)
    monkeypatch.setattr(bench, "GATE_GUESS_S", 60.0)

    def gate(rec, previous):
        v = "baseline" if rec.run.variant.name == "baseline" else "pass"
        return AccuracyResult(verdict=v, detail="ok")

    logs: list[str] = []
    req = bench.BenchRequest(system=str(tiny_system), variants=["baseline", "fp32", "tos", "fp32-tos"], steps=20,
                             device="cpu", runs_dir=tmp_path / "runs", work_root=tmp_path / "work",
                             gate_jobs=gate_jobs, time_budget_s=budget)
    rows = bench.run(req, log=logs.append, accuracy_stage=gate)
    assert [r.variant for r in rows] == expect
    assert all(r.accuracy.verdict in ("baseline", "pass") for r in rows)
    skipped = [v for v in ["baseline", "fp32", "tos", "fp32-tos"] if v not in expect]
    for v in skipped:
        assert any(m.startswith(f"time budget: not starting {v} ") for m in logs), logs
    if skipped:
        assert f"time budget: not started: {', '.join(skipped)}" in logs, logs
    else:
        assert not any(m.startswith("time budget") for m in logs)
    assert all(r.accuracy.wall_s is not None and r.accuracy.wall_s >= 0 for r in rows)


def _stored_runs(tiny_system, runs: Path, rows: list[tuple]) -> str:
    """Earlier run records of the tiny system: (variant, device kind, run wall s, gate wall s or None)."""
    from harness.prepare import systems

    name = systems.load_system(str(tiny_system)).name
    runs.mkdir()
    for i, (variant, kind, wall, gate_s) in enumerate(rows):
        (runs / f"old{i}.json").write_text(json.dumps({
            "schema": "dpharness.run/1", "run_id": f"2020-old{i}", "sweep_id": "2020-old", "system": name, "variant": variant,
            "device": {"kind": kind}, "timing": {"wall_s": wall}, "accuracy": {"wall_s": gate_s}}))
    return name


def _budgeted_sweep(tiny_system, tmp_path, variants: list[str], budget_s: float) -> tuple[list, list[str]]:
    """A CPU sweep of passing gates (gate_jobs 2) under --time-budget; (rows, log lines)."""
    from harness.run import bench
    from harness.core.records import AccuracyResult

    req = bench.BenchRequest(system=str(tiny_system), variants=variants, steps=20, device="cpu",
                             runs_dir=tmp_path / "runs", work_root=tmp_path / "work", gate_jobs=2,
                             time_budget_s=budget_s)
    logs: list[str] = []
    rows = bench.run(req, log=logs.append,
                     accuracy_stage=lambda rec, prev: AccuracyResult(verdict="pass", detail="ok"))
    return rows, logs


def test_time_budget_guesses_a_run_from_the_variants_recent_records(tiny_system, tmp_path, monkeypatch):
    """Before this sweep has timed the variant, its guess is the longest of its recent runs on
    this system and device kind in the results store (a 200 s compile must not be guessed at 1 s)."""
    from harness.run import bench
    from harness.results import runs as results
    from harness.run import train

    name = _stored_runs(tiny_system, tmp_path / "runs", [("fp32", "cpu", 500.0, None), ("fp32", "cuda", 9000.0, None),
                                                         ("tos", "cpu", 2.0, 3.0)])
    stored = results.load_runs(tmp_path / "runs")
    assert results.recent_wall_s(stored, name, "fp32", "cpu") == 500.0
    assert results.recent_wall_s(stored, name, "fp32", "cuda") == 9000.0
    assert results.recent_wall_s(stored, name, "mixed", "cpu") is None
    assert results.recent_wall_s(stored, name, "tos", "cpu", of="accuracy") == 3.0
    assert results.recent_wall_s(stored, name, "fp32", "cpu", of="accuracy") is None
    monkeypatch.setattr(train, "run_training", _fake_training([]))
    _sweep_clock(monkeypatch)
    monkeypatch.setattr(bench, "GATE_GUESS_S", 1.0)
    rows, logs = _budgeted_sweep(tiny_system, tmp_path, ["baseline", "tos", "fp32"], 100.0)
    names = {r.variant for r in rows}
    assert names == {"baseline", "tos"}, (names, logs)  # fp32's 500 s (cpu) runs do not fit in 100 s


def test_time_budget_a_long_run_does_not_stop_a_short_variant_with_history(tiny_system, tmp_path, monkeypatch):
    """A variant's own recent runs decide its guess, not the longest run of this sweep: after a
    60 s compile-heavy run, a variant whose runs take 2 s still starts; one never run here is
    guessed at this sweep's longest run and does not."""
    from harness.run import bench
    from harness.run import train

    _stored_runs(tiny_system, tmp_path / "runs", [("tos", "cpu", 2.0, None)])
    monkeypatch.setattr(train, "run_training", _fake_training([]))
    _sweep_clock(monkeypatch)  # the clock advances by the fake's 1.2 s: only the record says 60 s
    clocked = train.run_training

    def run_training(spec, progress=None):
        tr = clocked(spec, progress)
        if spec.variant.name == "fp32":
            tr.wall_s = 60.0  # as if it compiled for a minute
        return tr

    monkeypatch.setattr(train, "run_training", run_training)
    monkeypatch.setattr(bench, "GATE_GUESS_S", 1.0)
    rows, logs = _budgeted_sweep(tiny_system, tmp_path, ["baseline", "fp32", "tos", "fp32-tos"], 40.0)
    assert [r.variant for r in rows] == ["baseline", "fp32", "tos"], logs
    assert any(m.startswith("time budget: not starting fp32-tos") for m in logs), logs


def test_time_budget_skips_a_run_that_does_not_fit_and_starts_a_shorter_one_after_it(tiny_system, tmp_path,
                                                                                      monkeypatch):
    """A run that does not fit is passed over, not the end of the sweep: a later variant whose
    records say it is short still starts. Gates are guessed from the variant's recorded gate times
    (accuracy.wall_s), GATE_GUESS_S only without a record."""
    from harness.run import bench
    from harness.run import train

    _stored_runs(tiny_system, tmp_path / "runs", [("baseline", "cpu", 1.0, 2.0), ("fp32", "cpu", 100.0, 2.0),
                                                  ("tos", "cpu", 1.0, 2.0), ("fp32-tos", "cpu", 1.0, 50.0)])
    monkeypatch.setattr(train, "run_training", _fake_training([]))
    _sweep_clock(monkeypatch)
    monkeypatch.setattr(bench, "GATE_GUESS_S", 1000.0)  # any variant without a gate record would not fit
    rows, logs = _budgeted_sweep(tiny_system, tmp_path, ["baseline", "fp32", "tos", "fp32-tos"], 30.0)
    # fp32: its 100 s run does not fit; tos (1 s + 2 s gates) does; fp32-tos's 50 s gate does not
    assert [r.variant for r in rows] == ["baseline", "tos"], logs
    assert "time budget: not started: fp32, fp32-tos" in logs, logs


def test_time_budget_owes_gates_in_waves_longest_first():
    from harness.run import bench

    b = bench.TimeBudget(end=0.0, gate_jobs=2)
    assert b.owed_gates_s([10.0], [5.0, 40.0, 7.0]) == 10.0 + 40.0 + 5.0  # waves {40, 7}, {5}
    assert b.owed_gates_s([], [3.0]) == 3.0
    assert bench.TimeBudget(end=0.0, gate_jobs=1).owed_gates_s([1.0, 2.0], [3.0, 4.0]) == 10.0


# ---------------------------------------------------------------- engines

def test_the_build_hashes_code_not_prose_and_freezes_the_engine(tmp_path, patches, monkeypatch):
    """A README edit changes no build; an engine edit changes every variant that names the engine;
    the build freezes the engine beside the patch modules, where the child's loader finds it."""
    from harness.child import patch_loader
    from harness.prepare import upstream

    for v in ("graph", "fused"):
        shutil.copytree(REPO / "patches" / v, patches / v)
    engines = tmp_path / "engines"
    shutil.copytree(REPO / "engines", engines, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(variants, "ENGINES", engines)
    pin = upstream.default_pin()
    h0 = build.content_hash(pin, variants.chain("fused", patches))
    (patches / "graph" / "README.md").write_text("rewritten prose\n")
    assert build.content_hash(pin, variants.chain("fused", patches)) == h0
    with open(engines / "dpfast" / "geometry.py", "a") as f:
        f.write("# a change of engine code\n")
    assert build.content_hash(pin, variants.chain("fused", patches)) != h0
    assert variants.chain_engine(variants.chain("fused", patches)) == "dpfast"
    b = build.build_variant("fused", build_dir=tmp_path / "b", patches_dir=patches)
    vdir = b.modules[0].parents[2]
    assert b.engine == "dpfast" and (vdir / "engines" / "dpfast" / "geometry.py").read_text().endswith(
        "# a change of engine code\n")
    assert [m.name for m in b.modules] == ["select_engine.py", "select_engine.py"]
    assert patch_loader.engines_dir(b.modules[1]) == vdir / "engines"
    assert patch_loader.engines_dir(REPO / "harness" / "cli.py") is None


def test_a_manifest_naming_a_missing_engine_is_refused(patches):
    _manifest(patches, "noengine", engine="nope")
    with pytest.raises(UserError, match="engine 'nope' is not a package"):
        variants.load_variant("noengine", patches)
