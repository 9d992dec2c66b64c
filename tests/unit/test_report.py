"""harness.report.render: the self-contained HTML from synthetic results (the summary it leads with, the
selection, links, plots), the committed records' headline, and a real headless-Chromium render.
CI needs: apt-get install -y chromium (the render tests skip with a reason when it is absent)."""
from __future__ import annotations

import re

import pytest

from harness.report import plots
from harness.report import render as report
from harness.report import summary
from tests._chromium import CHROMIUM, console_lines, probe, screenshot
from tests._fixtures_report import gpu_profile, run_record, typed, write_runs

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
    keys = [(s, sw) for s, _, sw, _ in report.select(typed(recs))]
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
    sp = plots.speedups(typed([a, b, c]))
    assert sp[a["run_id"]] == 1.0 and sp[b["run_id"]] is None and sp[c["run_id"]] is None


def test_lcurve_repair_of_misread_header():
    r = run_record("S", "water", "baseline", 0.1, lcurve=False)
    r["lcurve"] = {w: [1.0, 2.0] for w in ["If", "there", "is", "no", "available", "reference", "data,", "rmse"]}
    lc = plots.lcurve_of(typed([r])[0])
    assert lc is not None and lc["step"] == [1.0, 2.0] and "rmse_f_trn" in lc


# ------------------------------------------------------------------ the summary the page leads with

def _fast_records():
    """Two bench sweeps of water on an H100 with fused and upstream anchors, one profile sweep, and
    one bench sweep without a fast variant (older than both)."""
    s1, s2, s0 = "20260301T000000Z-f01", "20260302T000000Z-f02", "20260228T000000Z-f00"
    table = [(s0, "baseline", 0.050, "baseline"), (s0, "tos", 0.030, "pass"),
             (s1, "baseline", 0.040, "baseline"), (s1, "tos", 0.020, "fail"), (s1, "fp32", 0.030, "pass"),
             (s1, "fused", 0.002, "pass"), (s1, "jax-tos", 0.010, "fail"), (s1, "graph", 0.004, "pass"),
             (s2, "baseline", 0.044, "baseline"), (s2, "fp32-tos", 0.022, "pass"), (s2, "fused", 0.001, "pass"),
             (s2, "fused-mixed", 0.0008, "fail")]
    day = lambda sw: f"{sw[:4]}-{sw[4:6]}-{sw[6:8]}"  # noqa: E731
    recs = [run_record(sw, "water", v, med, verdict=vd, created=f"{day(sw)}T00:00:{i:02d}Z")
            for i, (sw, v, med, vd) in enumerate(table)]
    recs.append(run_record("20260303T000000Z-p01", "water", "fused", 0.0011, profile=gpu_profile(),
                           created="2026-03-03T00:00:00Z"))
    for r in recs:
        if r["variant"] == "fused":
            r["memory"]["gpu_peak_bytes"] = 2**29  # half the baseline's 2**30
    return s0, s1, s2, recs


def test_summary_speedups_against_the_anchors_of_the_same_sweep():
    _, s1, s2, recs = _fast_records()
    rows = {r["variant"]: r for r in summary.rows(typed(recs))}
    assert set(rows) == {"fused", "graph", "fused-mixed"}  # jax-tos is upstream's code: an anchor
    f = rows["fused"]
    assert f["headline"] and not rows["graph"]["headline"] and not rows["fused-mixed"]["headline"]
    assert f["sweep"] == s2 and f["ms"] == pytest.approx(1.0)
    assert (f["legal"]["vs"], f["legal"]["x"]) == ("fp32-tos", pytest.approx(22.0))
    assert (f["legal_gated"]["vs"], f["legal_gated"]["x"]) == ("fp32-tos", pytest.approx(22.0))
    # over both sweeps: s1's best legal is tos (20 ms, failed its gate) -> 10x; s2 -> 22x
    assert (f["min"], f["max"], f["n"]) == (pytest.approx(10.0), pytest.approx(22.0), 2)
    assert f["median"] == pytest.approx(16.0) and f["mem_ratio"] == pytest.approx(0.5)
    g = rows["graph"]  # s1 only: legal tos 20 ms raw, fp32 30 ms passing the gate, jax-tos 10 ms native
    assert (g["legal"]["x"], g["legal_gated"]["vs"], g["legal_gated"]["x"]) == (5.0, "fp32", pytest.approx(7.5))
    assert (g["native"]["vs"], g["native"]["x"]) == ("jax-tos", pytest.approx(2.5))
    # fused-mixed is faster but fails the gate: it never heads the table
    assert rows["fused-mixed"]["verdict"] == "fail"


