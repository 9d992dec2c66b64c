"""A fast engine's options (engines/<engine>/options.py: `from_env`) checked in the harness,
before anything is built further, trained or written: a bad value of a variable the engine reads
(its manifest's `env`, or the user's environment, which the training child inherits) is a
one-line error naming the variable, exit 2 -- not a run that fails inside its child."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Mapping

from harness.core.errors import UserError


@functools.lru_cache(maxsize=None)
def _options_module(path: Path):
    name = f"_dph_engine_options_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def check(engine_dir: Path, variant: str, variant_env: Mapping[str, str], environ: Mapping[str, str]) -> None:
    """UserError unless the options the variant's training child would read -- `environ` with the
    variant's own env over it, as harness.run.train.subprocess_env builds it -- are valid for the
    engine frozen at `engine_dir` (an engine without an options module has nothing to check)."""
    path = Path(engine_dir) / "options.py"
    if not path.is_file():
        return
    try:
        _options_module(path.resolve()).from_env({**environ, **variant_env})
    except ValueError as e:
        raise UserError(f"variant {variant}: {e}") from None
