"""PNG plots of training curves, so every run leaves something a person can read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(path: Path, title: str, curves: dict[str, list[float] | tuple[list, list[float]]],
                xlabel: str = "step") -> Path:
    """One panel per curve, side by side; a curve is ys (x = 0, 1, ...) or (xs, ys)."""
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        xs, ys = curve if isinstance(curve, tuple) else (list(range(len(curve))), curve)
        ax.plot(xs, ys, marker="o" if len(ys) < 30 else None)
        if len(ys) < 30:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