def test_page_leads_with_the_summary_table(tmp_path):
    _, _, s2, recs = _fast_records()
    write_runs(tmp_path / "runs", recs)
    text = report.write_report(tmp_path / "runs", tmp_path / "report" / "index.html").read_text()
    body = text[text.index("<body>"):]
    after_header = body[body.index("</header>") + len("</header>"):].lstrip()
    assert after_header.startswith('<table id="summary">')
    head = after_header[:after_header.index("</table>")]
    assert "22.0× vs fp32-tos" in head and "10.0 / 16.0 / 22.0×" in head and "0.50×" in head
    assert ">fused</a>" in head and "fused-mixed" not in head  # headline only; the rest below
    assert "2.5× vs jax-tos" in text and "fused-mixed" in text


def test_default_selection_every_fast_sweep_newest_first_older_collapsed(tmp_path):
    s0, s1, s2, recs = _fast_records()
    keys = [sw for _, _, sw, _ in report.select(typed(recs))]
    assert keys == ["20260303T000000Z-p01", s2, s1]  # s0 has no fast variant and is not the latest
    assert [sw for _, _, sw, _ in report.select(typed(recs), all_sweeps=True)] == ["20260303T000000Z-p01", s2, s1, s0]
    write_runs(tmp_path / "runs", recs)
    text = report.write_report(tmp_path / "runs", tmp_path / "report" / "index.html").read_text()
    assert text.index(f"sweep {s2}") < text.index(f"sweep {s1}") and s0 not in text
    older = text[text.index("older sweep(s) of water"):]
    assert f'<details><summary>water — NVIDIA H100 — bench sweep {s1}' in older
    assert f'<div id="water-NVIDIA_H100-{s1}">' in older
    assert f'<h3 id="water-NVIDIA_H100-{s2}">' in text  # the newest bench sweep is open


def test_titles_unique_contents_links_and_run_json_links(tmp_path):
    _, _, _, recs = _fast_records()
    write_runs(tmp_path / "results" / "runs", recs)
    out = report.write_report(tmp_path / "results" / "runs", tmp_path / "results" / "report" / "index.html",
                              all_sweeps=True)
    text = out.read_text()
    titles = re.findall(r"water — NVIDIA H100 — (?:bench|profile) sweep [^<]+", text)
    titles = [t for t in titles if " — git " in t]
    assert len(titles) == 4 and len(set(titles)) == 4 and "2026-03-02 00:00 — git abc1234" in " ".join(titles)
    ids = set(re.findall(r'id="([^"]+)"', text))
    nav = text[text.index("<nav>"):text.index("</nav>")]
    targets = re.findall(r'href="#([^"]+)"', nav)
    assert len(targets) >= 5 and set(targets) <= ids
    links = set(re.findall(r'href="(\.\./runs/[^"]+\.json)"', text))
    assert len(links) == len(recs) and all((out.parent / h).is_file() for h in links)


def test_csv_next_to_the_page_and_linked(tmp_path):
    _, _, _, recs = _fast_records()
    write_runs(tmp_path / "runs", recs)
    out = report.write_report(tmp_path / "runs", tmp_path / "report" / "index.html")
    assert 'href="runs.csv"' in out.read_text()
    import pandas as pd

    df = pd.read_csv(out.parent / "runs.csv")
    assert len(df) == len(recs) and "timing.step_s_median" in df.columns


def _yscales(monkeypatch, plot, *args):
    seen = []
    monkeypatch.setattr(plots, "_png", lambda fig: seen.append([ax.get_yscale() for ax in fig.axes]) or "x")
    assert plot(*args) == "x"
    return seen[0]


def test_step_time_and_history_plots_are_log_scale(monkeypatch):
    _, _, s2, recs = _fast_records()
    assert _yscales(monkeypatch, plots.plot_step_times, typed([r for r in recs if r["sweep_id"] == s2]), "t") == ["log"]
    assert _yscales(monkeypatch, plots.plot_history, typed(recs), "water", "NVIDIA H100") == ["log"]


def test_no_fast_variant_says_so_where_the_summary_goes(html_path):
    """_records(): graph failed and nothing else goes beyond upstream: no ratio to lead with."""
    text = html_path.read_text()
    after_header = text[text.index("</header>") + len("</header>"):].lstrip()
    assert after_header.startswith('<p id="summary">No fast variant measured beside upstream anchors yet')


def test_history_in_the_default_selection(tmp_path):
    _, _, _, recs = _fast_records()
    write_runs(tmp_path / "runs", recs)
    text = report.write_report(tmp_path / "runs", tmp_path / "i.html").read_text()
    assert text.count("<h3>History</h3>") == 1  # once per (system, card), not per section


