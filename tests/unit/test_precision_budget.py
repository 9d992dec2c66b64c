"""The per-stage precision budget without running parity: one row per stage in order, the gate's
parity numbers carried through, the TF32 stages emulated off CUDA (and said so), the table and the
record; a missing checkpoint is one line, exit 2, nothing written."""
from __future__ import annotations

import json

from harness.cli.main import main
from harness.judge import precision_budget as pb


def fake_parity(seen):
    def parity(system, variant, checkpoint, device, emulate_tf32=False):
        seen.append((system, variant, device, emulate_tf32))
        err = {"fused-desc32": 5e-7, "fused-fit32": 1e-7, "fused-fp32": 6e-7, "fused-bf16": 5e-2,
               "fused-desc-tf32": 4e-4, "fused-fit-tf32": 2e-5, "fused-mixed": 3e-3, "fused-tf32-nets": 5e-4, "fused-3xtf32": 2e-6, "fused-3xtf32-kernel": 2e-6}[variant]
        cls, tol = ("mixed", 1e-3) if "tf32" in variant or variant in ("fused-bf16", "fused-mixed") else ("float32", 1e-5)
        verdict = "pass" if err <= tol else "fail"
        return {"verdict": verdict, "detail": "within tolerance" if verdict == "pass" else f"f rel {err:.2e} > {tol:g}",
                "parity": {"class": cls, "tolerance": tol, "max_rel_f": err, "max_rel_e": err / 10}}
    return parity


