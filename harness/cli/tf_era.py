"""`dpharness tf-era`: build (or find cached) the TF v2 family's environment (harness/prepare/tf_era.py)
and say what it holds; `--smoke N` then trains the system for N steps with v2's own
`dp train input.json`, freezes it (`dp freeze`) and tests the frozen graph (`dp test`), with
`--xla` under TensorFlow's XLA auto-jit; `--horovod` builds Horovod into it. The family's variants
(patches/asc-*) run through `dpharness bench` (harness/run/train.py, tf-v2 backend)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from harness.core import fsutil
from harness.core.errors import RunFailed

XLA_FLAGS = "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"


def _dp(env_dp: Path, args: list[str], wd: Path, log: Path, extra: dict[str, str]) -> None:
    with open(log, "w") as f:
        r = subprocess.run([str(env_dp), *args], cwd=wd, env={**os.environ, **extra}, stdout=f,
                           stderr=subprocess.STDOUT, timeout=3600)
    if r.returncode != 0:
        from harness.judge.processes import log_tail

        raise RunFailed(f"v2 `dp {args[0]}` failed (exit {r.returncode}): {log_tail(log)}; log: {log}")


def _cmd(a) -> int:
    from harness.judge.processes import parse_dp_test
    from harness.prepare import systems, tf_era
    from harness.run import train

    env = tf_era.build_env(source=tf_era.resolve_source(a.upstream_source))
    print(f"TF v2 family: {env.versions} (python {env.python}; {'cached' if env.cached else 'built'} "
          f"in {env.root}; build log {env.root / 'build.log'})")
    if a.horovod:
        hv = tf_era.build_horovod(env)
        print(f"Horovod: {hv.check_build} ({'cached' if hv.cached else 'built'}; {hv.horovodrun}; "
              f"build log {env.root / 'horovod-build.log'})")
    if not a.smoke:
        return 0
    system = systems.load_system(a.system)
    wd = Path(a.work or env.root / "smoke" / f"{system.name}-{time.strftime('%Y%m%dT%H%M%S')}{'-xla' if a.xla else ''}")
    wd.mkdir(parents=True, exist_ok=True)
    inp = train.make_input(system, {}, int(a.smoke), seed=1)
    (wd / "input.json").write_text(json.dumps(inp, indent=2))
    # with --xla, XLA dumps every module it compiles: none means auto-jit never engaged (an error,
    # not a run without XLA under its name)
    extra = {"TF_XLA_FLAGS": XLA_FLAGS, "XLA_FLAGS": f"--xla_dump_to={wd / 'xla_dump'}"} if a.xla else {}
    t0 = time.perf_counter()
    _dp(env.dp, ["train", "input.json"], wd, wd / "train.log", extra)
    wall = time.perf_counter() - t0
    xla_modules = len(list((wd / "xla_dump").glob("*.before_optimizations.txt"))) if a.xla else None
    if a.xla and not xla_modules:
        raise RunFailed(f"--xla: TensorFlow compiled no XLA cluster (nothing in {wd / 'xla_dump'})")
    _dp(env.dp, ["freeze", "-o", "frozen_model.pb"], wd, wd / "freeze.log", {})
    _dp(env.dp, ["test", "-m", "frozen_model.pb", "-s", str(system.validation[0]), "-n", str(a.frames)], wd,
        wd / "dp_test.log", {})
    rmse = parse_dp_test((wd / "dp_test.log").read_text())
    out = {"family": "tf-v2", "versions": env.versions, "system": system.name, "steps": int(a.smoke),
           "xla": bool(a.xla), "xla_modules": xla_modules, "wall_s": round(wall, 2), "dp_test": rmse, "work_dir": str(wd)}
    fsutil.atomic_write_json(wd / "smoke.json", out)
    print(f"{system.name}: {a.smoke} steps of v2 `dp train`{f' (XLA auto-jit, {xla_modules} modules compiled)' if a.xla else ''} in {wall:.1f} s; "
          f"frozen_model.pb dp test E/atom {rmse.get('rmse_e_per_atom')}, F {rmse.get('rmse_f')} ({wd})")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("tf-era", help="build/check the TF v2 family's environment (deepmd-kit v2 from source: asc-2022 or 2.0.3; "
                       "TensorFlow 2.6, Python 3.8); --smoke N trains, freezes and tests with v2's own dp")
    p.add_argument("--smoke", default=None, metavar="STEPS", help="then train the system this many steps")
    p.add_argument("--upstream-source", default=None, metavar="PATH",
                   help="a git checkout holding the asc-2022 commit (c5f88f3b): build that instead of v2.0.3's sdist")
    p.add_argument("--system", default="water")
    p.add_argument("--xla", action="store_true", help="train under TF_XLA_FLAGS auto-jit")
    p.add_argument("--horovod", action="store_true", help="also build Horovod (TensorFlow + Gloo) into it from the "
                   "pinned sdist (harness/pins/tf-era-horovod.toml); bench --launcher horovod does this itself")
    p.add_argument("--frames", type=int, default=5, help="dp test frames")
    p.add_argument("--work", default=None, help="work folder of the smoke run")
    p.set_defaults(func=_cmd)