def test_committed_records_headline_fused_on_every_system_and_card():
    """The real answer: fused heads the table for water, copper and alcumg on the H200 and the H100."""
    from harness.results import runs as results

    heads = {(r["system"], r["card"].split()[1]): r for r in summary.rows(results.load_runs()) if r["headline"]}
    want = {(s, c) for s in ("water", "copper", "alcumg") for c in ("H200", "H100")}
    assert want <= set(heads)
    for k in want:
        assert heads[k]["variant"] == "fused", (k, heads[k]["variant"])
        assert heads[k]["legal"]["x"] > 5 and heads[k]["legal"]["vs"] in ("baseline", "fp32", "tos", "fp32-tos")


# ------------------------------------------------------------------ headless Chromium

@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_collector_catches_script_errors(tmp_path):
    """The probe used below can fail: a page that throws and logs an error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head></head><body><header></header><p id="summary">x</p>'
                   '<script>console.error("logged"); undefined_function();</script></body></html>')
    got = probe(bad)
    assert any("undefined_function" in e for e in got["errors"]) and any("logged" in e for e in got["errors"])
    assert got["summary_tag"] == "P"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_renders_in_headless_chromium(tmp_path):
    _, _, _, recs = _fast_records()
    write_runs(tmp_path / "runs", recs + _records())
    html_path = report.write_report(tmp_path / "runs", tmp_path / "report" / "index.html")
    got = probe(html_path)
    assert got["errors"] == [] and got["console"] == [], got
    assert got["after_header"] == "summary" and got["summary_tag"] == "TABLE"
    assert 0 <= got["summary_top"] < got["summary_bottom"] <= got["inner_height"], got  # on the first screen
    # a summary row links to its sweep; an older one is collapsed, and following the link opens it
    _, s1, _, _ = _fast_records()
    assert probe(html_path, f"water-NVIDIA_H100-{s1}")["target_revealed"]
    assert not probe(html_path, "no-such-section")["target_revealed"]
    shot = tmp_path / "shot.png"
    r = screenshot(html_path, shot)
    assert not console_lines(r.stderr)
    from PIL import Image
    import numpy as np

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[1] == 1280
    non_white = (img < 245).any(axis=2).mean()
    assert non_white > 0.01, f"screenshot is blank ({non_white:.4%} non-white pixels)"


def test_upstream_native_options_are_labelled_outside_the_rule(tmp_path):
    """A variant that set upstream-native switches (ptx-compile-tos) is described as outside the
    three-parameter rule; a legal one (tos) is not."""
    native = run_record(NEW, "water", "ptx-compile-tos", 0.05, verdict="pass", created="2026-02-02T00:00:05Z")
    native.update(upstream_options={"training/enable_compile": True}, upstream_only=True)
    write_runs(tmp_path / "runs", _records() + [native])
    text = report.write_report(tmp_path / "runs", tmp_path / "r" / "index.html").read_text()
    label = "upstream-native, outside the three-parameter rule: training/enable_compile=True"
    assert text.count(label) == 1
    i = text.index(label)
    assert text.rfind("<dt>", 0, i) == text.rfind("<dt>ptx-compile-tos", 0, i)


def test_sections_read_the_results_tree_beside_runs_not_the_checkouts(tmp_path):
    # a report of an empty tree must not show this checkout's committed convergence/floor records
    (tmp_path / "convergence").mkdir()
    (tmp_path / "convergence" / "x-water.json").write_text("{not json")
    out = report.write_report(tmp_path / "runs", tmp_path / "index.html")
    text = out.read_text()
    assert "No results yet" in text and 'id="training"' not in text


def test_every_tf_v2_family_sweep_is_shown_not_only_the_newest(tmp_path):
    """The TF v2 family (asc-*) beside 3.2.0's baseline: each of its sweeps stays in the default
    report like a fast variant's, so a later plain CPU bench does not hide it."""
    fam = [run_record("20260401T000000Z-tf1", "water", "baseline", 0.2, card="cpu", created="2026-04-01T00:00:00Z"),
           run_record("20260401T000000Z-tf1", "water", "asc-baseline", 0.16, card="cpu", created="2026-04-01T00:01:00Z")]
    fam[1]["backend"], fam[1]["upstream_only"] = "tf-v2", True  # v2's code as released: not a fast variant
    later = [run_record("20260402T000000Z-pl", "water", "baseline", 0.2, card="cpu", created="2026-04-02T00:00:00Z")]
    keys = [sw for _, _, sw, _ in report.select(typed(fam + later))]
    assert keys == ["20260402T000000Z-pl", "20260401T000000Z-tf1"]
    fam[1]["backend"] = "pt"  # the same sweep without a family run: collapsed away as before
    assert [sw for _, _, sw, _ in report.select(typed(fam + later))] == ["20260402T000000Z-pl"]
