"""The report's "Training equivalence" section: one row per `dpharness equivalence` record
(results/equivalence/*.json): the variant's seeds against the baseline's calibration, the verdict
and per metric the effect size with its 90 % interval, the margin, the outcome and, when
inconclusive, the seeds that would resolve it (cells.equivalence_cell, as for a bench run)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.core import fsutil
from harness.core.records import Equivalence
from harness.report.cells import equivalence_cell, verdict as _verdict

SCHEMA = "dpharness.equivalence/1"


def load_records(directory: Path, warn: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """The equivalence records directly under `directory` (their per-seed runs under runs/ are not),
    newest first; a file that is not one is skipped with a warning."""
    out = fsutil.json_records(directory, SCHEMA, warn)
    return sorted(out, key=lambda r: str(r.get("created") or ""), reverse=True)


def sections(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        label, vclass = _verdict(r.get("verdict"))
        steps = f"{r.get('steps')}" + ("" if r.get("at_gate_steps") else f" (gate_steps {r.get('gate_steps') or '-'})")
        rows.append({"system": r.get("system"), "variant": r.get("variant"), "cls": r.get("accuracy_class") or "-",
                     "card": r.get("card") or r.get("device"), "steps": steps, "sweep": r.get("sweep_id"),
                     "calibration": r.get("calibration") or "-", "verdict": label, "vclass": vclass,
                     "judgement": equivalence_cell(Equivalence.from_dict(r))})
    return rows


TEMPLATE = """{% if equivalences %}<h2 id="equivalence">Training equivalence</h2>
<p class="muted">Each row: <code>dpharness equivalence</code> — the variant's seeds trained side by side (not timed) and
judged by TOST against the baseline's calibration seeds at the same length (docs/accuracy.md section 4).
Per metric: variant − baseline mean as a share of the baseline mean, its 90 % interval, the margin, the outcome.</p>
<table><tr><th class="l">system</th><th class="l">variant (class)</th><th>card</th><th>steps</th><th>sweep</th>
<th class="l">baseline seeds from</th><th>verdict</th><th class="l">judgement</th></tr>
{% for e in equivalences %}<tr><td class="l">{{ e.system }}</td><td class="l">{{ e.variant }} ({{ e.cls }})</td><td>{{ e.card }}</td>
<td>{{ e.steps }}</td><td>{{ e.sweep }}</td><td class="l">{{ e.calibration }}</td><td class="{{ e.vclass }}">{{ e.verdict }}</td>
<td class="l">{{ e.judgement }}</td></tr>{% endfor %}</table>{% endif %}
"""
