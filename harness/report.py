"""`dpharness report`: results/report/index.html, ONE self-contained file (plots embedded as base64
PNG) from the results JSONs under results/runs.

Per system and card: s/step per variant with IQR error bars, speedup vs the baseline of the SAME sweep
(never a ratio across sweeps or cards), learning curves overlaid per variant, the accuracy table,
the profile breakdown as stacked bars, multi-GPU scaling when runs carry world_size > 1, and the
environment; then a description of every variant from its manifest, so the report doubles as a
write-up. Default selection: the latest sweep per (system, card); --all shows every sweep."""
from __future__ import annotations

import base64
import io
import sys
import time
from pathlib import Path
from typing import Any

from .distributed import scaling_efficiency
from .results import ROOT, RUNS, load_runs

OUT = ROOT / "results" / "report" / "index.html"
PATCHES = ROOT / "patches"
# the columns of upstream's lcurve.out for an energy model, for records written with the
# header mis-read (the second '#' line of lcurve.out taken as the header)
LCURVE_ENER = ["step", "rmse_val", "rmse_trn", "rmse_e_val", "rmse_e_trn", "rmse_f_val", "rmse_f_trn", "lr"]
PROFILE_CATEGORIES = ("env-mat/descriptor", "embedding", "fitting", "force/backward", "optimizer", "data", "other")


def card_of(r: dict[str, Any]) -> str:
    dev = r.get("device") or {}
    return str(dev.get("name") or dev.get("kind") or "unknown")


def world_size(r: dict[str, Any]) -> int:
    try:
        return int(r.get("world_size") or 1)
    except (TypeError, ValueError):
        return 1


def lcurve_of(r: dict[str, Any]) -> dict[str, list] | None:
    """The run's lcurve columns; repairs records whose header was mis-read, else re-reads the file."""
    lc = r.get("lcurve")
    if isinstance(lc, dict) and "step" in lc:
        return lc
    path = (r.get("artifacts") or {}).get("lcurve")
    if path:
        p = Path(path) if Path(path).is_absolute() else ROOT / path
        if p.is_file():
            header, rows = None, []
            for line in p.read_text().splitlines():
                if line.startswith("#"):
                    if header is None and "step" in line.split():
                        header = line.lstrip("#").split()
                    continue
                try:
                    rows.append([float(x) for x in line.split()])
                except ValueError:
                    pass
            if header and rows:
                return {h: list(c) for h, c in zip(header, zip(*rows))}
    if isinstance(lc, dict) and len(lc) == len(LCURVE_ENER):
        return dict(zip(LCURVE_ENER, lc.values()))
    return None


def _is_profile_sweep(rs: list[dict]) -> bool:
    """A `dpharness profile` sweep: every run profiled, none judged (bench runs are judged)."""
    return all(isinstance(r.get("profile"), dict) and not (r.get("accuracy") or {}).get("verdict") for r in rs)