def test_every_stage_is_measured_where_it_can_be(tmp_path):
    seen = []
    b = pb.measure("water", tmp_path / "c.pt", "cpu", "cpu", fake_parity(seen))
    order = ["fused-desc32", "fused-fit32", "fused-fp32", "fused-desc-tf32", "fused-fit-tf32", "fused-mixed",
             "fused-tf32-nets", "fused-3xtf32", "fused-3xtf32-kernel", "fused-bf16"]
    assert [r.variant for r in b.rows] == order
    # off CUDA the three TF32 rows run with the inputs rounded by hand, and only they
    assert seen == [("water", v, "cpu", "tf32" in v or v == "fused-mixed") for v in order]
    assert b.rows[0].metrics["max_rel_f"] == 5e-7 and b.rows[0].metrics["max_rel_v"] is None
    assert [r.stage.endswith(pb.EMULATED) for r in b.rows] == [False] * 3 + [True] * 6 + [False]
    assert b.rows[5].verdict == "fail" and b.rows[9].verdict == "fail" and b.rows[9].accuracy_class == "mixed"
    text = pb.table(b)
    assert "5.00e-07" in text and "TF32 GEMMs [TF32 emulated]" in text and "mixed): f rel 5.00e-02 > 0.001" in text
    assert json.loads(json.dumps(pb.to_dict(b)))["schema"] == pb.SCHEMA
    seen.clear()  # on CUDA the tensor cores round: nothing emulated, no row renamed
    b = pb.measure("water", tmp_path / "c.pt", "cuda", "H100", fake_parity(seen))
    assert not any(e for *_, e in seen) and not any(pb.EMULATED in r.stage for r in b.rows)


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["precision-budget", "--device", "cpu", "--checkpoint", str(tmp_path / "no.pt"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and not out.exists()


def test_a_users_system_directory_reaches_the_parity_checks(tmp_path, tiny_system, monkeypatch):
    """--system may be a path (a user's data): the parity checks must load that path, the record
    names the system (found by the GPU script's first CPU run, which failed on 'unknown system')."""
    from harness.cli import calibrate

    seen = []
    monkeypatch.setattr(calibrate, "parity_check", fake_parity(seen))
    (tmp_path / "c.pt").write_bytes(b"")
    out = tmp_path / "b.json"
    assert main(["precision-budget", "--system", str(tiny_system), "--device", "cpu",
                 "--checkpoint", str(tmp_path / "c.pt"), "--out", str(out)]) == 0
    assert {s for s, *_ in seen} == {str(tiny_system)}
    assert json.loads(out.read_text())["system"] == "tinywater"


def test_an_emulated_row_asks_the_variants_child_and_only_it_to_round(tmp_path, tiny_system, monkeypatch):
    """parity_check(emulate_tf32=True) sets DPH_TF32_EMULATE=1 in the variant's parity child, not
    in the float64 reference's, and not without it (the children themselves are stubbed: the
    rounding is test_tf32_emulation's)."""
    from harness.cli import calibrate

    envs = {}

    def start(tree, modules, env, name, *args, **kw):
        envs[name] = dict(env)
        return None, tmp_path / f"{name}.log"

    monkeypatch.setattr(calibrate, "start_parity_eval", start)
    monkeypatch.setattr(calibrate, "finish_parity_eval", lambda *a, **k: ({"load": "stubbed"}, {}))
    (tmp_path / "c.pt").write_bytes(b"")
    out = calibrate.parity_check(str(tiny_system), "fused-mixed", tmp_path / "c.pt", "cpu", work_dir=tmp_path / "w",
                                 emulate_tf32=True)
    assert out["verdict"] == "not applicable" and out["detail"] == "stubbed"
    assert envs["fused-mixed"].get("DPH_TF32_EMULATE") == "1" and "DPH_TF32_EMULATE" not in envs["baseline"]
    calibrate.parity_check(str(tiny_system), "fused-mixed", tmp_path / "c.pt", "cpu", work_dir=tmp_path / "w")
    assert "DPH_TF32_EMULATE" not in envs["fused-mixed"]


def test_the_parity_command_can_emulate_tf32(monkeypatch, capsys):
    from harness.cli import calibrate

    seen = []
    monkeypatch.setattr(calibrate, "parity_check",
                        lambda *a, emulate_tf32=False: seen.append(emulate_tf32) or {"verdict": "pass"})
    assert main(["parity", "--variant", "fused-tf32-nets", "--device", "cpu", "--emulate-tf32"]) == 0
    assert main(["parity", "--variant", "fused-tf32-nets", "--device", "cpu"]) == 0
    assert seen == [True, False]


def test_chosen_stages_run_at_once_keep_their_order_and_report_each_row(tmp_path):
    """--stages picks rows (STAGES' order kept, whatever order they were named in), --jobs runs
    them side by side (a GPU call has room for several start-up-bound parity children; a budget
    that ran them one by one did not finish copper's in its call), and each row is reported as it
    finishes, so a call cut short leaves the rows it measured in its log."""
    import threading

    seen, done, gate = [], [], threading.Barrier(3, timeout=10)
    slow = fake_parity(seen)

    def parity(*a, **k):
        gate.wait()  # all three rows in flight at once, or this times out (BrokenBarrierError)
        return slow(*a, **k)

    b = pb.measure("copper", tmp_path / "c.pt", "cuda", "H100", parity,
                   variants=pb.select("fused-tf32-nets,fused-fit-tf32, fused-mixed"), jobs=3, on_row=done.append)
    assert [r.variant for r in b.rows] == ["fused-fit-tf32", "fused-mixed", "fused-tf32-nets"]
    assert sorted(r.variant for r in done) == ["fused-fit-tf32", "fused-mixed", "fused-tf32-nets"]
    line = pb.row_line(b.rows[1])
    assert "3.00e-03" in line and line in pb.table(b)


def test_an_unknown_stage_or_no_job_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "c.pt").write_bytes(b"")
    out = tmp_path / "b.json"
    for extra, why in ((["--stages", "fused,fused-mixed"], "'fused' is not a budget stage"),
                       (["--stages", ","], "no stage named"), (["--jobs", "0"], "--jobs 0")):
        assert main(["precision-budget", "--device", "cpu", "--checkpoint", str(tmp_path / "c.pt"),
                     "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and not out.exists(), err
