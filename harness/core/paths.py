"""Where things live in a checkout: one definition, so a moved module cannot miscount parents."""
from __future__ import annotations

import os
from pathlib import Path

from harness.core import envvars

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "harness" / "pins"
RESULTS = ROOT / "results"
BUILD = ROOT / "build"
ENGINES = ROOT / "engines"
SYSTEMS = ROOT / "systems"
WHEELHOUSE = ROOT / "wheelhouse"


def harness_importable(environ) -> dict[str, str]:
    """A child's environment: `environ` with this checkout first on PYTHONPATH, so the child can
    import the harness (and its `-m harness.child.*` modules) whatever its working directory."""
    env = dict(environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# DPH_PATCHES: another variant folder (tests point it at a scratch copy)
PATCHES = Path(envvars.get(envvars.DPH_PATCHES) or ROOT / "patches")
