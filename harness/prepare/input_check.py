"""Validates a training input with upstream's own argument schema (dargs, deepmd.utils.argcheck)
in a child process of the baseline tree, so a bad key is a one-line error naming it before any
training starts, checked by the very code that would read it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import UserError

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from deepmd.utils.argcheck import normalize
try:
    out = normalize(json.loads(sys.stdin.read()))
except Exception as e:  # dargs raises ArgumentKeyError/ArgumentTypeError/ArgumentValueError etc.
    msg = " ".join(str(e).split())
    print(f"{type(e).__name__}: {msg}"[:400])
    sys.exit(1)
print(json.dumps(out))
"""


def check_input(inp: dict[str, Any], tree: Path, where: str) -> dict[str, Any]:
    """Raise UserError if upstream's schema rejects `inp` (`where` names the file for the user);
    else the input as upstream normalised it (aliases resolved, defaults filled in)."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tree)], input=json.dumps(inp),
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        why = (r.stdout.strip() or r.stderr.strip().splitlines()[-1:] or ["rejected"])
        why = why if isinstance(why, str) else why[0]
        raise UserError(f"{where}: upstream's input schema rejects it: {why}")
    return json.loads(r.stdout.strip().splitlines()[-1])
