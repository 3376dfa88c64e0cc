"""The plots of fit (pixel histograms) and show (normal approximations), with matplotlib if installed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import PLOT_EXTRA, CliError

__all__ = ["check_plot", "plot_normal", "plot_pixels"]

_COLORS = {"R": "tab:red", "G": "tab:green", "B": "tab:blue", "L": "0.3"}


def _require_matplotlib() -> Any:
    """matplotlib's Figure class, or a CliError naming the extra that installs it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError(
            f"--plot needs matplotlib, which is not installed. Install the plot extra: {PLOT_EXTRA} "
            "(or pip install matplotlib)."
        ) from None
    return Figure


def check_plot(path: Path) -> None:
    """Fail before any work if the plot cannot be made: no matplotlib, or no folder for the file."""
    _require_matplotlib()
    folder = path.expanduser().resolve().parent
    if not folder.is_dir():
        raise CliError(f"Cannot write the plot {path}: the folder {folder} does not exist.")


def plot_pixels(path: Path, pixels: Any, norm: Any, names: list[str], title: str) -> None:
    """Histograms of sampled pixels per channel, before and after normalization, side by side."""
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None] for v in (norm.mean, norm.std))
    after = (pixels.double() - mean) / std
    figure, (left, right) = _figure(title)
    for c, name in enumerate(names):
        color = _COLORS.get(name)
        left.hist(pixels[c].numpy(), bins=64, histtype="step", density=True, color=color,
                  label=f"{name}: mean {float(mean[c]):.4g}, std {float(std[c]):.4g}")
        right.hist(after[c].numpy(), bins=64, histtype="step", density=True, color=color, label=name)
    _finish(figure, left, right, path)


def plot_normal(path: Path, norm: Any, names: list[str], title: str) -> None:
    """The normal approximation of each channel from its cached mean/std, within its [min, max]."""
    figure, (left, right) = _figure(f"{title}\nnormal approximation from mean/std (the cache keeps no pixels)")
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in (norm.mean, norm.std))
    for c, name in enumerate(names):
        color = _COLORS.get(name)
        x = torch.linspace(float(norm.stats.min[c]), float(norm.stats.max[c]), 256, dtype=torch.float64)
        z = (x - mean[c]) / std[c]
        density = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
        left.plot(x.numpy(), (density / std[c]).numpy(), color=color,
                  label=f"{name}: mean {float(mean[c]):.4g}, std {float(std[c]):.4g}")
        right.plot(z.numpy(), density.numpy(), color=color, label=name)
    _finish(figure, left, right, path)


def _figure(title: str) -> tuple[Any, Any]:
    Figure = _require_matplotlib()
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    figure.suptitle(title, fontsize=9)
    return figure, axes


def _finish(figure: Any, left: Any, right: Any, path: Path) -> None:
    left.set(title="before: pixel values", xlabel="value", ylabel="density")
    right.set(title="after Normalize: (x - mean) / std", xlabel="normalized value")
    right.axvline(0.0, color="black", linewidth=0.8)
    for axis in (left, right):
        axis.set_ylim(bottom=0.0)
        axis.legend(fontsize=8)
    figure.savefig(path.expanduser(), dpi=100)
