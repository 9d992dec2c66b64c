"""The report's trajectory part of the Training section: per trajectory record (`dpharness
trajectory`), the relative divergence of every training from the first upstream run at each
display step (log scale, the horizon's 1e-3 drawn), and a table of worst, final and weights
differences with each horizon."""
from __future__ import annotations

from typing import Any

from harness.core.trajectory_records import TrajectoryRecord
from harness.judge.trajectory import horizon_text
from harness.report.plots import _plt, _png

FLOOR = 1e-17  # where a zero difference is drawn (a log axis has no 0)


def plot(rec: TrajectoryRecord) -> str | None:
    comps = [c for c in rec.comparisons if c.steps]
    if not comps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for c in comps:
        ys = [FLOOR if y is None or y < FLOOR else y for y in c.max_rel]
        ax.plot(c.steps, ys, lw=1.2, label=c.run, ls="--" if c.run == "upstream-again" else "-")
    ax.axhline(rec.horizon_rtol or 1e-3, color="grey", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("largest relative difference\nfrom upstream (lr, train/val RMSEs)", fontsize=7)
    ax.set_title(f"{rec.system}, seed {rec.seed}, {rec.steps} steps, {rec.card} (dotted: horizon {rec.horizon_rtol:g}; "
                 f"{FLOOR:g}: identical)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def section(rec: TrajectoryRecord) -> dict[str, Any]:
    last = int(rec.steps or 0)
    rows = [{"run": c.run, "worst": _e(c.worst), "worst_at": c.worst_at or "", "final": _e(c.max_rel[-1] if c.max_rel else None),
             "weights": _e(c.weights_max_rel), "horizon": horizon_text(c.horizon, last),
             "follows": "-" if c.follows is None else ("yes" if c.follows else "NO"),
             "ok": c.follows is not False, "problems": "; ".join(c.problems)} for c in rec.comparisons]
    ms = {r.variant if r.role == "variant" else r.role: r.step_ms_median for r in rec.runs}
    return {"sweep": rec.sweep_id, "system": rec.system, "steps": rec.steps, "card": rec.card, "seed": rec.seed,
            "verdict": str(rec.verdict or "-").upper(), "vclass": "ok" if rec.verdict == "pass" else "warn",
            "rows": rows, "img": plot(rec), "anchor": f"trajectory-{rec.sweep_id}",
            "ms": ", ".join(f"{k} {v:.2f} ms/step" for k, v in ms.items() if v is not None)}


def sections(records: list[TrajectoryRecord]) -> list[dict[str, Any]]:
    return [section(r) for r in records]


TEMPLATE = """{% for t in trajectories %}<h3 id="{{ t.anchor }}">Same frames, same trajectory: {{ t.system }} — {{ t.card }},
{{ t.steps }} steps, seed {{ t.seed }}, sweep {{ t.sweep }}: <span class="{{ t.vclass }}">{{ t.verdict }}</span></h3>
<p class="muted"><code>dpharness trajectory</code>: upstream trained twice with one seed (its own run-to-run floor) and
each variant once on upstream's sampler order from the same initial weights; every full-precision lcurve value and the
final weights compared with the first upstream run. Horizon: the first row where any value differs by more than 1e-3.
A variant follows when its horizon is at least upstream's own. ({{ t.ms }}, trained one after another.)</p>
{% if t.img %}<img alt="divergence from upstream per step" src="{{ t.img }}">{% endif %}
<table><tr><th class="l">run</th><th>worst</th><th class="l">where</th><th>at the end</th><th>final weights</th><th class="l">horizon</th><th>follows</th></tr>
{% for r in t.rows %}<tr><td class="l">{{ r.run }}</td><td>{{ r.worst }}</td><td class="l">{{ r.worst_at }}</td><td>{{ r.final }}</td>
<td>{{ r.weights }}</td><td class="l">{{ r.horizon }}</td><td class="{{ 'ok' if r.ok else 'warn' }}">{{ r.follows }}</td></tr>
{% if r.problems %}<tr><td class="l warn" colspan="7">{{ r.problems }}</td></tr>{% endif %}{% endfor %}</table>{% endfor %}
"""
