"""What `dpharness train --resume` reads and rewrites in an output folder, without training: the
newest checkpoint (never an atomic write's temporary file), the lcurve rows after the checkpoint's
step dropped from both curves, and the refusals of a folder that cannot be resumed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.errors import UserError
from harness.run import user_train


def _folder(tmp_path: Path, steps: list[int]) -> Path:
    wd = tmp_path / "out"
    wd.mkdir(parents=True)
    for s in steps:
        (wd / f"model.ckpt-{s}.pt").write_bytes(b"x")
    (wd / ".model.ckpt-90.pt.tmp123-abcd").write_bytes(b"half")  # a write cut short
    if steps:
        (wd / "model.ckpt.pt").symlink_to(wd / f"model.ckpt-{steps[-1]}.pt")
    return wd


def test_newest_checkpoint_is_the_most_steps_and_never_a_temporary_file(tmp_path):
    wd = _folder(tmp_path, [40, 80, 67])
    assert user_train.newest_checkpoint(wd) == wd / "model.ckpt-80.pt"
    assert user_train.newest_checkpoint(_folder(tmp_path / "e", [])) is None


def test_truncate_curves_keeps_the_header_and_the_rows_up_to_the_checkpoint(tmp_path):
    wd = tmp_path
    (wd / "lcurve.out").write_text("# step rmse lr\n# a note\n      1 1.0 1e-3\n      5 0.9 1e-3\n     10 0.8 9e-4\n"
                                   "     15 0.7 8e-4\n")
    (wd / "lcurve_full.jsonl").write_text("".join(json.dumps({"step": s, "lr": 1e-3}) + "\n" for s in (1, 5, 10, 15)))
    user_train.truncate_curves(wd, 12)
    assert (wd / "lcurve.out").read_text() == "# step rmse lr\n# a note\n      1 1.0 1e-3\n      5 0.9 1e-3\n     10 0.8 9e-4\n"
    assert [json.loads(x)["step"] for x in (wd / "lcurve_full.jsonl").read_text().splitlines()] == [1, 5, 10]
    user_train.truncate_curves(wd, 10)  # a row at the checkpoint's own step stays
    assert [json.loads(x)["step"] for x in (wd / "lcurve_full.jsonl").read_text().splitlines()] == [1, 5, 10]


def test_resume_request_refuses_what_it_cannot_resume(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        user_train.resume_request(tmp_path / "absent")
    wd = _folder(tmp_path, [40])
    with pytest.raises(UserError, match="no dpharness train ran there"):
        user_train.resume_request(wd)
    (wd / user_train.REQUEST_NAME).write_text(json.dumps(
        {"input": str(tmp_path / "input.json"), "variant": "baseline", "device": "cpu", "follow_upstream_order": False}))
    with pytest.raises(UserError, match="a resumed run keeps its variant"):
        user_train.resume_request(wd, variant="fused")
    req = user_train.resume_request(wd)
    assert (req.restart, req.output, req.variant, req.device) == (wd / "model.ckpt-40.pt", wd, "baseline", "cpu")
    (wd / "model.ckpt.pt").unlink()
    (wd / "model.ckpt-40.pt").unlink()
    with pytest.raises(UserError, match="no checkpoint"):
        user_train.resume_request(wd)


def test_sigterm_in_each_phase_of_the_child(tmp_path, monkeypatch):
    """Start-up: exit at once, nothing to save (stopped.json says no step); the loop: a stop asked
    for at the next step boundary; after the last step: the child finishes normally (the
    training is complete: no stop, no stopped.json)."""
    from harness.child import resume

    for phase in ("start-up", "loop", "finished"):
        monkeypatch.setattr(resume._State, "phase", phase)
        monkeypatch.setattr(resume._State, "term", False)
        d = tmp_path / phase
        d.mkdir()
        if phase == "start-up":
            with pytest.raises(SystemExit) as e:
                resume._on_term(d)
            assert e.value.code == resume.STOP_EXIT
            assert resume.read_stopped(d) == {"signal": "SIGTERM", "steps_done": None, "checkpoint": None}
        else:
            resume._on_term(d)
            assert resume._State.term is (phase == "loop") and resume.read_stopped(d) is None
