"""PNG figures of a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedsecmem.data.types import ImageSet  # noqa: E402

__all__ = ["anomaly_map_grid", "pick_examples", "round_curve"]


def pick_examples(test: ImageSet, per_product: int) -> list[int]:
    """A few anomalous test images of each product (or of the whole set when products are unknown)."""
    picks: list[int] = []
    for p in range(len(test.product_names)):
        idx = np.flatnonzero((test.products == p) & (test.labels == 1))
        picks += [int(i) for i in idx[:per_product]]
    if not picks:
        picks = [int(i) for i in np.flatnonzero(test.labels == 1)[: per_product * 4]]
    return picks


def anomaly_map_grid(test: ImageSet, picks: list[int], maps: np.ndarray, scores: np.ndarray,
                     path: Path) -> Path | None:
    """Rows of (image with its true mask, anomaly map) for the test images ``picks``;
    ``maps[j]`` is the map of ``picks[j]``, ``scores`` the image scores of the whole set."""
    if not picks:
        return None
    vmax = float(np.quantile(maps, 0.999)) if maps.size else 1.0
    vmin = float(np.quantile(maps, 0.01)) if maps.size else 0.0
    cols = 2
    fig, axes = plt.subplots(len(picks), cols, figsize=(2.2 * cols, 2.2 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        prod = test.products[i]
        name = test.product_names[prod] if prod >= 0 else test.kinds[i]
        a, b = axes[row]
        a.imshow(test.images[i])
        if test.masks is not None and test.masks[i].any():
            a.contour(test.masks[i], levels=[0.5], colors="lime", linewidths=0.8)
        a.set_title(f"{name}: {test.kinds[i]}", fontsize=7)
        b.imshow(test.images[i].mean(-1), cmap="gray")
        b.imshow(maps[row], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        b.set_title(f"score {scores[i]:.2f}", fontsize=7)
        a.axis("off")
        b.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def round_curve(per_round: list[dict], path: Path) -> Path:
    """Mean image AUROC (both scores) after each round."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    rounds = [r["round"] for r in per_round]
    for key, label in (("image_patch_max", "image AUROC (patch max)"), ("image_knn", "image AUROC (image kNN)")):
        vals = [r.get(key) for r in per_round]
        if any(v is not None for v in vals):
            ax.plot(rounds, [np.nan if v is None else v for v in vals], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("mean over clients")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
