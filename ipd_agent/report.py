"""PNG report of an augmentation: what was imagined, what was kept and why.

The panel functions draw onto a given matplotlib axis, so other figures (the quickstart's) reuse them.
"""
from __future__ import annotations

import numpy as np

from .augment import REASONS, AugmentationResult

__all__ = ["augmentation_report", "plot_segment_values", "plot_outcomes", "plot_uncertainty"]


def plot_segment_values(ax, res: AugmentationResult) -> None:
    """Imagined vs real segment value of every branch, accepted in green, rejected in red."""
    acc = res.accepted
    if len(acc):
        ax.scatter(res.real_values[~acc], res.imagined_values[~acc], s=8, c="#d62728", label="rejected")
        ax.scatter(res.real_values[acc], res.imagined_values[acc], s=8, c="#2ca02c", label="accepted")
        lo = float(min(res.real_values.min(), res.imagined_values.min()))
        hi = float(max(res.real_values.max(), res.imagined_values.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="imagined = real")
        ax.legend()
    ax.set_xlabel("real segment value (from the branch state)")
    ax.set_ylabel("imagined segment value")
    ax.set_title(f"{int(acc.sum())} of {len(acc)} branches accepted")


def plot_outcomes(ax, res: AugmentationResult) -> None:
    """How many rollouts were accepted, and why the others were not."""
    counts = [int((res.outcomes == r).sum()) for r in REASONS]
    ax.bar(REASONS, counts, color=["#2ca02c", "#9467bd", "#8c564b", "#d62728"])
    ax.set_title("outcome of each imagined rollout")
    ax.set_ylabel("rollouts")


def plot_uncertainty(ax, res: AugmentationResult) -> None:
    """Histogram of U over executed imagined steps, with the threshold κ."""
    if len(res.uncertainties):
        ax.hist(np.log10(np.maximum(res.uncertainties, 1e-12)), bins=40, color="#1f77b4")
        ax.axvline(np.log10(max(res.threshold, 1e-12)), color="k", ls="--", label="threshold κ")
        ax.legend()
    ax.set_xlabel("log10 uncertainty U of executed imagined steps")
    ax.set_title("model uncertainty")


def augmentation_report(res: AugmentationResult, path: str) -> str:
    """Three panels: imagined vs real segment value per branch, accept/reject reasons, uncertainty histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    plot_segment_values(ax[0], res)
    plot_outcomes(ax[1], res)
    plot_uncertainty(ax[2], res)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
