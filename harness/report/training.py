"""The report's "Training" section: per convergence record (`dpharness convergence`), the
learning curves of every run together (smoothed as the rule smooths them), the rule's verdict
table with its per-metric numbers, and the wall time each run took to reach the baseline seeds'
final force RMSE."""
from __future__ import annotations

from typing import Any

from harness.core.convergence_records import ConvergenceRecord
from harness.judge import convergence_rule as rule
from harness.report.plots import _plt, _png

_COLOURS = {"baseline": "tab:blue"}
_OTHER = ["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]


def _colour(variant: str, order: list[str]) -> str:
    if variant in _COLOURS:
        return _COLOURS[variant]
    others = [v for v in order if v not in _COLOURS]
    return _OTHER[others.index(variant) % len(_OTHER)]


def plot(rec: ConvergenceRecord) -> str | None:
    runs = [r for r in rec.runs if r.lcurve.step]
    if not runs:
        return None
    order = list(dict.fromkeys(r.variant for r in rec.runs))
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.3))
    target = (rec.time_to_rmse or {}).get("target")
    for r in runs:
        c, lbl = _colour(r.variant, order), f"{r.variant} s{r.seed}"
        for ax, m in zip(axes[:2], rule.CURVE_METRICS):
            sm = rule.smooth(r.lcurve.step, getattr(r.lcurve, m))
            ax.plot(list(sm), list(sm.values()), color=c, lw=1, alpha=0.85, label=lbl)
        sm = rule.smooth(r.lcurve.step, r.lcurve.rmse_f_val)
        wall = dict(zip(map(int, r.lcurve.step), r.lcurve.wall_s))
        pts = [(wall[s], v) for s, v in sm.items() if wall.get(s) is not None]
        if pts:
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], color=c, lw=1, alpha=0.85, label=lbl)
    warm = rule.WARMUP_FRACTION * (rec.steps or 0)
    for ax, m in zip(axes[:2], rule.CURVE_METRICS):
        ax.axvline(warm, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{m} (trailing geometric mean, {rule.WINDOW} rows)", fontsize=7)
    if target is not None:
        axes[2].axhline(target, color="grey", ls="--", lw=0.8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("wall s since the process started")
    axes[2].set_ylabel("rmse_f_val (smoothed)", fontsize=7)
    for ax in axes:
        ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    axes[0].set_title(f"{rec.system}, {rec.steps} steps, {rec.card}", fontsize=8)
    axes[2].set_title("time to accuracy (dashed: baseline's final)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _g(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def section(rec: ConvergenceRecord) -> dict[str, Any]:
    rows = []
    for v, c in (rec.checks or {}).items():
        for b in c.get("bands", []):
            rows.append({"variant": v, "seed": b["seed"], "metric": b["metric"],
                         "value": f"{b['inside']}/{b['rows']} rows in band ({100 * b['fraction']:.0f} %)",
                         "ok": "ok" if b["ok"] else "FAIL", "detail": f"worst at step {b['worst_step']}, "
                         f"{_g(b['worst_excess'])} log10 beyond the edge" if b.get("worst_excess", 0) and b["worst_excess"] > 0
                         else f"spread: {c['spread_source'].get(b['metric'], '-')}"})
        for f in c.get("finals", []):
            rows.append({"variant": v, "seed": f["seed"], "metric": f"dp test {f['metric']}", "value": _g(f["value"]),
                         "ok": "ok" if f["ok"] else "FAIL",
                         "detail": f"band [{_g(f['lo'])}, {_g(f['hi'])}] ({c['spread_source'].get(f['metric'], '-')})"})
    ttr = rec.time_to_rmse or {}
    times = []
    for v, seeds in (ttr.get("by_variant") or {}).items():
        vals = [t for t in seeds.values() if t is not None]
        times.append({"variant": v, "seeds": ", ".join(f"s{s}: {'not reached' if t is None else f'{t:.1f} s'}"
                                                       for s, t in seeds.items()),
                      "median": f"{sorted(vals)[len(vals) // 2]:.1f} s" if vals else "-"})
    runs = [{"variant": r.variant, "seed": r.seed, "sweep": r.sweep_id or rec.sweep_id, "status": r.status, "error": r.error or "",
             "ms": _g(r.step_ms_median), "wall": _g(r.wall_s), "concurrent": r.concurrent or "-",
             "e": _g((r.dp_test or {}).get("rmse_e_per_atom")), "f": _g((r.dp_test or {}).get("rmse_f"))}
            for r in rec.runs]
    ctl = rec.control or {}
    control = ("" if not ctl else f"Control (each baseline seed judged by the rule against the others): "
               f"{str(ctl.get('verdict')).upper()} -- " + ", ".join(
                   f"seed {s} {c['verdict']}" for s, c in (ctl.get("seeds") or {}).items()))
    return {"sweep": rec.sweep_id, "system": rec.system, "steps": rec.steps, "card": rec.card, "control": control,
            "verdict": str(rec.verdict or "-").upper(), "vclass": "ok" if rec.verdict == "pass" else "warn",
            "rule": rec.rule, "lr": rec.learning_rate, "rows": rows, "times": times, "runs": runs,
            "target": _g(ttr.get("target")), "img": plot(rec), "anchor": f"training-{rec.sweep_id}",
            "baseline_from": ", ".join(rec.baseline_from or [])}


def sections(records: list[ConvergenceRecord]) -> list[dict[str, Any]]:
    """One section per proof; a record of baseline seeds that a later proof reused (a proof split
    over GPU calls) is shown inside that proof, not again on its own."""
    reused = {s for r in records for s in (r.baseline_from or [])}
    # a record of baseline seeds alone that another reused is shown inside it; one with candidates
    # of its own (and a rejudged record, beside its original) is a proof and shown on its own
    return [section(r) for r in records
            if r.sweep_id not in reused or any(x.variant != "baseline" for x in r.runs)]


TEMPLATE = """{% if training or trajectories %}<h2 id="training">Training</h2>
<p class="muted">Proofs over a full training (<code>dpharness convergence</code>): every variant x seed trained from the
same input, learning rate from start_lr to stop_lr over the run, judged by a rule stated before the run
(docs/accuracy.md). Step times of runs trained side by side share one GPU (column "at once").</p>
{% for t in training %}<h3 id="{{ t.anchor }}">{{ t.system }} — {{ t.card }}, {{ t.steps }} steps, sweep {{ t.sweep }}:
<span class="{{ t.vclass }}">{{ t.verdict }}</span></h3>
{% if t.img %}<img alt="learning curves of every run" src="{{ t.img }}">{% endif %}
{% if t.control %}<p>{{ t.control }}</p>{% endif %}
<p class="muted">Rule: {{ t.rule }}. Learning rate: {{ t.lr }}.{% if t.baseline_from %} Baseline seeds trained in
earlier calls of the same input, data, steps, card and build (sweeps {{ t.baseline_from }}), one upstream seed per call.{% endif %}</p>
<table><tr><th class="l">variant</th><th>seed</th><th class="l">check</th><th>value</th><th>verdict</th><th class="l">detail</th></tr>
{% for r in t.rows %}<tr><td class="l">{{ r.variant }}</td><td>{{ r.seed }}</td><td class="l">{{ r.metric }}</td><td>{{ r.value }}</td>
<td class="{{ 'ok' if r.ok == 'ok' else 'warn' }}">{{ r.ok }}</td><td class="l">{{ r.detail }}</td></tr>{% endfor %}</table>
<h4>Wall time to the baseline seeds' final force RMSE ({{ t.target }}, smoothed rmse_f_val)</h4>
<table><tr><th class="l">variant</th><th>median</th><th class="l">per seed</th></tr>
{% for x in t.times %}<tr><td class="l">{{ x.variant }}</td><td>{{ x.median }}</td><td class="l">{{ x.seeds }}</td></tr>{% endfor %}</table>
<details><summary>runs</summary><table><tr><th class="l">variant</th><th>seed</th><th class="l">sweep</th><th>status</th><th>ms/step</th><th>wall s</th>
<th>at once</th><th>dp test E/atom</th><th>dp test F</th></tr>
{% for r in t.runs %}<tr><td class="l">{{ r.variant }}</td><td>{{ r.seed }}</td><td class="l">{{ r.sweep }}</td><td>{{ r.status }}</td><td>{{ r.ms }}</td><td>{{ r.wall }}</td>
<td>{{ r.concurrent }}</td><td>{{ r.e }}</td><td>{{ r.f }}</td></tr>{% if r.error %}<tr><td class="l warn" colspan="9">{{ r.error }}</td></tr>{% endif %}{% endfor %}
</table></details>{% endfor %}{% include "trajectory" %}{% endif %}
"""
