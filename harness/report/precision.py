"""The report's "Precision budget" section: per `dpharness precision-budget` record (one system on
one device), the same-weights error of each reduced-precision stage against float64 -- energy,
force, virial, the training step's gradient and update -- with its class's tolerance and verdict.
It says which stage spends a reduced-precision variant's error (docs/accuracy.md), so a reader
sees why a variant passes or fails before reading its runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.core import fsutil
from harness.judge.precision_budget import METRICS, SCHEMA, rel


def load_records(directory: Path, warn: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Every budget record directly under directory, by system and device; a file that is not one
    is skipped with a warning."""
    out = fsutil.json_records(directory, SCHEMA, warn)
    return sorted(out, key=lambda r: (r.get("system", ""), r.get("device", "")))


def sections(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows_of = []
    for rec in records:
        rows = []
        for r in rec.get("rows", []):
            m = r.get("metrics") or {}
            tol = r.get("tolerance")
            rows.append({"stage": r.get("stage", "?"), "variant": r.get("variant", "?"),
                         "cells": [rel(m.get(k)) for k in METRICS[:3] + METRICS[4:]],
                         "verdict": r.get("verdict", "-"),
                         "why": "" if r.get("verdict") == "pass" else r.get("detail", ""),
                         "tolerance": f"{tol:g} ({r.get('accuracy_class')})" if tol is not None else "-"})
        rows_of.append({"system": rec.get("system", "?"), "device": rec.get("device", "?"),
                        "card": rec.get("card", "?"), "created": rec.get("created", "?"), "rows": rows,
                        "checkpoint": Path(str(rec.get("checkpoint") or "?")).name})
    return rows_of


TEMPLATE = """{% if budgets %}<h2 id="precision">Precision budget</h2>
<p class="muted">Same-weights error of each reduced-precision stage against float64 on one baseline checkpoint
(<code>dpharness precision-budget</code>; the gate's parity check, relative: energy, force, virial, the training step's
gradient and update). "[TF32 emulated]": measured on a CPU with every float32 GEMM's inputs rounded to TF32
(docs/accuracy.md).</p>
{% for b in budgets %}<h3>{{ b.system }} — {{ b.card }} ({{ b.device }}), checkpoint {{ b.checkpoint }}, {{ b.created }}</h3>
<table><tr><th class="l">stage</th><th class="l">variant</th><th>E rel</th><th>F rel</th><th>V rel</th><th>grad rel</th>
<th>update rel</th><th>tolerance</th><th class="l">verdict</th></tr>
{% for r in b.rows %}<tr><td class="l">{{ r.stage }}</td><td class="l">{{ r.variant }}</td>{% for v in r.cells %}<td>{{ v }}</td>{% endfor %}
<td>{{ r.tolerance }}</td><td class="l">{{ r.verdict }}{% if r.why %}: {{ r.why }}{% endif %}</td></tr>
{% endfor %}</table>
{% endfor %}{% endif %}"""
