"""What fit and show print: numbers, tables, summaries of an entry's provenance. No torch import."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import MODES

__all__ = [
    "channel_names",
    "described",
    "floats",
    "normalize_line",
    "numbers",
    "numbers_lines",
    "subset",
    "summary",
    "table",
]

_CONVERT_MODE = re.compile(r"ConvertMode\(mode='(\w+)'\)")  # folder.ConvertMode's repr in a cached pipeline


def numbers(norm: Any, names: list[str], subset: dict[str, Any] | None) -> dict[str, Any]:
    """The statistics of a fitted FitNormalize (raw ``stats``; the Normalize line with its policy applied)."""
    stats = norm.stats
    return {
        "channels": names,
        "mean": floats(stats.mean),
        "std": floats(stats.std),
        "min": floats(stats.min),
        "max": floats(stats.max),
        "pixels_per_channel": int(stats.count[0]),
        "num_samples": norm.num_samples,
        "subset": subset,
        "normalize": normalize_line(norm.mean, norm.std),
    }


def subset(settings: Mapping[str, Any], errors: Any) -> dict[str, Any] | None:
    """The --max-samples settings (max_samples, seed, population) and standard errors; None for a full pass."""
    if settings.get("max_samples") is None or errors is None:
        return None
    return {**{name: settings.get(name) for name in ("max_samples", "seed", "population")},
            "mean_se": floats(errors.mean), "std_se": floats(errors.std)}


def described(attrs: Mapping[str, Any]) -> Any:
    """The cached ``dataset`` attribute: a describe_dataset() dict, or its text if it is not JSON."""
    try:
        return json.loads(attrs.get("dataset") or "{}")
    except (TypeError, ValueError):
        return str(attrs.get("dataset"))


def summary(described: Any) -> str:
    """One line for a describe_dataset() dict: class, root, number of samples and simple settings."""
    if not isinstance(described, dict):
        return str(described)
    name = str(described.get("class", "?")).rsplit(".", 1)[-1]
    settings = [f"{k}={v}" for k, v in sorted(described.items())
                if k not in ("class", "root", "length") and isinstance(v, (str, int, float))]
    counted = f"{described.get('length', '?')} samples"
    return " ".join(str(p) for p in (name, described.get("root")) if p) + f" ({', '.join([counted, *settings])})"


def channel_names(described: Any, pipeline: str, channels: int) -> list[str]:
    """The bands of the PIL mode the images were converted to (a ConvertMode, or ImageFiles' mode), else numbers."""
    import PIL.ImageMode

    converted = _CONVERT_MODE.search(pipeline or "")
    for mode in (converted and converted.group(1), isinstance(described, dict) and described.get("mode")):
        bands = list(PIL.ImageMode.getmode(mode).bands) if mode in MODES else []
        if len(bands) == channels:
            return bands
    return [str(c) for c in range(channels)]


def floats(values: Any) -> list[float | None]:
    """Plain floats for JSON (from a tensor, an array or a sequence); NaN becomes null."""
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    return [None if math.isnan(v) else float(v) for v in items]


def _g(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.8g}"


def _se(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"± {value:.2g}"


def normalize_line(mean: Sequence[float], std: Sequence[float]) -> str:
    return f"transforms.Normalize(mean=[{', '.join(map(_g, mean))}], std=[{', '.join(map(_g, std))}])"


def numbers_lines(report: dict[str, Any]) -> list[str]:
    """The table of mean, std (with standard errors after a subset fit), min and max, and the Normalize line."""
    subset = report["subset"]
    se = ["(se)"] if subset else []
    rows = [["channel", "mean", *se, "std", *se, "min", "max"]]
    for c, name in enumerate(report["channels"]):
        row = [name, _g(report["mean"][c])]
        row += [_se(subset["mean_se"][c])] if subset else []
        row += [_g(report["std"][c])]
        row += [_se(subset["std_se"][c])] if subset else []
        rows.append(row + [_g(report["min"][c]), _g(report["max"][c])])
    note = ["(± se: standard error of the subset's value against the full pass)"] if subset else []
    return ["", *table(rows), *note, "", report["normalize"]]


def table(rows: list[list[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Rows of cells as aligned lines: the columns in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]
