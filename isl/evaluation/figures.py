"""The evaluation figure: per-case Dice before and after ISL, and one overlay."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def evaluation_figure(rows: list[dict], example, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = np.array([np.mean(list(r["dice_baseline"].values())) for r in rows])
    after = np.array([np.mean(list(r["dice_isl"].values())) for r in rows])
    tta = np.array([np.mean(list(r["dice_tta_flip"].values())) for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    ax = axes[0]
    for b, a in zip(before, after):
        ax.plot([0, 1], [b, a], color="tab:green" if a >= b else "tab:red", alpha=0.5, lw=1)
    ax.scatter(np.zeros_like(before), before, s=12, color="k")
    ax.scatter(np.ones_like(after), after, s=12, color="k")
    ax.set_xticks([0, 1], [f"baseline\n{before.mean():.3f}", f"ISL\n{after.mean():.3f}"])
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylabel("mean foreground Dice per case")
    ax.set_title(f"{len(rows)} cases: {int((after > before).sum())} improved, {int((after < before).sum())} worsened"
                 f" (flip TTA {tta.mean():.3f})", fontsize=10)
    if example is not None:
        gain, case_id, image, truth, masks = example
        z = int(np.argmax((truth > 0).sum((1, 2))))
        ax = axes[1]
        ax.imshow(image[z] if image.shape == truth.shape else image[min(z, image.shape[0] - 1)], cmap="gray")
        for name, mask, colour in (("truth", truth, "yellow"), ("baseline", masks["baseline"], "tab:red"),
                                   ("ISL", masks["isl"], "tab:cyan")):
            ax.contour((mask[z] > 0).astype(float), levels=[0.5], colors=colour, linewidths=1.2)
            ax.plot([], [], color=colour, label=name)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{case_id}, slice {z}: ISL {gain * 100:+.1f} Dice points", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
