"""harness.report: the self-contained HTML from synthetic results, and a real headless-Chromium render.
CI needs: apt-get install -y chromium (the render test skips with a reason when it is absent)."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile


import pytest

from harness import report
from tests._fixtures_report import gpu_profile, run_record, write_runs

OLD, NEW = "20260101T000000Z-aaa", "20260202T000000Z-bbb"


def _records():
    return [
        run_record(OLD, "water", "baseline", 0.200, 0.01, created="2026-01-01T00:00:00Z"),
        run_record(OLD, "water", "fp32", 0.050, 0.002, created="2026-01-01T00:00:01Z"),
        run_record(NEW, "water", "baseline", 0.100, 0.004, verdict="baseline", profile=gpu_profile(),
                   created="2026-02-02T00:00:00Z"),
        run_record(NEW, "water", "fp32", 0.080, 0.003, verdict="pass", profile=gpu_profile(),
                   created="2026-02-02T00:00:01Z"),
        run_record(NEW, "water", "tos", 0.090, 0.003, verdict="fail", created="2026-02-02T00:00:02Z"),
        run_record(NEW, "water", "graph", 0.0, status="failed", created="2026-02-02T00:00:03Z"),
        run_record("20260203T000000Z-ccc", "copper", "baseline", 0.3, 0.01, card="NVIDIA H200",
                   created="2026-02-03T00:00:00Z", world_size=1),
        run_record("20260203T000000Z-ccc", "copper", "baseline", 0.32, 0.01, card="NVIDIA H200",
                   created="2026-02-03T00:00:01Z", world_size=2),
        run_record("20260203T000000Z-ccc", "copper", "baseline", 0.35, 0.01, card="NVIDIA H200",
                   created="2026-02-03T00:00:02Z", world_size=4),
    ]


@pytest.fixture()
def html_path(tmp_path):
    write_runs(tmp_path / "runs", _records())
    return report.write_report(tmp_path / "runs", tmp_path / "report" / "index.html")


def test_empty_results_say_so(tmp_path):
    out = report.write_report(tmp_path / "nothing", tmp_path / "index.html")
    text = out.read_text()
    assert "No results yet" in text and "<img" not in text


def test_latest_sweep_only_and_same_sweep_speedups(html_path):
    text = html_path.read_text()
    assert NEW in text and OLD not in text  # latest sweep per (system, card) by default
    # fp32 speedup 0.100/0.080 within the new sweep; the old sweep's 4.00x must not appear
    assert "1.25×" in text and "4.00×" not in text
    assert "water — NVIDIA H100" in text and "copper — NVIDIA H200" in text


def test_later_profiles_do_not_hide_the_last_bench_sweep(tmp_path):
    """`dpharness profile` after `make bench` adds a profile sweep; the bench table stays, and
    each variant's newest profile is shown (an older profile of the same variant is not)."""
    recs = _records() + [
        run_record("20260205T000000Z-p1", "water", "jax-tos", 0.07, profile=gpu_profile(), created="2026-02-05T00:00:00Z"),
        run_record("20260206T000000Z-p2", "water", "fused", 0.002, profile=gpu_profile(), created="2026-02-06T00:00:00Z"),
        run_record("20260207T000000Z-p3", "water", "fused", 0.002, profile=gpu_profile(), created="2026-02-07T00:00:00Z"),
    ]
    write_runs(tmp_path / "runs", recs)
    keys = [(s, sw) for s, _, sw, _ in report.select(recs)]
    assert ("water", NEW) in keys and ("water", "20260205T000000Z-p1") in keys
    assert ("water", "20260207T000000Z-p3") in keys and ("water", "20260206T000000Z-p2") not in keys
    assert ("water", OLD) not in keys
    text = report.write_report(tmp_path / "runs", tmp_path / "i.html").read_text()
    assert NEW in text and "20260205T000000Z-p1" in text and "20260206T000000Z-p2" not in text


def test_contents(html_path):
    text = html_path.read_text()
    assert 'class="pass">PASS' in text and 'class="fail">FAIL' in text
    assert "Profile breakdown" in text and "gemm_kernel" in text
    assert "Nsight Compute: fp32" in text and "<td>41.0</td><td>7.5</td><td>251</td><td>3</td><td>0.0</td>" in text
    assert "Multi-GPU scaling" in text and "Learning curves" in text
    assert "description of fp32" in text and "560.35" in text and "abc1234" in text
    assert "boom" in text  # the failed run's error is shown


def test_self_contained(html_path):
    text = html_path.read_text()
    imgs = re.findall(r'<img[^>]+src="([^"]+)"', text)
    assert len(imgs) >= 5 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)
    assert "<script" not in text


def test_all_sweeps_history_and_world_size_absent(tmp_path):
    recs = _records()
    write_runs(tmp_path / "runs", recs)
    text = report.write_report(tmp_path / "runs", tmp_path / "i.html", all_sweeps=True).read_text()
    assert OLD in text and NEW in text and "4.00×" in text and "History" in text
    assert all("world_size" not in r for r in recs[:6])  # key absent on most records: handled


def test_speedups_never_cross_sweeps_or_cards():
    a = run_record("S1", "water", "baseline", 0.1)
    b = run_record("S2", "water", "fp32", 0.05)
    c = run_record("S1", "water", "fp32", 0.05, card="NVIDIA A100")
    sp = report.speedups([a, b, c])
    assert sp[a["run_id"]] == 1.0 and sp[b["run_id"]] is None and sp[c["run_id"]] is None


def test_lcurve_repair_of_misread_header():
    r = run_record("S", "water", "baseline", 0.1, lcurve=False)
    r["lcurve"] = {w: [1.0, 2.0] for w in ["If", "there", "is", "no", "available", "reference", "data,", "rmse"]}
    lc = report.lcurve_of(r)
    assert lc is not None and lc["step"] == [1.0, 2.0] and "rmse_f_trn" in lc


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_renders_in_headless_chromium(html_path, tmp_path):
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile_dir:
        r = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile_dir}", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
             "--window-size=1280,2000", html_path.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    assert shot.is_file()
    from PIL import Image
    import numpy as np

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[1] == 1280
    non_white = (img < 245).any(axis=2).mean()
    assert non_white > 0.01, f"screenshot is blank ({non_white:.4%} non-white pixels)"
