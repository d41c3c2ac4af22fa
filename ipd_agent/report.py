"""PNG report of an augmentation: what was imagined, what was kept and why."""
from __future__ import annotations

import numpy as np

from .augment import REASONS, AugmentationResult

__all__ = ["augmentation_report"]


def augmentation_report(res: AugmentationResult, path: str) -> str:
    """Three panels: imagined vs real segment value per branch, accept/reject reasons, uncertainty histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    acc = res.accepted
    if len(acc):
        ax[0].scatter(res.real_values[~acc], res.imagined_values[~acc], s=8, c="#d62728", label="rejected")
        ax[0].scatter(res.real_values[acc], res.imagined_values[acc], s=8, c="#2ca02c", label="accepted")
        lo = float(min(res.real_values.min(), res.imagined_values.min()))
        hi = float(max(res.real_values.max(), res.imagined_values.max()))
        ax[0].plot([lo, hi], [lo, hi], "k--", lw=1, label="imagined = real")
        ax[0].legend()
    ax[0].set_xlabel("real segment value (from the branch state)")
    ax[0].set_ylabel("imagined segment value")
    ax[0].set_title(f"{int(acc.sum())} of {len(acc)} branches accepted")
    counts = [int((res.outcomes == r).sum()) for r in REASONS]
    ax[1].bar(REASONS, counts, color=["#2ca02c", "#9467bd", "#8c564b", "#d62728"])
    ax[1].set_title("outcome of each imagined rollout")
    ax[1].set_ylabel("rollouts")
    if len(res.uncertainties):
        u = np.log10(np.maximum(res.uncertainties, 1e-12))
        ax[2].hist(u, bins=40, color="#1f77b4")
        ax[2].axvline(np.log10(max(res.threshold, 1e-12)), color="k", ls="--", label="threshold κ")
        ax[2].legend()
    ax[2].set_xlabel("log10 uncertainty U of executed imagined steps")
    ax[2].set_title("model uncertainty")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
