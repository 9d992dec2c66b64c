"""Synthetic results JSONs (the schema of harness.results.runs.to_dict) for store/report/regression tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.core.records import StoredRun
from harness.results.runs import SCHEMA


def run_record(sweep: str, system: str, variant: str, median: float, iqr: float = 0.0, *, card: str = "NVIDIA H100",
               git: str = "abc1234", created: str = "2026-01-01T00:00:00Z", status: str = "ok",
               verdict: str | None = None, profile: dict | None = None, world_size: int | None = None,
               lcurve: bool = True, steps: int = 300) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema": SCHEMA, "run_id": f"{sweep}-{system}-{variant}" + (f"-ws{world_size}" if world_size else ""),
        "sweep_id": sweep, "system": system, "variant": variant, "variant_hash": "h" * 8,
        "variant_chain": ["baseline", variant] if variant != "baseline" else ["baseline"],
        "variant_description": f"description of {variant}", "backend": "pt", "overrides": {},
        "accuracy_class": "float64", "status": status, "error": None if status == "ok" else "boom",
        "steps": steps, "seed": 10,
        "device": {"kind": "cpu" if card == "cpu" else "cuda", "name": card, "count": 0 if card == "cpu" else 1},
        "timing": {"step_s_median": median, "step_s_iqr": iqr, "step_s_mean": median,
                   "step_s_q25": median - iqr / 2, "step_s_q75": median + iqr / 2, "steps_measured": steps - 61,
                   "warmup_steps": 60, "clock": "cuda_event", "startup_s": 20.0, "wall_s": 20.0 + steps * median + 1},
        "memory": {"gpu_peak_bytes": 2**30 if card != "cpu" else None},
        "accuracy": {"dp_test": {"rmse_e": 0.001, "rmse_f": 0.05} if verdict else None, "parity": None,
                     "verdict": verdict, "detail": None},
        "profile": profile,
        "artifacts": {"work_dir": None, "lcurve": None, "checkpoint": None, "input": None, "log": None},
        "lcurve": ({"step": [1, 100, 200, 300], "rmse_e_trn": [0.5, 0.1, 0.05, 0.04],
                    "rmse_f_trn": [1.0, 0.3, 0.2, 0.15]} if lcurve else None),
        "environment": {"harness_git": git, "torch": "2.13.0", "python": "3.12.0", "gpu_name": card,
                        "driver": "560.35", "cuda": "12.4", "hostname": "node1"},
        "created": created,
    }
    if world_size is not None:
        d["world_size"] = world_size
    return d


def gpu_profile() -> dict[str, Any]:
    cats = {"env-mat/descriptor": 0.002, "embedding": 0.004, "fitting": 0.001, "force/backward": 0.005,
            "optimizer": 0.0005, "data": 0.0002, "other": 0.0003}
    return {"status": "ok", "steps": 20, "wall_s_per_step": 0.015, "gpu_busy_s_per_step": 0.013,
            "host_gap_s_per_step": 0.002, "kernels_per_step": 900.0, "launches_per_step": 905.0,
            "memcpy": {"count": 40, "per_step": 2.0, "time_s": 0.001, "by_kind": {}},
            "categories": {"basis": "gpu_kernel_time", "by_name": cats, "by_range": cats},
            "top_kernels": [{"name": "void gemm_kernel<float>(float*)", "total_s": 0.05, "count": 400,
                             "per_step_s": 0.0025, "pct": 20.0}],
            "top_ops": [], "window": {"start_step": 90, "steps": 20, "numb_steps": 300},
            "ncu": {"returncode": 0, "error": None, "wall_s": 80.0, "kernels": [
                {"name": "gemm_kernel", "launches": 1, "metrics": {}, "units": {},
                 "figures": {"time_us": 12.5, "sm_pct": 41.0, "dram_pct": 7.5, "dram_gb_s": 251.0,
                             "fp64_gflop_s": 3.0, "fp64_pct": 0.0089}}]}}


def write_runs(dest: Path, records: list[dict[str, Any]]) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for r in records:
        p = dest / f"{r['run_id']}.json"
        p.write_text(json.dumps(r))
        out.append(p)
    return out


def typed(records: list[dict[str, Any]]) -> list[StoredRun]:
    """The records as a reader has them (what write_runs' files read back as)."""
    return [StoredRun.from_dict(r) for r in records]
