"""Is a file given to `dpharness train --restart/--init-model` a training checkpoint of this
input's model? Asked of upstream's own code in a child of the baseline tree, before training:
torch's archive format, upstream's `torch.load(..., weights_only=True)` as its trainer loads one,
and the model upstream builds from the input (`get_model`) against the checkpoint's parameters,
name by name and shape by shape. A frozen model (TorchScript) is named as such."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from harness.child import pycode
from harness.core.errors import UserError
from harness.core import paths

_CHILD = r"""
import json, sys, zipfile
sys.path.insert(0, sys.argv[1])
path, inp = sys.argv[2], json.loads(sys.stdin.read())
def no(why):
    print(why[:400]); sys.exit(1)
try:
    names = zipfile.ZipFile(path).namelist()
except (zipfile.BadZipFile, OSError) as e:
    no(f"not a PyTorch checkpoint (no torch.save archive: {type(e).__name__})")
if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
    no("a frozen model (TorchScript, from dp freeze), not a training checkpoint: give a model.ckpt-<step>.pt")
import torch
try:
    state = torch.load(path, map_location="cpu", weights_only=True)
except Exception as e:
    no(f"upstream's trainer cannot load it ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
state = state.get("model", state) if isinstance(state, dict) else None
if not isinstance(state, dict) or "_extra_state" not in state:
    no("not a DeePMD-kit PyTorch checkpoint (no model state with _extra_state)")
have = {k[len("model.Default."):]: tuple(v.shape) for k, v in state.items()
        if k.startswith("model.Default.") and hasattr(v, "shape")}
if not have:
    no("a multi-task or foreign checkpoint (no model.Default.* parameters)")
try:
    from deepmd.pt.model.model import get_model
    want = {k: tuple(v.shape) for k, v in get_model(inp["model"]).state_dict().items() if hasattr(v, "shape")}
except Exception as e:  # the model needs data to build (sel "auto"): nothing to compare here
    print(json.dumps({"compared": False, "why": f"{type(e).__name__}"})); sys.exit(0)
for k in sorted(want):
    if k not in have:
        no(f"of another model: it has no {k} (this input's model has it)")
    if have[k] != want[k]:
        no(f"of another model: {k} has shape {list(have[k])}, this input's model {list(want[k])}")
extra = sorted(set(have) - set(want))
if extra:
    no(f"of another model: it has {extra[0]}, this input's model has not")
print(json.dumps({"compared": True, "parameters": len(want)}))
"""


def check_checkpoint(path: Path, inp: dict[str, Any], tree: Path, flag: str) -> dict[str, Any]:
    """UserError (exit 2) '<flag> <path>: <why>' unless `path` is a checkpoint upstream's trainer
    loads into the model of `inp` (normalised); returns what the child compared."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: a folder, not a checkpoint (give its model.ckpt-<step>.pt, or --resume FOLDER)")
    r = subprocess.run(pycode.command(tree, _CHILD, tree, p), input=json.dumps(inp),
                       env=paths.harness_importable(os.environ),
                       capture_output=True, text=True, timeout=600)
    out = r.stdout.strip().splitlines()
    if r.returncode != 0:
        why = out[-1] if out else (r.stderr.strip().splitlines() or ["rejected"])[-1]
        raise UserError(f"{flag} {p}: {why}")
    try:
        return json.loads(out[-1])
    except (IndexError, ValueError):
        return {"compared": False}
