"""Upstream's other backends through the harness: the step clock hooks their loops, and the
accuracy gate tests their models in their own backend with the unpatched baseline build."""
from __future__ import annotations

import json

import pytest

from harness import cli, launch, train


def test_backend_is_read_from_dp_arguments():
    assert launch._backend_of(["--pt", "train", "input.json"]) == "pt"
    assert launch._backend_of(["--jax", "train", "input.json"]) == "jax"
    assert launch._backend_of(["--tf", "train", "input.json"]) == "tf"
    assert launch._backend_of(["train", "input.json"]) == "tf"  # dp's default


def test_missing_backend_is_a_clear_reason():
    why = train.backend_missing("pt")
    assert why is None  # torch is always there
    assert set(launch.STEP_HOOKS) == {"pt", "jax", "tf"}


@pytest.mark.slow
def test_tf_variant_trains_is_timed_and_is_dp_tested_from_a_frozen_graph(tiny_system, tmp_path):
    if train.backend_missing("tf"):
        pytest.skip("TensorFlow is not installed (pip install -r harness/pins/tf.txt)")
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "tf", "--steps", "8", "--device", "cpu",
                   "--results-dir", str(tmp_path)])
    assert rc == 0
    recs = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*")}
    tf = recs["tf"]
    assert tf["status"] == "ok" and tf["backend"] == "tf"
    assert tf["timing"]["steps_measured"] >= 1 and tf["timing"]["step_s_median"] > 0
    dp = tf["accuracy"]["dp_test"]
    assert dp and dp["rmse_f"] > 0  # dp --tf test of the frozen model, by the baseline build
    assert "not applicable to the tf backend" in tf["accuracy"]["detail"]
