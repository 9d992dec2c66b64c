"""Progress lines: a terminal gets a tqdm bar; a log gets one plain line per ~10 %."""
from __future__ import annotations

import io

from harness.core.progress import Progress


def test_plain_lines_every_tenth_with_eta():
    out = io.StringIO()
    with Progress(200, "fused", stream=out, tty=False) as p:
        for i in range(1, 201):
            p.update_to(i)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0].startswith("  [fused] 20/200 steps (10 %)")
    assert "ETA" in lines[1]  # a rate needs two updates: start-up is not a step
    assert lines[-1].startswith("  [fused] 200/200 steps (100 %)") and "ETA" not in lines[-1]


def test_plain_lines_survive_jumps_and_repeats():
    out = io.StringIO()
    p = Progress(10, "gates", unit="gates", stream=out, tty=False)
    for n in (0, 3, 3, 2, 9, 10, 11):  # the child's step file may lag, repeat or overshoot
        p.update_to(n)
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["3/10", "9/10", "10/10"], lines


def test_terminal_bar_writes_no_plain_lines():
    out = io.StringIO()
    with Progress(50, "baseline", stream=out, tty=True) as p:
        p.update_to(25)
        p.update_to(50)
    text = out.getvalue()
    assert "baseline:" in text and "/50 [" in text and "(100 %)" not in text  # tqdm's own format


def test_runs_of_a_sweep_have_an_eta_after_the_first():
    out = io.StringIO()
    p = Progress(3, "sweep x", unit="runs", stream=out, tty=False, every=1e-9, rate_from_start=True)
    p.update_to(1)
    assert "ETA" in out.getvalue().splitlines()[0]


def test_a_line_per_update_costs_no_time():
    """every=1e-9 (a line per run or gate) must not step through a billion fractions per update."""
    import time

    out = io.StringIO()
    p = Progress(4, "gates", unit="gates", stream=out, tty=False, every=1e-9)
    t0 = time.perf_counter()
    for n in range(1, 5):
        p.update_to(n)
    assert time.perf_counter() - t0 < 0.5
    assert len(out.getvalue().splitlines()) == 4