def select(runs: list[dict[str, Any]], all_sweeps: bool = False) -> list[tuple[str, str, str, list[dict]]]:
    """[(system, card, sweep_id, runs)]: unless all_sweeps, the latest bench sweep per (system,
    card), and each profile sweep that holds the newest profile of some (system, card, variant):
    a later `dpharness profile` must not hide the last bench table, nor the last profile of
    another variant."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r.get("system", "?"), card_of(r), r.get("sweep_id", "?")), []).append(r)
    stamp = {k: max(x.get("created") or "" for x in rs) + k[2] for k, rs in groups.items()}
    newest: dict[tuple, tuple[str, tuple]] = {}  # (system, card[, variant]) -> (stamp, group key)
    for k, rs in groups.items():
        s, c, _ = k
        keys = [(s, c, "profile", r["variant"]) for r in rs] if _is_profile_sweep(rs) else [(s, c, "bench")]
        for key in keys:
            if key not in newest or stamp[k] > newest[key][0]:
                newest[key] = (stamp[k], k)
    shown = {k for _, k in newest.values()}
    out = []
    for k, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], stamp[kv[0]])):
        if all_sweeps or k in shown:
            out.append((k[0], k[1], k[2], _order(rs)))
    return out


def _order(rs: list[dict]) -> list[dict]:
    """baseline first, then in run order."""
    return sorted(rs, key=lambda r: (r.get("variant") != "baseline", world_size(r), r.get("created") or "", r["run_id"]))


def speedups(rs: list[dict]) -> dict[str, float | None]:
    """run_id -> baseline median / run median, within ONE sweep on ONE card (same world size)."""
    out: dict[str, float | None] = {}
    for r in rs:
        base = next((b for b in rs if b.get("variant") == "baseline" and b.get("status") == "ok"
                     and world_size(b) == world_size(r) and b.get("sweep_id") == r.get("sweep_id")
                     and card_of(b) == card_of(r)), None)
        med = (r.get("timing") or {}).get("step_s_median")
        bmed = (base or {}).get("timing", {}).get("step_s_median") if base else None
        out[r["run_id"]] = bmed / med if bmed and med and r.get("status") == "ok" else None
    return out


def description(r: dict[str, Any]) -> str:
    if r.get("variant_description"):
        return str(r["variant_description"])
    m = PATCHES / str(r.get("variant")) / "manifest.yaml"
    if m.is_file():
        try:
            import yaml

            return str((yaml.safe_load(m.read_text()) or {}).get("description") or "")
        except Exception:
            return ""
    return ""


# ------------------------------------------------------------------ plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_step_times(rs: list[dict], title: str) -> str | None:
    ok = [r for r in rs if r.get("status") == "ok" and (r.get("timing") or {}).get("step_s_median")]
    if not ok:
        return None
    plt = _plt()
    sp = speedups(rs)
    labels = [r["variant"] + (f" ×{world_size(r)}" if world_size(r) > 1 else "") for r in ok]
    med = [r["timing"]["step_s_median"] for r in ok]
    lo = [max(0.0, m - (r["timing"].get("step_s_q25") or m)) for m, r in zip(med, ok)]
    hi = [max(0.0, (r["timing"].get("step_s_q75") or m) - m) for m, r in zip(med, ok)]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(ok) + 2), 3.4))
    bars = ax.bar(labels, med, yerr=[lo, hi], capsize=4, color="#4a7ab5")
    for b, r in zip(bars, ok):
        s = sp.get(r["run_id"])
        if s:
            ax.annotate(f"{s:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 6), textcoords="offset points")
    ax.set_ylabel("s / step (median, IQR bars)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.set_ylim(0, max(m + h for m, h in zip(med, hi)) * 1.2)
    return _png(fig)


def plot_lcurves(rs: list[dict]) -> str | None:
    curves = [(r["variant"], lcurve_of(r)) for r in rs if r.get("status") == "ok"]
    curves = [(v, c) for v, c in curves if c and "step" in c]
    cols = [c for c in ("rmse_e_trn", "rmse_f_trn", "rmse_e_val", "rmse_f_val")
            if any(c in lc for _, lc in curves)]
    if not curves or not cols:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.8), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for v, lc in curves:
            if col in lc:
                ax.plot(lc["step"], lc[col], marker=".", label=v)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("step")
        ys = [x for _, lc in curves if col in lc for x in lc[col] if x == x]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    return _png(fig)


def _ncu_rows(ncu: dict | None) -> list[dict]:
    """Nsight Compute figures of a profiled run (profile stage's per-kernel "figures"), one row each."""
    rows = []
    for k in (ncu or {}).get("kernels") or []:
        f = k.get("figures") or {}
        rows.append({"t": _fmt(f.get("time_us"), 1, 1), "sm": _fmt(f.get("sm_pct"), 1, 1),
                     "dram": _fmt(f.get("dram_pct"), 1, 1), "bw": _fmt(f.get("dram_gb_s"), 1, 0),
                     "fl": _fmt(f.get("fp64_gflop_s"), 1, 0), "flp": _fmt(f.get("fp64_pct"), 1, 1),
                     "name": k.get("name", "")[:120]})
    return rows


def plot_profile(rs: list[dict]) -> str | None:
    prof = [(r["variant"], r["profile"]) for r in rs
            if isinstance(r.get("profile"), dict) and (r["profile"].get("categories") or {}).get("by_range")]
    if not prof:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(prof) + 3), 3.4))
    bottom = [0.0] * len(prof)
    colors = plt.get_cmap("tab10").colors
    for i, c in enumerate(PROFILE_CATEGORIES):
        vals = [(p["categories"]["by_range"].get(c) or 0.0) * 1e3 for _, p in prof]
        ax.bar([v for v, _ in prof], vals, bottom=bottom, label=c, color=colors[i % 10])
        bottom = [b + x for b, x in zip(bottom, vals)]
    for i, (_, p) in enumerate(prof):
        if p.get("gpu_busy_s_per_step") is not None:
            ax.plot([i - 0.4, i + 0.4], [p["wall_s_per_step"] * 1e3] * 2, "k--", lw=1)
    basis = prof[0][1]["categories"].get("basis", "")
    ax.set_ylabel(f"ms / step ({basis.replace('_', ' ')})")
    ax.set_title("time by category (named ranges); dashed: wall per step", fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _png(fig)


def plot_scaling(rs: list[dict]) -> str | None:
    multi = [r for r in rs if r.get("status") == "ok" and (r.get("timing") or {}).get("step_s_median")]
    if not any(world_size(r) > 1 for r in multi):
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    by_v: dict[str, dict[int, float]] = {}
    for r in multi:  # latest per (variant, world size): absolute throughput, no cross-run ratio
        by_v.setdefault(r["variant"], {})[world_size(r)] = world_size(r) / r["timing"]["step_s_median"]
    for v, pts in by_v.items():
        ws = sorted(pts)
        line, = ax.plot(ws, [pts[w] for w in ws], marker="o", label=v)
        if 1 in pts:  # ideal: N x the same sweep's 1-GPU throughput; efficiency = measured / ideal
            ax.plot(ws, [pts[1] * w for w in ws], ls="--", lw=0.8, color=line.get_color())
            ax2.plot(ws, [100 * scaling_efficiency(pts[w], w, pts[1]) for w in ws], marker="o",
                     color=line.get_color(), label=v)
    ax.set_yscale("log")
    ax.set_xticks(sorted({w for pts in by_v.values() for w in pts}))
    ax.set_xlabel("GPUs (world_size)")
    ax.set_ylabel("batches / s, all ranks (log)")
    ax.set_title("throughput; dashed: ideal (N x 1 GPU)", fontsize=9)
    ax.legend(fontsize=7)
    ax2.axhline(100, color="k", lw=0.6, ls=":")
    ax2.set_xticks(ax.get_xticks())
    ax2.set_xlabel("GPUs (world_size)")
    ax2.set_ylabel("scaling efficiency, %")
    ax2.set_title("efficiency vs the same sweep's 1-GPU run", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_history(runs: list[dict], system: str, card: str) -> str | None:
    rs = [r for r in runs if r.get("system") == system and card_of(r) == card and r.get("status") == "ok"
          and (r.get("timing") or {}).get("step_s_median") and world_size(r) == 1]
    if len({r["sweep_id"] for r in rs}) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    sweeps = sorted({r["sweep_id"] for r in rs}, key=lambda s: min(x.get("created") or "" for x in rs
                                                                    if x["sweep_id"] == s))
    for v in sorted({r["variant"] for r in rs}):
        pts = [(sweeps.index(r["sweep_id"]), r["timing"]["step_s_median"]) for r in rs if r["variant"] == v]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_xticks(range(len(sweeps)), [s[:15] for s in sweeps], rotation=30, fontsize=7)
    ax.set_ylabel("s / step")
    ax.set_title("history (absolute s/step per sweep)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


# ------------------------------------------------------------------ page

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>dpharness report</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #4a7ab5;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px} th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eef3fa} td.l,th.l{text-align:left} .pass{color:#0a7a2a;font-weight:bold} .fail{color:#b00020;font-weight:bold}
.muted{color:#777;font-size:12px} img{max-width:100%;display:block;margin:6px 0} .warn{color:#b06000}
dl dt{font-weight:bold;margin-top:8px} code{background:#f4f4f4;padding:0 3px}
</style></head><body>
<h1>dpharness report</h1>
<p class="muted">generated {{ generated }} from {{ n_runs }} run record(s) in <code>results/runs</code>;
{{ 'all sweeps' if all_sweeps else 'latest sweep per (system, card)' }}. Speedups are ratios within one sweep on one card only.</p>
{% if not sections %}
<p id="empty"><strong>No results yet.</strong> Run <code>make bench</code> (or <code>dpharness bench</code>) to produce
results JSONs under <code>results/runs/</code>, then <code>make report</code>.</p>
{% endif %}
{% for s in sections %}
<h2 id="{{ s.anchor }}">{{ s.system }} — {{ s.card }}</h2>
<p class="muted">sweep <code>{{ s.sweep }}</code>, {{ s.runs|length }} run(s), {{ s.steps }} steps per run</p>
<table><tr><th class="l">variant</th><th>status</th><th>ms/step</th><th>IQR ms</th><th>speedup vs baseline</th>
<th>peak GPU MiB</th><th>startup s</th><th>accuracy</th></tr>
{% for r in s.rows %}<tr><td class="l">{{ r.variant }}</td><td>{{ r.status }}</td><td>{{ r.ms }}</td><td>{{ r.iqr }}</td>
<td>{{ r.speedup }}</td><td>{{ r.mem }}</td><td>{{ r.startup }}</td><td class="{{ r.vclass }}">{{ r.verdict }}</td></tr>
{% if r.error %}<tr><td class="l warn" colspan="8">{{ r.error }}</td></tr>{% endif %}{% endfor %}
</table>
{% if s.img_steps %}<img alt="s/step per variant" src="{{ s.img_steps }}">{% endif %}
{% if s.accuracy %}<h3>Accuracy</h3>
<table><tr><th class="l">variant</th>{% for c in s.acc_cols %}<th>{{ c }}</th>{% endfor %}<th>verdict</th><th class="l">detail</th></tr>
{% for a in s.accuracy %}<tr><td class="l">{{ a.variant }}</td>{% for v in a.vals %}<td>{{ v }}</td>{% endfor %}
<td class="{{ a.vclass }}">{{ a.verdict }}</td><td class="l">{{ a.detail }}</td></tr>{% endfor %}</table>{% endif %}
{% if s.img_lcurve %}<h3>Learning curves</h3><img alt="learning curves" src="{{ s.img_lcurve }}">{% endif %}
{% if s.img_profile %}<h3>Profile breakdown</h3><img alt="profile breakdown" src="{{ s.img_profile }}">
<table><tr><th class="l">variant</th><th>wall ms/step</th><th>GPU busy ms</th><th>host gap ms</th><th>kernels/step</th><th>launches/step</th><th>memcpy/step</th></tr>
{% for p in s.profiles %}<tr><td class="l">{{ p.variant }}</td><td>{{ p.wall }}</td><td>{{ p.busy }}</td><td>{{ p.gap }}</td><td>{{ p.kernels }}</td><td>{{ p.launches }}</td><td>{{ p.memcpy }}</td></tr>{% endfor %}</table>
{% for p in s.profiles %}{% if p.top %}<details><summary>top kernels / ops: {{ p.variant }}</summary><table><tr><th>ms/step</th><th>count</th><th class="l">name</th></tr>
{% for k in p.top %}<tr><td>{{ k.ms }}</td><td>{{ k.count }}</td><td class="l">{{ k.name }}</td></tr>{% endfor %}</table></details>{% endif %}{% endfor %}
{% for p in s.profiles %}{% if p.ncu or p.ncu_error %}<h4>Nsight Compute: {{ p.variant }}{% if p.ncu_error %} ({{ p.ncu_error }}){% endif %}</h4>
<table><tr><th>time us</th><th>SM % of peak</th><th>DRAM % of peak</th><th>DRAM GB/s</th><th>FP64 GFLOP/s (CUDA cores)</th><th>FP64 % of datasheet peak</th><th class="l">kernel</th></tr>
{% for k in p.ncu %}<tr><td>{{ k.t }}</td><td>{{ k.sm }}</td><td>{{ k.dram }}</td><td>{{ k.bw }}</td><td>{{ k.fl }}</td><td>{{ k.flp }}</td><td class="l">{{ k.name }}</td></tr>{% endfor %}</table>{% endif %}{% endfor %}
{% endif %}
{% if s.img_scaling %}<h3>Multi-GPU scaling</h3><img alt="scaling" src="{{ s.img_scaling }}">{% endif %}
{% if s.img_history %}<h3>History</h3><img alt="history" src="{{ s.img_history }}">{% endif %}
<h3>Environment</h3><table>{% for k, v in s.env %}<tr><td class="l">{{ k }}</td><td class="l">{{ v }}</td></tr>{% endfor %}</table>
{% endfor %}
{% if variants %}<h2 id="variants">Variants</h2><dl>
{% for v in variants %}<dt>{{ v.name }}{% if v.chain %} <span class="muted">({{ v.chain }})</span>{% endif %}</dt><dd>{{ v.description }}{% if v.overrides %}<br><span class="muted">overrides: {{ v.overrides }}</span>{% endif %}</dd>{% endfor %}
</dl>{% endif %}
</body></html>
"""


def _fmt(x: Any, scale: float = 1.0, nd: int = 2) -> str:
    return f"{x * scale:.{nd}f}" if isinstance(x, (int, float)) else "-"


def _acc_cell(col: str, x: Any) -> str:
    if col == "numb_test":  # frames per validation system; 0 is dp test's "all of them"
        return "all" if x == 0 else str(x)
    return _fmt(x, 1, 5)


def _verdict(v: Any) -> tuple[str, str]:
    s = str(v or "-")
    return {"pass": ("PASS", "pass"), "fail": ("FAIL", "fail"), "baseline": ("reference", "")}.get(s, (s, ""))


def build_sections(runs: list[dict], all_sweeps: bool = False) -> list[dict]:
    sections = []
    for system, card, sweep, rs in select(runs, all_sweeps):
        sp = speedups(rs)
        rows = []
        for r in rs:
            # a failed run's few observed steps are no speed: only ok runs show ms/step
            t = (r.get("timing") or {}) if r.get("status") == "ok" else {}
            verdict, vclass = _verdict((r.get("accuracy") or {}).get("verdict"))
            mem = (r.get("memory") or {}).get("gpu_peak_bytes")
            rows.append({"variant": r["variant"] + (f" ×{world_size(r)}" if world_size(r) > 1 else ""),
                         "status": r.get("status"), "ms": _fmt(t.get("step_s_median"), 1e3),
                         "iqr": _fmt(t.get("step_s_iqr"), 1e3), "startup": _fmt(t.get("startup_s"), 1, 1),
                         "speedup": f"{sp[r['run_id']]:.2f}×" if sp.get(r["run_id"]) else "-",
                         "mem": _fmt(mem, 1 / 2**20, 0) if mem else "-", "verdict": verdict, "vclass": vclass,
                         "error": r.get("error")})
        acc, acc_cols = [], []
        for r in rs:
            a = r.get("accuracy") or {}
            if a.get("dp_test") or a.get("verdict"):
                for k in (a.get("dp_test") or {}):
                    if k not in acc_cols:
                        acc_cols.append(k)
        for r in rs:
            a = r.get("accuracy") or {}
            if a.get("dp_test") or a.get("verdict"):
                verdict, vclass = _verdict(a.get("verdict"))
                dt = a.get("dp_test") or {}
                acc.append({"variant": r["variant"], "vals": [_acc_cell(c, dt.get(c)) for c in acc_cols],
                            "verdict": verdict, "vclass": vclass, "detail": a.get("detail") or ""})
        profiles = []
        for r in rs:
            p = r.get("profile")
            if not isinstance(p, dict) or p.get("status") not in ("ok", "partial"):
                continue
            top = p.get("top_kernels") or [{"name": o["name"], "total_s": o.get("self_s", 0), "count": o["count"]}
                                           for o in p.get("top_ops") or []]
            n = max(1, p.get("steps") or 1)
            profiles.append({"variant": r["variant"], "wall": _fmt(p.get("wall_s_per_step"), 1e3),
                             "busy": _fmt(p.get("gpu_busy_s_per_step"), 1e3),
                             "gap": _fmt(p.get("host_gap_s_per_step"), 1e3),
                             "kernels": _fmt(p.get("kernels_per_step"), 1, 1),
                             "launches": _fmt(p.get("launches_per_step"), 1, 1),
                             "memcpy": _fmt((p.get("memcpy") or {}).get("per_step"), 1, 1),
                             "top": [{"ms": _fmt(k.get("total_s", 0) / n, 1e3, 3), "count": k.get("count"),
                                      "name": k.get("name", "")[:160]} for k in top[:15]],
                             "ncu": _ncu_rows(p.get("ncu")), "ncu_error": (p.get("ncu") or {}).get("error")})
        env = (rs[0].get("environment") or {}) if rs else {}
        env_rows = [("card", card), ("driver", env.get("driver")), ("CUDA", env.get("cuda")),
                    ("torch", env.get("torch")), ("python", env.get("python")),
                    ("harness git", env.get("harness_git")), ("harness", env.get("harness_version")),
                    ("platform", env.get("platform")), ("host", env.get("hostname")),
                    ("CPUs", env.get("cpu_count"))]
        steps = sorted({r.get("steps") for r in rs if r.get("steps") is not None})
        sections.append({
            "system": system, "card": card, "sweep": sweep, "runs": rs, "rows": rows,
            "anchor": f"{system}-{card}-{sweep}".replace(" ", "_"),
            "steps": ", ".join(str(s) for s in steps) or "?",
            "accuracy": acc, "acc_cols": acc_cols, "profiles": profiles,
            "env": [(k, "-" if v is None else v) for k, v in env_rows],
            "img_steps": plot_step_times(rs, f"{system} on {card}, sweep {sweep}"),
            "img_lcurve": plot_lcurves(rs),
            "img_profile": plot_profile(rs),
            "img_scaling": plot_scaling(rs),
            "img_history": plot_history(runs, system, card) if all_sweeps else None,
        })
    return sections


def variant_list(runs: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: r.get("created") or ""):
        ov = r.get("overrides") or {}
        seen[r["variant"]] = {"name": r["variant"], "description": description(r),
                              "chain": " → ".join(r.get("variant_chain") or []),
                              "overrides": ", ".join(f"{k}={v}" for k, v in ov.items())}
    return sorted(seen.values(), key=lambda v: (v["name"] != "baseline", v["name"]))


def render(runs: list[dict], all_sweeps: bool = False) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), n_runs=len(runs), all_sweeps=all_sweeps,
        sections=build_sections(runs, all_sweeps), variants=variant_list(runs))


import os


def write_report(runs_dir: Path = RUNS, out: Path = OUT, all_sweeps: bool = False) -> Path:


    runs = load_runs(Path(runs_dir)) if Path(runs_dir).is_dir() else []
    text = render(runs, all_sweeps)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def _report_cmd(a) -> int:
    out = write_report(Path(a.runs), Path(a.out), all_sweeps=a.all)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("report", help="write results/report/index.html (one self-contained file)")
    p.add_argument("--all", action="store_true", help="every sweep (history), not only the latest per system/card")
    p.add_argument("--runs", default=str(RUNS), help="directory of results JSONs")
    p.add_argument("--out", default=str(OUT))
    p.set_defaults(func=_report_cmd)
