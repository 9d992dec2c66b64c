"""`dpharness report`: results/report/index.html, ONE self-contained file (plots embedded as base64
PNG) from the results JSONs under results/runs, and runs.csv (the export table) next to it.

It leads with the answer (harness.report.summary): per (system, card), each fast variant's speed-up over
the upstream anchors of its own sweep. Then per system and card a history plot and the sweeps,
newest first: ms/step per variant (log axis) with IQR error bars, speedup vs the baseline of the
SAME sweep (never a ratio across sweeps or cards), learning curves, the accuracy table, the profile
breakdown, multi-GPU scaling when runs carry world_size > 1, and the environment; then a description
of every variant from its manifest, so the report doubles as a write-up. Default selection (select):
the latest bench sweep, every bench sweep with a fast variant and each variant's newest profile per
(system, card), older ones collapsed; --all shows every sweep."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from harness.results import export
from harness.results import runs as results
from harness.report import equivalence as equivalence_section
from harness.report.cells import equivalence_cell, verdict as _verdict
from harness.report import floor as floor_section
from harness.report import precision as precision_section
from harness.report import summary, training, worksize
from harness.report import trajectory as trajectory_section
from harness.results.runs import ROOT, RUNS
from harness.report.summary import is_fast, is_profile_sweep, stamp, sweep_groups, world_size
from harness.core import fsutil
from harness.core.formatting import number
from harness.core.records import Environment, NcuResult, Profile, StoredRun, Timing
from harness.report.plots import plot_history, plot_lcurves, plot_profile, plot_scaling, plot_step_times, speedups


OUT = ROOT / "results" / "report" / "index.html"


PATCHES = ROOT / "patches"


def select(runs: list[StoredRun], all_sweeps: bool = False) -> list[tuple[str, str, str, list[StoredRun]]]:
    """[(system, card, sweep_id, runs)], per (system, card) newest first. Unless all_sweeps: the
    latest bench sweep, every bench sweep holding a fast variant (the history of the answer) or a
    TF v2 family run, and
    each profile sweep that holds the newest profile of some (system, card, variant): a later
    `dpharness profile` must not hide the last bench table, nor the last profile of another variant."""
    groups = sweep_groups(runs)
    stamps = {k: stamp(k, rs) for k, rs in groups.items()}
    shown = set(_open_keys(groups, stamps))
    shown |= {k for k, rs in groups.items() if not is_profile_sweep(rs) and any(is_fast(r) for r in rs)}
    # and every sweep of the TF v2 family (the competition's era beside 3.2.0's, asc-*)
    shown |= {k for k, rs in groups.items() if any(r.backend == "tf-v2" for r in rs)}
    keys = sorted((k for k in groups if all_sweeps or k in shown), key=stamps.get, reverse=True)
    keys.sort(key=lambda k: k[:2])  # stable: (system, card) ascending, newest sweep first in each
    return [(k[0], k[1], k[2], _order(groups[k])) for k in keys]


def _open_keys(groups: dict[tuple, list[StoredRun]], stamps: dict[tuple, str]) -> list[tuple]:
    """The sweeps shown open: per (system, card) the newest bench sweep, and the sweep of each
    variant's newest profile; older sweeps are collapsed."""
    newest: dict[tuple, tuple[str, tuple]] = {}  # (system, card[, variant]) -> (stamp, group key)
    for k, rs in groups.items():
        s, c, _ = k
        keys = [(s, c, "profile", r.variant) for r in rs] if is_profile_sweep(rs) else [(s, c, "bench")]
        for key in keys:
            if key not in newest or stamps[k] > newest[key][0]:
                newest[key] = (stamps[k], k)
    return [k for _, k in newest.values()]


def _order(rs: list[StoredRun]) -> list[StoredRun]:
    """baseline first, then in run order."""
    return sorted(rs, key=lambda r: (r.variant != "baseline", world_size(r), r.created or "", r.run_id))


def description(r: StoredRun) -> str:
    if r.variant_description:
        return str(r.variant_description)
    m = PATCHES / str(r.variant) / "manifest.yaml"
    if m.is_file():
        try:
            import yaml

            return str((yaml.safe_load(m.read_text()) or {}).get("description") or "")
        except Exception:
            return ""
    return ""




TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>dpharness report</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin:0 0 2px} h2{border-bottom:2px solid #4a7ab5;padding-bottom:4px;margin-top:36px} h3{margin-top:28px}
header p{margin:2px 0 8px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px} th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eef3fa} td.l,th.l{text-align:left} .pass{color:#0a7a2a;font-weight:bold} .fail{color:#b00020;font-weight:bold}
.muted{color:#777;font-size:12px} img{max-width:100%;display:block;margin:6px 0} .warn{color:#b06000}
dl dt{font-weight:bold;margin-top:8px} code{background:#f4f4f4;padding:0 3px}
#summary{font-size:13.5px} #summary th,#summary td{padding:3px 6px} #summary caption{text-align:left;font-weight:bold;font-size:15px;padding-bottom:4px}
#summary td.big{font-weight:bold} td.nw{white-space:nowrap}
details{margin:6px 0} details>summary{cursor:pointer;color:#2a5a95} nav li{margin:2px 0} nav a{margin-right:6px}
</style></head><body>
<header><h1>dpharness report</h1>
<p class="muted">generated {{ generated }} from {{ n_runs }} run record(s) in <code>results/runs</code>;
{{ 'all sweeps' if all_sweeps else 'per (system, card): the latest bench sweep, every bench sweep with a fast variant, the newest profile of each variant' }}.
Speed-ups are ratios within one sweep on one card only.{% if csv %} All records as one table: <a href="{{ csv }}">{{ csv }}</a>.{% endif %}</p></header>
{% if summary %}<table id="summary"><caption>The answer: the headline fast variant per system and card, against the fastest upstream run of its own sweep</caption>
{% include "head" %}
{% for r in summary if r.headline %}{% include "row" %}{% endfor %}</table>
<p class="muted">Newest bench sweep holding the variant and an upstream anchor. <em>legal</em>: upstream's code with one of
the four ASC22-legal settings (baseline, fp32, tos, fp32-tos); <em>upstream-native</em>: upstream's code alone, any of its
own options (compile/tf32 flags, JAX/TF backends); each named after the run it divides. min / median / max: the legal
speed-up over every bench sweep that holds both (sweeps). Gate: the variant's accuracy verdict in that sweep.</p>
<details><summary>every fast variant ({{ summary|length }} rows)</summary><table>
{% include "head" %}
{% for r in summary %}{% include "row" %}{% endfor %}</table></details>
{% elif groups %}<p id="summary">No fast variant measured beside upstream anchors yet: run <code>dpharness bench --variant fused</code>.</p>{% endif %}
{% if not groups %}
<p id="empty"><strong>No results yet.</strong> Run <code>make bench</code> (or <code>dpharness bench</code>) to produce
results JSONs under <code>results/runs/</code>, then <code>make report</code>.</p>
{% else %}
<nav><h2 id="contents">Contents</h2><ul>
{% for g in groups %}<li><a href="#{{ g.anchor }}"><strong>{{ g.system }} — {{ g.card }}</strong></a>:
{% for s in g.open %}<span class="muted">{{ s.kind }}</span> <a href="#{{ s.anchor }}">{{ s.sweep }}</a>{% endfor %}{% if g.older %}<span class="muted">older:</span>
{% for s in g.older %}<a class="muted" href="#{{ s.anchor }}">{{ s.sweep }}</a>{% endfor %}{% endif %}</li>
{% endfor %}{% if training or trajectories %}<li><a href="#training">Training</a></li>{% endif %}{% if equivalences %}<li><a href="#equivalence">Training equivalence</a></li>{% endif %}{% if budgets %}<li><a href="#precision">Precision budget</a></li>{% endif %}{% if floors %}<li><a href="#floor">Floor</a></li>{% endif %}{% if work_sizes %}<li><a href="#work-size">Work size</a></li>{% endif %}{% if variants %}<li><a href="#variants">Variants</a></li>{% endif %}</ul></nav>
{% endif %}
{% for g in groups %}
<h2 id="{{ g.anchor }}">{{ g.system }} — {{ g.card }}</h2>
{% if g.img_history %}<h3>History</h3><img alt="history of ms/step per variant" src="{{ g.img_history }}">{% endif %}
{% for s in g.open %}<h3 id="{{ s.anchor }}">{{ s.title }}</h3>{% include "section" %}{% endfor %}
{# the ids sit inside the <details>: following a link to one opens every <details> around it #}
{% if g.older %}<details><summary>{{ g.older|length }} older sweep(s) of {{ g.system }} on {{ g.card }}</summary>
{% for s in g.older %}<details><summary>{{ s.title }}</summary><div id="{{ s.anchor }}">{% include "section" %}</div></details>{% endfor %}
</details>{% endif %}
{% endfor %}
{% if work_sizes %}<h2 id="work-size">Work size</h2>
<p class="muted">Sweeps that benched several work sizes (<code>bench --replicate AxBxC,... --batch-size N,...</code>): step time and
throughput against the atoms a step trains on; exponent: slope of log(ms/step) vs log(atoms per step) in that sweep (1 = linear);
memory exponent: the same for the process's peak GPU memory (2 = an all-pairs stage sets the peak).</p>
{% for w in work_sizes %}<h3>{{ w.system }} — {{ w.card }}, sweep {{ w.sweep }}</h3>
<img alt="ms/step against atoms per step" src="{{ w.img }}">
<table><tr><th>variant</th><th>growth exponent</th><th>atoms × frames: ms/step</th><th>memory exponent</th><th>atoms × frames: peak GPU memory (per atom)</th></tr>
{% for r in w.rows %}<tr><td>{{ r.variant }}</td><td>{{ r.exponent }}</td><td>{{ r.sizes }}</td><td>{{ r.memory_exponent }}</td><td>{{ r.memory }}</td></tr>{% endfor %}</table>
{% if w.failed %}<p class="muted">failed: {{ w.failed|join(', ') }}</p>{% endif %}
{% endfor %}{% endif %}
{% include "training" %}
{% include "equivalence" %}
{% include "precision" %}
{% include "floor" %}
{% if variants %}<h2 id="variants">Variants</h2><dl>
{% for v in variants %}<dt>{{ v.name }}{% if v.chain %} <span class="muted">({{ v.chain }})</span>{% endif %}</dt><dd>{{ v.description }}{% if v.overrides %}<br><span class="muted">overrides: {{ v.overrides }}</span>{% endif %}{% if v.native %}<br><span class="muted">upstream-native, outside the three-parameter rule: {{ v.native }}</span>{% endif %}</dd>{% endfor %}
</dl>{% endif %}
</body></html>
"""


HEAD = """<tr><th class="l">system</th><th class="l">card</th><th class="l">variant</th><th>ms/step</th><th>vs best legal</th>
<th>vs best legal passing gate</th><th>vs best native</th><th>vs best legal: min / med / max</th><th>sweeps</th><th>gate</th><th>peak mem / baseline</th></tr>
"""


ROW = """<tr><td class="l">{{ r.system }}</td><td class="l nw">{{ r.card }}</td><td class="l big"><a href="#{{ r.anchor }}">{{ r.variant }}</a></td>
<td>{% if r.href %}<a href="{{ r.href }}">{{ r.ms }}</a>{% else %}{{ r.ms }}{% endif %}</td><td class="big nw">{{ r.legal }}</td>
<td class="nw">{{ r.legal_gated }}</td><td class="nw">{{ r.native }}</td><td class="nw">{{ r.range }}</td><td>{{ r.n }}</td>
<td class="{{ r.vclass }}">{{ r.verdict }}</td><td>{{ r.mem }}</td></tr>
"""


SECTION = """<p class="muted">{{ s.runs|length }} run(s), {{ s.steps }} steps per run; variant names link to the run records</p>
<table><tr><th class="l">variant</th><th>status</th><th>ms/step</th><th>IQR ms</th><th>speedup vs baseline</th>
<th>peak GPU MiB</th><th>startup s</th><th>accuracy</th></tr>
{% for r in s.rows %}<tr><td class="l">{% if r.href %}<a href="{{ r.href }}">{{ r.variant }}</a>{% else %}{{ r.variant }}{% endif %}</td><td>{{ r.status }}</td><td>{{ r.ms }}</td><td>{{ r.iqr }}</td>
<td>{{ r.speedup }}</td><td>{{ r.mem }}</td><td>{{ r.startup }}</td><td class="{{ r.vclass }}">{{ r.verdict }}</td></tr>
{% if r.error %}<tr><td class="l warn" colspan="8">{{ r.error }}</td></tr>{% endif %}{% endfor %}
</table>
{% if s.img_steps %}<img alt="ms/step per variant" src="{{ s.img_steps }}">{% endif %}
{% if s.accuracy %}<h4>Accuracy</h4>
<table><tr><th class="l">variant</th>{% for c in s.acc_cols %}<th>{{ c }}</th>{% endfor %}<th>verdict</th><th class="l">training equivalence (variant &minus; baseline, 90% CI, margin)</th><th class="l">detail</th></tr>
{% for a in s.accuracy %}<tr><td class="l">{{ a.variant }}</td>{% for v in a.vals %}<td>{{ v }}</td>{% endfor %}
<td class="{{ a.vclass }}">{{ a.verdict }}</td><td class="l">{{ a.equivalence }}</td><td class="l">{{ a.detail }}</td></tr>{% endfor %}</table>{% endif %}
{% if s.img_lcurve %}<h4>Learning curves</h4><img alt="learning curves" src="{{ s.img_lcurve }}">{% endif %}
{% if s.img_profile %}<h4>Profile breakdown</h4><img alt="profile breakdown" src="{{ s.img_profile }}">
<table><tr><th class="l">variant</th><th>wall ms/step</th><th>GPU busy ms</th><th>host gap ms</th><th>kernels/step</th><th>launches/step</th><th>memcpy/step</th></tr>
{% for p in s.profiles %}<tr><td class="l">{{ p.variant }}</td><td>{{ p.wall }}</td><td>{{ p.busy }}</td><td>{{ p.gap }}</td><td>{{ p.kernels }}</td><td>{{ p.launches }}</td><td>{{ p.memcpy }}</td></tr>{% endfor %}</table>
{% for p in s.profiles %}{% if p.top %}<details><summary>top kernels / ops: {{ p.variant }}</summary><table><tr><th>ms/step</th><th>count</th><th class="l">name</th></tr>
{% for k in p.top %}<tr><td>{{ k.ms }}</td><td>{{ k.count }}</td><td class="l">{{ k.name }}</td></tr>{% endfor %}</table></details>{% endif %}{% endfor %}
{% for p in s.profiles %}{% if p.ncu or p.ncu_error %}<h4>Nsight Compute: {{ p.variant }}{% if p.ncu_error %} ({{ p.ncu_error }}){% endif %}</h4>
<table><tr><th>time us</th><th>SM % of peak</th><th>DRAM % of peak</th><th>DRAM GB/s</th><th>FP64 GFLOP/s (CUDA cores)</th><th>FP64 % of datasheet peak</th><th class="l">kernel</th></tr>
{% for k in p.ncu %}<tr><td>{{ k.t }}</td><td>{{ k.sm }}</td><td>{{ k.dram }}</td><td>{{ k.bw }}</td><td>{{ k.fl }}</td><td>{{ k.flp }}</td><td class="l">{{ k.name }}</td></tr>{% endfor %}</table>{% endif %}{% endfor %}
{% endif %}
{% if s.img_scaling %}<h4>Multi-GPU scaling</h4><img alt="scaling" src="{{ s.img_scaling }}">{% endif %}
<h4>Environment</h4><table>{% for k, v in s.env %}<tr><td class="l">{{ k }}</td><td class="l">{{ v }}</td></tr>{% endfor %}</table>
"""


def _acc_cell(col: str, x: Any) -> str:
    if col == "numb_test":  # frames per validation system; 0 is dp test's "all of them"
        return "all" if x == 0 else str(x)
    return number(x, 1, 5)


def _anchor(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def _kind(rs: list[StoredRun]) -> str:
    return "profile" if is_profile_sweep(rs) else "bench"


def _title(system: str, card: str, sweep: str, rs: list[StoredRun]) -> str:
    """Unique per section: system, card, sweep id, date and the harness commit(s) of the sweep."""
    date = max(r.created or "" for r in rs)[:16].replace("T", " ")
    shas = sorted({str(r.environment.harness_git or "?")[:7] for r in rs})
    return f"{system} — {card} — {_kind(rs)} sweep {sweep} — {date or '?'} — git {', '.join(shas)}"


def _ncu_rows(ncu: NcuResult | None) -> list[dict]:
    """Nsight Compute figures of a profiled run (profile stage's per-kernel "figures"), one row each."""
    rows = []
    for k in (ncu.kernels if ncu is not None else None) or []:
        f = k.get("figures") or {}
        rows.append({"t": number(f.get("time_us"), 1, 1), "sm": number(f.get("sm_pct"), 1, 1),
                     "dram": number(f.get("dram_pct"), 1, 1), "bw": number(f.get("dram_gb_s"), 1, 0),
                     "fl": number(f.get("fp64_gflop_s"), 1, 0), "flp": number(f.get("fp64_pct"), 1, 1),
                     "name": k.get("name", "")[:120]})
    return rows


def build_sections(runs: list[StoredRun], all_sweeps: bool = False, href=lambda r: None) -> list[dict]:
    """One dict per selected sweep (select's order); href(record) -> link to its JSON, or None."""
    groups = sweep_groups(runs)
    opened = set(_open_keys(groups, {k: stamp(k, rs) for k, rs in groups.items()}))
    sections = []
    for system, card, sweep, rs in select(runs, all_sweeps):
        sp = speedups(rs)
        rows = []
        for r in rs:
            # a failed run's few observed steps are no speed: only ok runs show ms/step
            t = r.timing if r.status == "ok" else Timing()
            verdict, vclass = _verdict(r.accuracy.verdict)
            mem = r.memory.gpu_peak_bytes
            rows.append({"variant": r.variant + (f" ×{world_size(r)}" if world_size(r) > 1 else ""),
                         "status": r.status, "ms": number(t.step_s_median, 1e3),
                         "iqr": number(t.step_s_iqr, 1e3), "startup": number(t.startup_s, 1, 1),
                         "speedup": f"{sp[r.run_id]:.2f}×" if sp.get(r.run_id) else "-",
                         "mem": number(mem, 1 / 2**20, 0) if mem else "-", "verdict": verdict, "vclass": vclass,
                         "error": r.error, "href": href(r)})
        acc, acc_cols = [], []
        for r in rs:
            a = r.accuracy
            if a.dp_test or a.verdict:
                for k in (a.dp_test or {}):
                    if k not in acc_cols:
                        acc_cols.append(k)
        for r in rs:
            a = r.accuracy
            if a.dp_test or a.verdict:
                verdict, vclass = _verdict(a.verdict)
                dt = a.dp_test or {}
                acc.append({"variant": r.variant, "vals": [_acc_cell(c, dt.get(c)) for c in acc_cols],
                            "verdict": verdict, "vclass": vclass, "detail": a.detail or "",
                            "equivalence": equivalence_cell(a.equivalence)})
        profiles = []
        for r in rs:
            p = r.profile
            if not isinstance(p, Profile) or p.status not in ("ok", "partial"):
                continue
            top = p.top_kernels or [{"name": o["name"], "total_s": o.get("self_s", 0), "count": o["count"]}
                                    for o in p.top_ops or []]
            n = max(1, p.steps or 1)
            ncu = p.ncu if isinstance(p.ncu, NcuResult) else None
            profiles.append({"variant": r.variant, "wall": number(p.wall_s_per_step, 1e3),
                             "busy": number(p.gpu_busy_s_per_step, 1e3),
                             "gap": number(p.host_gap_s_per_step, 1e3),
                             "kernels": number(p.kernels_per_step, 1, 1),
                             "launches": number(p.launches_per_step, 1, 1),
                             "memcpy": number((p.memcpy or {}).get("per_step"), 1, 1),
                             "top": [{"ms": number(k.get("total_s", 0) / n, 1e3, 3), "count": k.get("count"),
                                      "name": k.get("name", "")[:160]} for k in top[:15]],
                             "ncu": _ncu_rows(ncu), "ncu_error": ncu.error if ncu is not None else None})
        env = rs[0].environment if rs else Environment()
        env_rows = [("card", card), ("driver", env.driver), ("CUDA", env.cuda),
                    ("torch", env.torch), ("python", env.python),
                    ("harness git", env.harness_git), ("harness", env.harness_version),
                    ("platform", env.platform), ("host", env.hostname),
                    ("CPUs", env.cpu_count)]
        steps = sorted({r.steps for r in rs if r.steps is not None})
        sections.append({
            "system": system, "card": card, "sweep": sweep, "runs": rs, "rows": rows,
            "anchor": _anchor(system, card, sweep), "title": _title(system, card, sweep, rs),
            "kind": _kind(rs),
            "open": (system, card, sweep) in opened,
            "steps": ", ".join(str(s) for s in steps) or "?",
            "accuracy": acc, "acc_cols": acc_cols, "profiles": profiles,
            "env": [(k, "-" if v is None else v) for k, v in env_rows],
            "img_steps": plot_step_times(rs, f"{system} on {card}, sweep {sweep}"),
            "img_lcurve": plot_lcurves(rs),
            "img_profile": plot_profile(rs),
            "img_scaling": plot_scaling(rs),
        })
    return sections


def by_card(runs: list[StoredRun], sections: list[dict]) -> list[dict]:
    """The sections grouped per (system, card): open ones (newest bench, newest profiles) first,
    older ones collapsed; one history plot per group."""
    out: dict[tuple[str, str], dict] = {}
    for s in sections:
        g = out.get((s["system"], s["card"]))
        if g is None:
            g = out[(s["system"], s["card"])] = {
                "system": s["system"], "card": s["card"], "anchor": _anchor(s["system"], s["card"]),
                "img_history": plot_history(runs, s["system"], s["card"]), "open": [], "older": []}
        g["open" if s["open"] else "older"].append(s)
    return list(out.values())


def _ratio_text(row: dict, key: str) -> str:
    return row[key]["text"] if row[key]["x"] else ("no judged anchor" if key.endswith("gated") else "-")


def summary_rows(runs: list[StoredRun], href=lambda r: None) -> list[dict]:
    """summary.rows formatted for the page; `anchor` links each row to its sweep's section."""
    out = []
    for r in summary.rows(runs):
        verdict, vclass = _verdict(r["verdict"] or "not judged")
        out.append({"headline": r["headline"], "system": r["system"], "card": r["card"], "variant": r["variant"],
                    "ms": f"{r['ms']:.2f}", "href": href(r["run"]), "sweep": r["sweep"],
                    "anchor": _anchor(r["system"], r["card"], r["sweep"]),
                    "legal": _ratio_text(r, "legal"), "legal_gated": _ratio_text(r, "legal_gated"),
                    "native": _ratio_text(r, "native"),
                    "range": f"{r['min']:.1f} / {r['median']:.1f} / {r['max']:.1f}×", "n": r["n"],
                    "verdict": verdict, "vclass": vclass,
                    "mem": f"{r['mem_ratio']:.2f}×" if r["mem_ratio"] else "-"})
    return out


def variant_list(runs: list[StoredRun]) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: r.created or ""):
        ov = r.overrides or {}
        native = r.upstream_options or {}
        seen[r.variant] = {"name": r.variant, "description": description(r),
                           "chain": " → ".join(r.variant_chain or []),
                           "overrides": ", ".join(f"{k}={v}" for k, v in ov.items()),
                           "native": ", ".join(f"{k}={v}" for k, v in native.items())}
    return sorted(seen.values(), key=lambda v: (v["name"] != "baseline", v["name"]))


def render(runs: list[StoredRun], all_sweeps: bool = False, href=lambda r: None, csv: str | None = None,
           convergence: list | None = None, floors: list | None = None, trajectories: list | None = None,
           equivalences: list | None = None, budgets: list | None = None) -> str:
    """The page; href(record) -> relative link to the record's JSON; csv: link to the flat table;
    convergence: ConvergenceRecords for the Training section; floors: FloorRecords for the Floor section;
    trajectories: TrajectoryRecords for the Training section's same-trajectory part; equivalences:
    `dpharness equivalence` records (dicts) for the Training equivalence section; budgets:
    `dpharness precision-budget` records (dicts) for the Precision budget section."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.DictLoader({"head": HEAD, "row": ROW, "section": SECTION,
                                                                "training": training.TEMPLATE,
                                                                "trajectory": trajectory_section.TEMPLATE,
                                                                "floor": floor_section.TEMPLATE,
                                                                "precision": precision_section.TEMPLATE,
                                                                "equivalence": equivalence_section.TEMPLATE}),
                             autoescape=True,
                             undefined=jinja2.StrictUndefined)
    sections = build_sections(runs, all_sweeps, href)
    return env.from_string(TEMPLATE).render(
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), n_runs=len(runs), all_sweeps=all_sweeps,
        summary=summary_rows(runs, href), groups=by_card(runs, sections), variants=variant_list(runs), csv=csv,
        work_sizes=worksize.sections(runs), training=training.sections(convergence or []),
        trajectories=trajectory_section.sections(trajectories or []),
        floors=floor_section.sections(floors or [], runs),
        equivalences=equivalence_section.sections(equivalences or []),
        budgets=precision_section.sections(budgets or []))


CSV_NAME = "runs.csv"


def write_report(runs_dir: Path = RUNS, out: Path = OUT, all_sweeps: bool = False,
                 convergence_dir: Path | None = None, floor_dir: Path | None = None,
                 trajectory_dir: Path | None = None, equivalence_dir: Path | None = None,
                 precision_dir: Path | None = None) -> Path:
    """index.html and, next to it, runs.csv (the export table); bad record files are skipped
    with a warning (results.iter_runs). The Training and Floor sections read the convergence/ and
    floor/ folders beside runs_dir unless told otherwise: one results tree, not the checkout's."""
    out, runs_dir = Path(out), Path(runs_dir)
    convergence_dir = runs_dir.parent / "convergence" if convergence_dir is None else Path(convergence_dir)
    floor_dir = runs_dir.parent / "floor" if floor_dir is None else Path(floor_dir)
    trajectory_dir = runs_dir.parent / "trajectory" if trajectory_dir is None else Path(trajectory_dir)
    equivalence_dir = runs_dir.parent / "equivalence" if equivalence_dir is None else Path(equivalence_dir)
    precision_dir = runs_dir.parent / "precision" if precision_dir is None else Path(precision_dir)
    pairs = list(results.iter_runs(results.run_files(runs_dir))) if runs_dir.is_dir() else []
    files = {r.run_id: p for p, r in pairs}
    runs = [r for _, r in pairs]

    def href(r: StoredRun) -> str | None:  # relative, so the page works wherever the checkout is
        p = files.get(r.run_id)
        return Path(os.path.relpath(p.resolve(), out.parent.resolve())).as_posix() if p else None

    csv = None
    if runs:
        export.write_table(export.flatten(runs), out.parent / CSV_NAME, "csv")
        csv = CSV_NAME
    from harness.results import convergence  # the Training section's records

    conv = convergence.load_records(convergence_dir)
    from harness.core.floor_record import load_floors  # the Floor section's records

    floors = load_floors(floor_dir,
                         warn=lambda m: print(f"dpharness: warning: {m}", file=sys.stderr))
    from harness.results import trajectory  # the Training section's same-trajectory records

    trajectories = trajectory.load_records(trajectory_dir)
    equivalences = equivalence_section.load_records(
        equivalence_dir, warn=lambda m: print(f"dpharness: warning: {m}", file=sys.stderr))
    budgets = precision_section.load_records(
        precision_dir, warn=lambda m: print(f"dpharness: warning: {m}", file=sys.stderr))
    text = render(runs, all_sweeps, href, csv, conv, floors, trajectories, equivalences, budgets)
    return fsutil.atomic_write_text(out, text)


def _report_cmd(a) -> int:
    out = write_report(Path(a.runs), Path(a.out), all_sweeps=a.all,
                       convergence_dir=a.convergence and Path(a.convergence), floor_dir=a.floor and Path(a.floor),
                       precision_dir=a.precision and Path(a.precision))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) and {out.parent / CSV_NAME}", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("report", help="write results/report/index.html (one self-contained file)")
    p.add_argument("--all", action="store_true", help="every sweep, not only the latest bench, fast-variant and profile sweeps")
    p.add_argument("--runs", default=str(RUNS), help="directory of results JSONs")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--convergence", default=None,
                   help="directory of convergence records (the Training section; default: convergence/ beside --runs)")
    p.add_argument("--floor", default=None,
                   help="directory of floor records (the Floor section; default: floor/ beside --runs)")
    p.add_argument("--precision", default=None, help="directory of precision-budget records (the Precision budget "
                                                     "section; default: precision/ beside --runs)")
    p.set_defaults(func=_report_cmd)
