"""Where things live in a checkout: one definition, so a moved module cannot miscount parents."""
from __future__ import annotations

from pathlib import Path

from harness.core import envvars

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "harness" / "pins"
RESULTS = ROOT / "results"
BUILD = ROOT / "build"
ENGINES = ROOT / "engines"
SYSTEMS = ROOT / "systems"
WHEELHOUSE = ROOT / "wheelhouse"
# DPH_PATCHES: another variant folder (tests point it at a scratch copy)
PATCHES = Path(envvars.get(envvars.DPH_PATCHES) or ROOT / "patches")
