"""Render a simulation report: a readable table, and the paper's Fig. 6 with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = (
    ("policy", "{}"),
    ("requests", "{}"),
    ("processed_edge", "{}"),
    ("rejected_edge", "{}"),
    ("cloud", "{}"),
    ("failed", "{}"),
    ("cloud_cost_usd", "{:.2f}"),
    ("latency_mean_s", "{:.2f}"),
    ("latency_p95_s", "{:.2f}"),
    ("utilization", "{}"),
)


PALETTE = ("#999999", "#6f9fd8", "#e39b3a", "#3a9d5d", "#b05fc2")
# The paper's Fig. 6: (report column, title, unit) of each panel.
FIG6_PANELS = (
    ("processed_edge", "processed at edge", "requests"),
    ("rejected_edge", "rejected at edge", "requests"),
    ("cloud_cost_usd", "cloud cost", "USD"),
)


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (the `plot` extra)."""


def table(report: dict[str, Any]) -> str:
    """Per-policy rows (totals over the seeds), then the lower bound if any."""
    rows = [[name for name, _ in COLUMNS]]
    for policy, stats in report["policies"].items():
        values = {**stats, "policy": policy, "utilization": _util(stats["utilization"])}
        rows.append([_fmt(fmt, values[name]) for name, fmt in COLUMNS])
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    versus = report.get("versus_load_aware")
    if versus:
        lines.append(
            "over load_aware (cloud cost / p95): "
            + ", ".join(
                f"{k} {v['cost']}/{v['p95']}"
                for k, v in versus["ratios"].items()
                if k != "load_aware"
            )
        )
        if versus["oracle_gain_kept"]:
            lines.append(
                "share of the oracle's saving kept: "
                + ", ".join(f"{k} {v}" for k, v in versus["oracle_gain_kept"].items())
            )
    for policy, stats in report["policies"].items():
        errors = stats.get("length_prediction")
        if errors:
            lines.append(
                f"{policy}: lengths predicted at arrival: MAPE {errors['mape']}, pairwise order "
                f"{errors['pairwise']}, Kendall tau-b {errors['tau_b']}"
            )
    signal = report.get("label_signal")
    if signal and any("length_prediction" in s for s in report["policies"].values()):
        lines.append(
            f"best from the labels alone (per-key mean in hindsight, {signal['keys']} keys): "
            f"MAPE {signal['mape']}, pairwise order {signal['pairwise']}, tau-b {signal['tau_b']}"
        )
    bound = report.get("lower_bound")
    if bound:
        lines.append(
            "lower bound on cloud cost (same edge latencies per output size): "
            f"${bound['cloud_cost_usd']:.2f}; ratio to it: "
            + ", ".join(f"{k} {v}" for k, v in bound["ratio"].items())
        )
    lines.append(f"seeds: {report['seeds']}; totals over all seeds; utilization = mean slots busy")
    return "\n".join(lines)


def _fmt(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value)


def _util(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def fig6(report: dict[str, Any]) -> dict[str, Any]:
    """Fig. 6's numbers: each panel's value per policy, mean per seed (what `plot` draws, and
    what `simulate --publish` puts in the CMS for the dashboard)."""
    seeds = len(report["seeds"])
    return {
        "source": "edgecollab simulate",
        "nodes": len(report["nodes"]),
        "seeds": seeds,
        "knowledge": report["knowledge"],
        "panels": [{"metric": k, "title": t, "unit": u} for k, t, u in FIG6_PANELS],
        "policies": {
            name: {key: round(stats[key] / seeds, 6) for key, _, _ in FIG6_PANELS}
            for name, stats in report["policies"].items()
        },
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Fig. 6: processed at edge, rejected at edge and cloud cost per policy (mean per seed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'edgecollab[plot]'") from None
    figure = fig6(report)
    names = list(figure["policies"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, title, unit) in zip(axes, FIG6_PANELS, strict=True):
        values = [figure["policies"][n][key] for n in names]
        colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.1f" if key == "cloud_cost_usd" else "%.0f", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"edgecollab simulate: per simulated run, mean of {figure['seeds']} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
