"""`dpharness train`: a user's own training with a variant, the input unchanged. Unlike the bench
(harness/run/train.py make_input), nothing of the input is rewritten: its steps, learning rate,
loss prefactors, display/save frequencies, seed and validation are upstream's to read. The one
edit is where the data is: upstream resolves `systems` from its working directory, the run works
in the output folder, so relative system paths are made absolute from the input file's folder
(the same folders `dp train` run from there would read). Supports what the child's engine check
refuses through harness/prepare/train_support before any build."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.core import envvars, fsutil
from harness.core.errors import RunFailed, UserError
from harness.core.progress import Progress
from harness.prepare import systems, train_support
from harness.run import distributed, train

RECORD_NAME = "dpharness_train.json"
DEFAULT_FAST = "fused"


@dataclass
class TrainRequest:
    input_path: Path
    variant: str | None = None  # None: the fastest that trains this input (fused, else baseline)
    output: Path | None = None  # default: <input's folder>/train-<variant>
    restart: Path | None = None
    init_model: Path | None = None
    freeze: bool = False
    device: str = "auto"
    gpus: int = 1  # processes of one node, torchrun + NCCL as bench --gpus (harness/run/distributed.py)
    # the fast engine trains on the frames upstream's own sampler draws, step for step (dpfast's
    # DPH_FOLLOW_UPSTREAM_ORDER): upstream's trajectory, not a statistically equal one
    follow_upstream_order: bool = False


@dataclass
class TrainingRecord:
    """What `dpharness train` writes into the output folder (dpharness_train.json)."""

    variant: str
    variant_hash: str
    chose: str  # "user" or why the default was taken
    input: str
    input_sha256: str
    device: str
    numb_steps: int
    steps_lcurve: int | None  # the last step lcurve.out shows
    wall_s: float
    returncode: int
    lcurve_columns: list[str]
    final_lcurve: dict[str, float]
    restart: str | None
    init_model: str | None
    command: list[str]
    outputs: dict[str, str] = field(default_factory=dict)
    world_size: int = 1  # ranks the training ran with, as its child reported them (steps.json)
    follow_upstream_order: bool = False  # --follow-upstream-order (upstream's own loop always does)


def read_record(path: Path) -> TrainingRecord:
    """dpharness_train.json read back typed; UserError naming the file when it is not one."""
    try:
        d = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(TrainingRecord)}
        required = {f.name for f in dataclasses.fields(TrainingRecord)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(d, dict) or not required <= set(d) <= names:  # newer fields may be absent
            raise TypeError(f"fields {sorted((set(d) ^ names) - (names - required)) if isinstance(d, dict) else type(d).__name__}")
        return TrainingRecord(**d)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a {RECORD_NAME} record ({e})") from None


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint was saved at, from upstream's name model.ckpt-<step>.pt (the
    model.ckpt.pt link resolved); 0 when the name does not say."""
    m = re.fullmatch(r".*-(\d+)\.pt", Path(ckpt).resolve().name)
    return int(m.group(1)) if m else 0


def load_input(path: Path) -> tuple[dict[str, Any], systems.System]:
    """The user's input and the data sets it names, validated one by one (atom counts and
    compositions may differ between systems; UserError naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    system = systems.system_from_input(path)
    for d in (*system.train, *system.validation):
        systems.validate_dataset(d, system.type_map)
    return system.input, system


def absolute_data(inp: dict[str, Any], base: Path) -> dict[str, Any]:
    """`inp` with each relative `systems` path made absolute from `base`; nothing else changes."""
    out = copy.deepcopy(inp)
    for part in ("training_data", "validation_data"):
        data = out.get("training", {}).get(part)
        if not isinstance(data, dict) or "systems" not in data:
            continue
        fix = (lambda s: s if Path(s).expanduser().is_absolute() else str((base / s).resolve()))
        s = data["systems"]
        data["systems"] = fix(s) if isinstance(s, str) else [fix(x) for x in s]
    return out


def choose_variant(inp: dict[str, Any], asked: str | None, where: Path) -> tuple[str, str]:
    """(variant, why): the user's (refused here, exit 2, if its engine does not train the input),
    else fused when the engine trains the input, else baseline with the key that ruled fused out."""
    from harness.prepare import variants

    if asked is not None:
        chain = variants.chain(asked)  # unknown variant -> UserError
        if variants.chain_engine(chain) == "dpfast":
            train_support.check_engine_input(inp, asked, where)
        return asked, "user"
    why = train_support.engine_refusal(inp, DEFAULT_FAST)
    if why is None:
        return DEFAULT_FAST, "default: the fast engine trains this input"
    return "baseline", f"default: {DEFAULT_FAST} does not train {why}"


def read_lcurve(path: Path) -> tuple[list[str], list[dict[str, float]]]:
    """Upstream's lcurve.out: a '# step rmse_val ...' header, then one row per display step."""
    if not path.is_file():
        return [], []
    cols, rows = [], []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            head = line.lstrip("#").split()
            cols = head if head[:1] == ["step"] else cols  # later '#' lines are notes
        elif line.strip() and cols:
            vals = line.split()
            try:
                rows.append({c: float(v) for c, v in zip(cols, vals)})
            except ValueError:
                continue
    return cols, rows


