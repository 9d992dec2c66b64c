"""The report's plots (matplotlib, Agg), each returned as a base64 PNG for one self-contained
HTML file, and the small per-run readings they share with the page (learning curves, speed-ups)."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from harness.core.records import Profile, StoredRun
from harness.report import summary
from harness.run.distributed import scaling_efficiency
from harness.results.runs import ROOT
from harness.report.summary import card_of, is_fast, is_profile_sweep, stamp, sweep_groups, world_size


# the columns of upstream's lcurve.out for an energy model, for records written with the
# header mis-read (the second '#' line of lcurve.out taken as the header)
LCURVE_ENER = ["step", "rmse_val", "rmse_trn", "rmse_e_val", "rmse_e_trn", "rmse_f_val", "rmse_f_trn", "lr"]


PROFILE_CATEGORIES = ("env-mat/descriptor", "embedding", "fitting", "force/backward", "optimizer", "data", "other")

UPSTREAM_COLOR, FAST_COLOR = "#4a7ab5", "#d9822b"


def lcurve_of(r: StoredRun) -> dict[str, list] | None:
    """The run's lcurve columns; repairs records whose header was mis-read, else re-reads the file."""
    lc = r.lcurve
    if isinstance(lc, dict) and "step" in lc:
        return lc
    path = r.artifacts.lcurve
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


def speedups(rs: list[StoredRun]) -> dict[str, float | None]:
    """run_id -> baseline median / run median, within ONE sweep on ONE card (same world size)."""
    out: dict[str, float | None] = {}
    for r in rs:
        base = next((b for b in rs if b.variant == "baseline" and b.status == "ok"
                     and world_size(b) == world_size(r) and b.sweep_id == r.sweep_id
                     and card_of(b) == card_of(r)), None)
        med = r.timing.step_s_median
        bmed = base.timing.step_s_median if base else None
        out[r.run_id] = bmed / med if bmed and med and r.status == "ok" else None
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a data URI; a 128-colour palette keeps the page (a hundred plots) a quarter
    of its RGB size with the plot colours intact."""
    from PIL import Image  # matplotlib's own dependency

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    buf.seek(0)
    out = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _log_ms_axis(ax) -> None:
    """Log y axis in plain ms numbers (1, 2, 5, 10 ... not 2x10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))


def plot_step_times(rs: list[StoredRun], title: str) -> str | None:
    """ms/step on a log axis (1 ms beside 88 ms stays readable), IQR bars, speed-up vs baseline."""
    ok = [r for r in rs if r.status == "ok" and r.timing.step_s_median]
    if not ok:
        return None
    plt = _plt()
    sp = speedups(rs)
    labels = [r.variant + (f" ×{world_size(r)}" if world_size(r) > 1 else "") for r in ok]
    med = [r.timing.step_s_median * 1e3 for r in ok]
    q25 = [min(m, (r.timing.step_s_q25 or 0) * 1e3 or m) for m, r in zip(med, ok)]
    q75 = [max(m, (r.timing.step_s_q75 or 0) * 1e3) for m, r in zip(med, ok)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(ok) + 2), 3.4))
    colors = [FAST_COLOR if is_fast(r) else UPSTREAM_COLOR for r in ok]
    bars = ax.bar(labels, med, yerr=[[m - q for m, q in zip(med, q25)], [q - m for m, q in zip(med, q75)]],
                  capsize=4, color=colors)
    for b, r, top in zip(bars, ok, q75):
        s = sp.get(r.run_id)
        if s:
            ax.annotate(f"{s:.2f}×", (b.get_x() + b.get_width() / 2, top), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    _log_ms_axis(ax)
    ax.set_ylim(min(q25) / 2, max(q75) * 3)
    ax.set_ylabel("ms / step (median, IQR bars; log)")
    ax.set_title(title + "\nabove bars: speed-up vs baseline; orange: beyond upstream's code", fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return _png(fig)


def plot_lcurves(rs: list[StoredRun]) -> str | None:
    curves = [(r.variant, lcurve_of(r)) for r in rs if r.status == "ok"]
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


def plot_profile(rs: list[StoredRun]) -> str | None:
    prof = [(r.variant, r.profile) for r in rs
            if isinstance(r.profile, Profile) and (r.profile.categories or {}).get("by_range")]
    if not prof:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(prof) + 3), 3.4))
    bottom = [0.0] * len(prof)
    colors = plt.get_cmap("tab10").colors
    for i, c in enumerate(PROFILE_CATEGORIES):
        vals = [(p.categories["by_range"].get(c) or 0.0) * 1e3 for _, p in prof]
        ax.bar([v for v, _ in prof], vals, bottom=bottom, label=c, color=colors[i % 10])
        bottom = [b + x for b, x in zip(bottom, vals)]
    for i, (_, p) in enumerate(prof):
        if p.gpu_busy_s_per_step is not None:
            ax.plot([i - 0.4, i + 0.4], [p.wall_s_per_step * 1e3] * 2, "k--", lw=1)
    basis = prof[0][1].categories.get("basis", "")
    ax.set_ylabel(f"ms / step ({basis.replace('_', ' ')})")
    ax.set_title("time by category (named ranges); dashed: wall per step", fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _png(fig)


def plot_scaling(rs: list[StoredRun]) -> str | None:
    multi = [r for r in rs if r.status == "ok" and r.timing.step_s_median]
    if not any(world_size(r) > 1 for r in multi):
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    by_v: dict[str, dict[int, float]] = {}
    for r in multi:  # latest per (variant, world size): absolute throughput, no cross-run ratio
        by_v.setdefault(r.variant, {})[world_size(r)] = world_size(r) / r.timing.step_s_median
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


def plot_history(runs: list[StoredRun], system: str, card: str) -> str | None:
    """ms/step per variant across the bench sweeps of (system, card), oldest left, log axis.
    Profile sweeps are left out: their step times carry the profiler."""
    groups = {k: rs for k, rs in sweep_groups(runs).items() if k[:2] == (system, card) and not is_profile_sweep(rs)}
    order = sorted(groups, key=lambda k: stamp(k, groups[k]))
    pts: dict[str, list[tuple[int, float]]] = {}
    for i, k in enumerate(order):
        for v in sorted({r.variant for r in groups[k]}):
            run = summary.timed_run(groups[k], v)
            if run:
                pts.setdefault(v, []).append((i, run.timing.step_s_median * 1e3))
    if len(order) < 2 or not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(11.0, 4.0 + 0.25 * len(order)), 3.6))
    styles = ["-o", "-s", "-^", "-D", "-v", "-P", "-X"]
    for j, (v, xy) in enumerate(sorted(pts.items())):
        ax.plot([x for x, _ in xy], [y for _, y in xy], styles[j // 10 % len(styles)], ms=4, label=v)
    _log_ms_axis(ax)
    ax.set_xticks(range(len(order)), [k[2][:15] for k in order], rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("ms / step (median; log)")
    ax.set_title(f"history: {system} on {card}, every bench sweep (absolute ms/step per sweep)", fontsize=9)
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left", ncol=1 + len(pts) // 16)
    return _png(fig)
