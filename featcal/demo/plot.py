"""The demo's figure: feature drift per block before and after FeatCal, and accuracy per task."""

from __future__ import annotations

from pathlib import Path

from ..errors import FeatCalError
from ..io.atomic_file import atomic_file


def plot_demo(report: dict, path: Path) -> None:
    """Write a PNG with two panels, from the demo's report: the mean drift to the experts at each
    block's output (merged vs calibrated), and each task's accuracy (expert, merged, FeatCal)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise FeatCalError("featcal demo needs matplotlib for its plot: pip install 'featcal[demo]'") from err

    fig, (drift_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    blocks = [b["block"] for b in report["drift"]]
    drift_ax.plot(blocks, [b["merged"] for b in report["drift"]], "o-", color="tab:red", label="merged")
    drift_ax.plot(blocks, [b["featcal"] for b in report["drift"]], "o-", color="tab:green", label="+ FeatCal")
    drift_ax.set(
        xlabel="block",
        ylabel="relative drift from the experts",
        title="Feature drift per block (calibration inputs)",
        ylim=(0, None),
    )
    drift_ax.set_xticks(blocks)
    drift_ax.legend()

    names = list(report["tasks"])
    series = [
        ("expert", "tab:blue", "expert"),
        ("merged", "tab:red", "merged"),
        ("featcal", "tab:green", "+ FeatCal"),
    ]
    width = 0.8 / len(series)
    for i, (key, color, label) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(names))]
        values = [100 * report["tasks"][n][key] for n in names]
        acc_ax.bar(xs, values, width, color=color, label=f"{label} ({100 * report['average'][key]:.1f})")
    acc_ax.set_xticks(range(len(names)), names)
    acc_ax.set(
        ylabel="test accuracy (%)",
        ylim=(0, 100),
        title=f"Held-out accuracy per task ({report['merge']['name']} merge)",
    )
    acc_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=len(series), frameon=False)
    fig.tight_layout()

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
