"""The report's "Floor" section: per floor record (`dpharness floor`), the card's measured GEMM
rates, bandwidth and graph-node cost, the floor in ms/step, and the latest fused runs of the same
system on the same card with their measured ms/step over that floor (how far from the hardware)."""
from __future__ import annotations

from typing import Any

from harness.core.floor_record import FloorRecord
from harness.core.records import StoredRun


def _g(x: Any, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def fused_runs(rec: FloorRecord, runs: list[StoredRun]) -> list[StoredRun]:
    """The latest ok run of each fused* variant of rec's system on rec's card."""
    latest: dict[str, StoredRun] = {}
    for r in runs:
        if (r.system == rec.system and r.card() == rec.card and str(r.variant or "").startswith("fused")
                and r.status == "ok" and r.timing.step_s_median is not None):
            old = latest.get(r.variant)
            if old is None or (r.created or "") >= (old.created or ""):
                latest[r.variant] = r
    return [latest[v] for v in sorted(latest)]


def section(rec: FloorRecord, runs: list[StoredRun]) -> dict[str, Any]:
    bw, gn = rec.bandwidth or {}, rec.graph_node or {}
    rates = [{"shape": f"{r['m']} x {r['k']} x {r['n']}", "gflops": _g(r["flops_per_s"] / 1e9, ".2f"),
              "iqr": _g(r.get("s_iqr", 0) * 1e6, ".2f")} for r in rec.gemm_rates or []]
    fused = []
    for r in fused_runs(rec, runs):
        ms = 1e3 * r.timing.step_s_median
        fused.append({"variant": r.variant, "sweep": r.sweep_id, "ms": _g(ms, ".3f"),
                      "ratio": _g(ms / rec.floor_ms, ".2f") if rec.floor_ms else "-"})
    return {"system": rec.system, "card": rec.card, "sweep": rec.sweep_id, "dtype": rec.dtype,
            "floor": _g(rec.floor_ms, ".3f"), "gemm_ms": _g(rec.gemm_ms, ".3f"), "node_ms": _g(rec.node_ms, ".3f"),
            "bandwidth": _g((bw.get("bytes_per_s") or 0) / 1e9, ".1f"),
            "node": _g(gn["s_per_node"] * 1e6, ".2f") + " us" if gn.get("s_per_node") is not None
            else f"n/a ({gn.get('reason')})",
            "kernels": _g(rec.kernels_per_step, ".0f"), "model": rec.model,
            "mflop": ", ".join(f"{k} {v / 1e6:.1f}" for k, v in (rec.flops_by_group or {}).items()),
            "rates": rates, "fused": fused}


def sections(floors: list[FloorRecord], runs: list[StoredRun]) -> list[dict[str, Any]]:
    return [section(f, runs) for f in floors]


TEMPLATE = """{% if floors %}<h2 id="floor">Floor</h2>
<p class="muted">This card's hardware floor for one training step (<code>dpharness floor</code>): every GEMM of the step
at the FLOP/s this card reaches on that shape, plus one CUDA-graph node cost per kernel of the latest profiled fused run.
Element-wise work, activation traffic and the optimiser are left out: a lower bound (docs/profiling-and-report.md).</p>
{% for f in floors %}<h3>{{ f.system }} — {{ f.card }} ({{ f.dtype }}), sweep {{ f.sweep }}: floor {{ f.floor }} ms/step</h3>
<p>GEMMs {{ f.gemm_ms }} ms + nodes {{ f.node_ms }} ms (kernels/step {{ f.kernels }}); copy bandwidth {{ f.bandwidth }} GB/s;
graph node {{ f.node }}. MFLOP per step: {{ f.mflop }}.</p>
<table><tr><th class="l">fused variant</th><th>sweep</th><th>measured ms/step</th><th>measured / floor</th></tr>
{% for r in f.fused %}<tr><td class="l">{{ r.variant }}</td><td>{{ r.sweep }}</td><td>{{ r.ms }}</td><td>{{ r.ratio }}</td></tr>
{% else %}<tr><td class="l muted" colspan="4">no fused run of {{ f.system }} on this card yet</td></tr>{% endfor %}</table>
<details><summary>GEMM rates ({{ f.rates|length }} shapes)</summary><table><tr><th class="l">m x k x n</th><th>GFLOP/s</th><th>IQR us</th></tr>
{% for r in f.rates %}<tr><td class="l">{{ r.shape }}</td><td>{{ r.gflops }}</td><td>{{ r.iqr }}</td></tr>{% endfor %}</table>
<p class="muted">Model: {{ f.model }}</p></details>{% endfor %}{% endif %}
"""