class TrainingStopped(RunFailed):
    """SIGTERM (a scheduler's time limit) or Ctrl-C stopped the training; the child saved the step
    it reached (harness/child/resume.py) and `--resume` continues from it."""


STOP_GRACE_S = 120  # a step, plus the checkpoint's write, after the stop request


def _supervise(cmd: list[str], wd: Path, env: dict[str, str], log_path: Path, bar: Progress) -> int:
    from harness.child import resume

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_term_with_parent)
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                bar.update_to(train.read_progress(wd))
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into this)
            # the child saves the step it reached at its next step boundary, then exits
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise TrainingStopped(_stopped_message(wd, resume.read_stopped(wd), proc.returncode)) from None
    return proc.returncode


def _term_with_parent() -> None:
    """In the training child before it starts (Linux): SIGTERM when `dpharness train` dies, even
    by SIGKILL, so the child saves the step it reached and exits instead of training on as an
    orphan beside a --resume (it runs in its own session, out of reach of its parent's group)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stopped_message(wd: Path, stopped: dict | None, rc: int) -> str:
    newest = newest_checkpoint(wd)
    where = f"; continue with: dpharness train --resume {wd}" if newest else ""
    if stopped and stopped.get("checkpoint"):
        return f"training stopped at step {stopped['steps_done']}: checkpoint {stopped['checkpoint']} written{where}"
    if stopped:
        return f"training stopped before its first new step (nothing to save){where}"
    last = f"; newest checkpoint {newest}" if newest else "; no checkpoint"
    return f"training stopped (exit {rc}) without saving the step it reached{last}{where}"


REQUEST_NAME = ".dpharness-train-request.json"  # what --resume needs to run the same training again


def newest_checkpoint(wd: Path) -> Path | None:
    """The checkpoint of the most steps in `wd` (upstream's model.ckpt-<step>.pt names; an atomic
    write's temporary file is hidden and never matches)."""
    found = [(checkpoint_step(p), p) for p in Path(wd).glob("model.ckpt-*.pt") if re.fullmatch(r"model\.ckpt-\d+\.pt", p.name)]
    return max(found)[1] if found else None


def resume_request(wd: Path, variant: str | None = None, device: str | None = None) -> TrainRequest:
    """`dpharness train --resume OUTPUT`: the request that trained into OUTPUT, restarted from its
    newest checkpoint."""
    wd = Path(wd)
    if not wd.is_dir():
        raise UserError(f"--resume {wd}: not a folder")
    try:
        d = json.loads((wd / REQUEST_NAME).read_text())
    except (OSError, ValueError):
        raise UserError(f"--resume {wd}: no dpharness train ran there ({REQUEST_NAME} missing or unreadable)") from None
    if variant is not None and variant != d["variant"]:
        raise UserError(f"--resume {wd}: it trained with {d['variant']}; a resumed run keeps its variant, "
                        f"not --variant {variant}")
    ckpt = newest_checkpoint(wd)
    if ckpt is None:
        raise UserError(f"--resume {wd}: no checkpoint (model.ckpt-<step>.pt) there yet; start it again without --resume")
    return TrainRequest(input_path=Path(d["input"]), variant=d["variant"], output=wd, restart=ckpt,
                        device=device or d["device"], follow_upstream_order=bool(d.get("follow_upstream_order")))


def truncate_curves(wd: Path, step: int) -> None:
    """Before a restart from the checkpoint of `step` into the folder that wrote it: the rows of
    steps after it (trained, then lost with the kill) go, so the continued lcurve holds every
    displayed step once."""
    lc = wd / "lcurve.out"
    if lc.is_file():
        keep = []
        for line in lc.read_text().splitlines(keepends=True):
            head = line.split()[:1]
            if line.startswith("#") or not head:
                keep.append(line)
                continue
            try:
                if float(head[0]) <= step:
                    keep.append(line)
            except ValueError:
                keep.append(line)
        fsutil.atomic_write_text(lc, "".join(keep))
    full = wd / "lcurve_full.jsonl"
    if full.is_file():
        rows = [x for x in full.read_text().splitlines(keepends=True)
                if x.strip() and json.loads(x).get("step", 0) <= step]
        fsutil.atomic_write_text(full, "".join(rows))


def run(req: TrainRequest, log: Callable[[str], None] = print) -> TrainingRecord:
    from harness.prepare import build, checkpoint_check, input_check, train_preflight, upstream
    from harness.run.bench import resolve_device

    src = Path(req.input_path)
    inp, system = load_input(src)
    variant, why = choose_variant(inp, req.variant, src)
    device = resolve_device(req.device)
    distributed.check_gpus([req.gpus], device)
    for flag, ckpt in (("--restart", req.restart), ("--init-model", req.init_model)):
        if ckpt is not None and not Path(ckpt).exists():
            raise UserError(f"{flag} {ckpt}: checkpoint not found")
    if req.restart is not None and req.init_model is not None:
        raise UserError("--restart and --init-model exclude each other (upstream takes one)")
    wd = (Path(req.output) if req.output else src.parent / f"train-{variant}").resolve()
    if (wd / "input.json").resolve() == src.resolve():
        raise UserError(f"--output {wd}: the run writes its input.json there, which is {src} itself; "
                        f"choose another folder")
    log(f"variant {variant} ({why}); {len(system.train)} training / {len(system.validation)} validation "
        f"systems, types {list(system.type_map)}")
    pin = upstream.default_pin()
    b = build.build_variant(variant, pin)
    run_inp = absolute_data(inp, src.resolve().parent)
    normalised = input_check.check_input(run_inp, b.tree, str(src))
    # what the schema accepts but no training can use: refused here, before the output folder
    start = checkpoint_step(req.restart) if req.restart is not None else 0
    train_preflight.preflight(normalised, str(src), list(system.type_map), list(system.train),
                              list(system.validation), start, _neighbour_stats(normalised, system))
    for flag, ckpt in (("--restart", req.restart), ("--init-model", req.init_model)):
        if ckpt is not None:
            checkpoint_check.check_checkpoint(Path(ckpt), normalised, b.tree, flag)
    wd.mkdir(parents=True, exist_ok=True)
    lock = _output_lock(wd)
    try:
        return _train_in(wd, req, b, run_inp, src, variant, why, device, log)
    finally:
        lock.release()


LOCK_NAME = ".dpharness-train.lock"


def _output_lock(wd: Path):
    """Held while a training writes into `wd`: a second `dpharness train` there is refused (exit
    2) instead of interleaving its checkpoints and lcurve with the first's. The OS releases the
    lock when the holder dies, so a killed run never blocks its own --restart."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(wd / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"--output {wd}: another dpharness train is writing there (lock {wd / LOCK_NAME}); "
                        f"wait for it or choose another folder") from None
    return lock


def _train_in(wd: Path, req: TrainRequest, b, run_inp: dict[str, Any], src: Path, variant: str, why: str,
              device: str, log: Callable[[str], None]) -> TrainingRecord:
    fsutil.atomic_write_text(wd / "input.json", json.dumps(run_inp, indent=2) + "\n")
    fsutil.atomic_write_json(wd / REQUEST_NAME, {"input": str(src.resolve()), "variant": variant, "device": device,
                                                 "follow_upstream_order": req.follow_upstream_order})
    from harness.child import resume

    (wd / resume.STOPPED_NAME).unlink(missing_ok=True)
    if req.restart is not None and Path(req.restart).resolve().parent == wd:
        truncate_curves(wd, checkpoint_step(req.restart))
    dp_args = [train.BACKEND_FLAG[b.backend], "train", "input.json"]
    if req.restart is not None:
        dp_args += ["--restart", str(Path(req.restart).resolve())]
    if req.init_model is not None:
        dp_args += ["--init-model", str(Path(req.init_model).resolve())]
    cmd, no_launch = distributed.training_command(b.backend, req.gpus, train.launch_command(b.tree, b.modules, dp_args))
    if cmd is None:
        raise UserError(f"--gpus {req.gpus}: {no_launch}")
    follow = {}
    if req.follow_upstream_order:
        if b.engine != "dpfast":  # upstream's own loop draws its own order already
            log(f"--follow-upstream-order: {variant} trains with upstream's own loop, which is upstream's order")
        else:
            follow = {envvars.DPH_FOLLOW_UPSTREAM_ORDER: "1"}
    env = train.subprocess_env(device, {**distributed.distributed_env(req.gpus), **b.env,
                                        envvars.DPH_VARIANT: b.name, **follow}, wd)
    steps = int(run_inp.get("training", {}).get("numb_steps", 0) or 0)
    # a restart runs from its checkpoint's step to numb_steps; the child counts the steps it ran
    todo = max(0, steps - checkpoint_step(req.restart)) if req.restart is not None else steps
    log(f"training {todo} steps" + (f" (to step {steps})" if todo != steps else "") + f" on {device} in {wd}")
    (wd / "steps.json").unlink(missing_ok=True)  # the world size is read from this run's, not an earlier one's
    t0 = time.perf_counter()
    with Progress(todo, f"train {variant}") as bar:
        rc = _supervise(cmd, wd, env, wd / "train.log", bar)
    wall = time.perf_counter() - t0
    if rc != 0:
        error = train.diagnose(wd / "train.log", rc)
        refusal = train_support.child_refusal(error, variant, src)
        if refusal:
            raise UserError(refusal)
        raise RunFailed(f"training failed ({error}); log: {wd / 'train.log'}")
    world = ranks_that_ran(wd)
    if world != req.gpus:  # a launcher that fell back to one process must not pass for N
        raise RunFailed(f"asked for {req.gpus} processes, the training ran with {world}; log: {wd / 'train.log'}")
    cols, rows = read_lcurve(wd / "lcurve.out")
    outputs = {p.name: str(p) for p in sorted(wd.iterdir())
               if p.name in ("lcurve.out", "checkpoint", "out.json", "train.log", "input.json")
               or (p.name.startswith("model.ckpt") and p.suffix == ".pt")}
    if req.freeze:
        outputs["frozen_model.pth"] = str(freeze(b, wd, env))
    rec = TrainingRecord(
        variant=variant, variant_hash=b.hash, chose=why, input=str(src.resolve()),
        input_sha256=fsutil.sha256_file(src), device=device, numb_steps=steps,
        steps_lcurve=int(rows[-1]["step"]) if rows and "step" in rows[-1] else None, wall_s=round(wall, 3),
        returncode=rc, lcurve_columns=cols, final_lcurve=rows[-1] if rows else {},
        restart=str(req.restart) if req.restart else None, init_model=str(req.init_model) if req.init_model else None,
        command=cmd, outputs=outputs, world_size=world, follow_upstream_order=req.follow_upstream_order)
    fsutil.atomic_write_json(wd / RECORD_NAME, asdict(rec))
    return rec


def _neighbour_stats(normalised: dict[str, Any], system: systems.System) -> dict[str, Any] | None:
    """The data's neighbour counts within the input's rcut, when sel is an explicit list of an
    se_e2_a descriptor (sel "auto" is upstream's to fit)."""
    desc = (normalised.get("model") or {}).get("descriptor") or {}
    if desc.get("type") not in ("se_e2_a", "se_a") or not isinstance(desc.get("sel"), list):
        return None
    return systems.neighbour_stats(dataclasses.replace(system, input={**system.input, "model": normalised["model"]}))


def ranks_that_ran(wd: Path) -> int:
    """The world size rank 0's child wrote into steps.json (1 when it wrote none)."""
    try:
        return int(json.loads((wd / "steps.json").read_text()).get("world_size") or 1)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def freeze(b, wd: Path, env: dict[str, str]) -> Path:
    """Upstream's `dp --pt freeze` of the run's last checkpoint into wd/frozen_model.pth."""
    out = wd / "frozen_model.pth"
    cmd = train.launch_command(b.tree, (), [train.BACKEND_FLAG[b.backend], "freeze", "-c", str(wd), "-o", str(out)])
    with open(wd / "freeze.log", "w") as f:
        r = subprocess.run(cmd, cwd=wd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not out.is_file():
        raise RunFailed(f"dp freeze failed ({train.diagnose(wd / 'freeze.log', r.returncode)}); log: {wd / 'freeze.log'}")
    return out
