"""The NVE drift verdict without running MD: a flat total energy passes, a linear drift beyond
the limit fails, a blow-up (non-finite energies) fails, each naming why."""
from __future__ import annotations

import numpy as np

from harness.judge import md_nve


def rows(drift_per_atom_ps: float, n: int = 10, wobble: float = 1e-6) -> dict:
    t = np.linspace(0, 1, 101)
    e = n * (-5.0 + drift_per_atom_ps * t + wobble * np.sin(40 * t))
    return {"atoms": n, "dt_fs": 0.5, "steps": 2000, "time_ps": t.tolist(), "etot": e.tolist(),
            "ekin": [1.5 * n * 8.617333262e-5 * 300] * t.size}


def test_flat_energy_passes_with_its_temperature():
    r = md_nve.judge(rows(0.0))
    assert r.ok and abs(r.drift_ev_atom_ps) < 1e-6 and round(r.mean_temperature_K) == 300


def test_drift_beyond_the_limit_fails():
    r = md_nve.judge(rows(3 * md_nve.DRIFT_LIMIT))
    assert not r.ok and "energy drift" in r.reasons[0]
    assert md_nve.judge(rows(0.5 * md_nve.DRIFT_LIMIT)).ok


def test_a_large_excursion_fails_even_without_drift():
    r = md_nve.judge(rows(0.0, wobble=2 * md_nve.MAX_DEVIATION))
    assert not r.ok and any("excursion" in x for x in r.reasons)


def test_non_finite_energies_fail():
    d = rows(0.0)
    d["etot"][50] = float("nan")
    r = md_nve.judge(d)
    assert not r.ok and "no finite energies" in r.reasons[0]
