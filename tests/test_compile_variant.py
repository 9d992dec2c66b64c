"""The `compile` variant (torch.compile of upstream's model) is recorded as FAILED with the real
reason, not faked: the force loss needs a double backward that AOTAutograd does not support."""
from __future__ import annotations

import json

import pytest

from harness import cli


@pytest.mark.slow
def test_compile_of_upstream_model_is_recorded_failed_with_the_double_backward_reason(tiny_system, tmp_path):
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "compile", "--no-baseline", "--steps", "3",
                   "--device", "cpu", "--no-accuracy", "--results-dir", str(tmp_path)])
    assert rc == 3
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert rec["status"] == "failed"
    assert "does not currently support double backward" in rec["error"]
