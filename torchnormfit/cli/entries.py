"""``torchnormfit ls``, ``show``, ``export`` and ``rm``: the cache folder as a person sees it.

``show`` and ``export`` without ``-o`` import torch, to print what :meth:`FitNormalize.from_cache` gives;
the others read the entry files with h5py alone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..cache import (
    CacheEntry,
    default_cache_dir,
    delete_entries,
    export_entry,
    list_entries,
    prune_entries,
    read_entry,
)
from . import EXIT_OK, PROG, CliError
from .report import (
    channel_names,
    described,
    floats,
    normalize_line,
    numbers,
    numbers_lines,
    subset,
    summary,
    table,
)

__all__ = ["cache_path", "run_export", "run_ls", "run_rm", "run_show"]

_HIDDEN_ATTRS = {"format", "schema_version", "key"}
_SHOWN_CHARS = 300
_SHOWN_PERCENTILES = (0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5)


def cache_path(cache: Path | None) -> Path:
    """``--cache`` as given (``~`` expanded), else the default cache folder."""
    return cache.expanduser() if cache is not None else default_cache_dir()


def _read(path: Path, key: str | None) -> CacheEntry:
    """The cache entry ``key`` (any key of an entry file), or a CliError that lists the keys there are."""
    if not path.exists():
        raise CliError(f"There is no cache at {path}. Run '{PROG} fit' first, or pass --cache DIR.")
    entry = read_entry(path, key)
    if entry is None:
        known = [e.key for e in list_entries(path)]
        raise CliError(f"No entry {key!r} in {path}. Entries there: {known or 'none'} (see '{PROG} ls').")
    return entry


# --- ls ----------------------------------------------------------------------------------------


def run_ls(args: argparse.Namespace) -> int:
    path = cache_path(args.cache_file or args.cache)
    rows = [_entry_row(entry) for entry in list_entries(path)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no entries in {path}" + ("" if path.exists() else " (the cache does not exist)"))
    else:
        print(_format_ls(path, rows))
    return EXIT_OK


def _entry_row(entry: CacheEntry) -> dict[str, Any]:
    count, mean, std = (entry.vectors[name] for name in ("count", "mean", "std"))
    return {
        "key": entry.key,
        "file": str(entry.path),
        "bytes": entry.size,
        "channels": len(mean),
        "num_samples": entry.attrs.get("num_samples"),
        "pixels_per_channel": int(count[0]),
        "created_utc": entry.attrs.get("created_utc"),
        "last_read": _iso(entry.last_read),
        "source": summary(described(entry.attrs)),
        "mean": floats(mean),
        "std": floats(std),
    }


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment).astimezone().isoformat(timespec="seconds")


def _ago(text: str | None, now: float) -> str:
    """``3d ago`` for an ISO time; ``?`` if there is none."""
    try:
        seconds = now - datetime.fromisoformat(text or "").timestamp()
    except ValueError:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB"):
        if count < 1024 or unit == "MB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def _format_ls(path: Path, rows: list[dict[str, Any]]) -> str:
    now = time.time()
    lines = [["KEY", "IMAGES", "CH", "SIZE", "CREATED", "LAST READ", "SOURCE"]]
    for row in rows:
        images = "?" if row["num_samples"] is None else f"{row['num_samples']:,}"
        lines.append([row["key"], images, str(row["channels"]), _size(row["bytes"]), _ago(row["created_utc"], now),
                      _ago(row["last_read"], now) if row["last_read"] else "never", row["source"]])
    return "\n".join([f"{path}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}", *table(lines, left=(0, 6))])


# --- show --------------------------------------------------------------------------------------


def run_show(args: argparse.Namespace) -> int:
    # torch: the Normalize numbers with the transform's policy applied
    from ..transform import FitNormalize
    from .plots import check_plot, plot_normal

    if args.plot is not None:
        check_plot(args.plot)
    path = cache_path(args.cache)
    entry = _read(path, args.key)
    attrs = entry.attrs
    norm = FitNormalize.from_cache(path, attrs["key"])
    assert norm.mean is not None and norm.stats is not None  # from_cache sets them or raises
    source = described(attrs)
    names = channel_names(source, attrs.get("pipeline", ""), len(norm.mean))
    report = {
        "key": attrs["key"],
        "cache": str(path),
        **numbers(norm, names, subset(attrs, norm.standard_errors)),
        "count": floats(norm.stats.count),
        "var": floats(norm.stats.var),
        "attrs": {k: _jsonable(v) for k, v in attrs.items() if k not in _HIDDEN_ATTRS},
        "percentiles": _percentiles(entry, norm.stats),
        "plot": None,
    }
    if args.plot is not None:
        plot_normal(args.plot, norm, names, f"{args.key}: {summary(source)}")
        report["plot"] = str(args.plot)
    print(json.dumps(report, indent=2) if args.json else _format_show(report))
    return EXIT_OK


def _percentiles(entry: CacheEntry, stats: Any) -> dict[str, list[float | None]] | None:
    """Percentiles of each channel, for an entry that counted its values (fitted with ``clip=``); else None."""
    from ..values import ValueCounts

    counts = ValueCounts.from_arrays(entry.attrs, entry.arrays)
    if counts is None:
        return None
    rows = counts.percentiles(_SHOWN_PERCENTILES, stats.min, stats.max)
    return {f"{q:g}": floats(row) for q, row in zip(_SHOWN_PERCENTILES, rows)}


def _jsonable(value: Any) -> Any:
    """Attribute values as strict JSON: NaN becomes null, anything unusual its str()."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _percentile_lines(report: dict[str, Any]) -> list[str]:
    if not report["percentiles"]:
        return []
    rows = [["percentile", *report["channels"]]]
    rows += [[q, *(f"{v:.6g}" if v is not None else "n/a" for v in values)]
             for q, values in report["percentiles"].items()]
    return ["", *table(rows)]


def _format_show(report: dict[str, Any]) -> str:
    attrs = report["attrs"]
    lines = [
        f"key: {report['key']}",
        f"cache: {report['cache']}",
        (f"images: {report['num_samples']:,}   pixels per channel: {report['pixels_per_channel']:,}   "
         f"channels: {len(report['channels'])}"),
        *numbers_lines(report),
        *_percentile_lines(report),
        "",
        "provenance:",
    ]
    width = max(map(len, attrs), default=0)
    for name in sorted(attrs):
        text = attrs[name] if isinstance(attrs[name], str) else json.dumps(attrs[name])
        if len(text) > _SHOWN_CHARS:
            text = f"{text[:_SHOWN_CHARS]}... ({len(text):,} characters; --json shows them all)"
        lines.append(f"  {name.ljust(width)}  " + (text or '""').replace("\n", "\n  " + " " * (width + 2)))
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


# --- export, rm --------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    path = cache_path(args.cache)
    entry = _read(path, args.key)
    if args.output is not None:
        print(export_entry(path, entry.key, args.output))
        return EXIT_OK
    # torch: the numbers with the transform's policy (a constant channel's std is 1)
    from ..transform import FitNormalize

    norm = FitNormalize.from_cache(path, entry.key)
    mean, std = norm.mean or [], norm.std or []
    if args.format == "normalize":
        print(normalize_line(mean, std))
    elif args.format == "json":
        print(json.dumps({"key": entry.key, "mean": mean, "std": std}, indent=2))
    else:
        print(json.dumps({"image_mean": mean, "image_std": std}, indent=2))
    return EXIT_OK


def run_rm(args: argparse.Namespace) -> int:
    path = cache_path(args.cache)
    keys = list(dict.fromkeys(args.keys))
    for key in keys:  # all present, or nothing is removed
        _read(path, key)
    removed = delete_entries(path, keys) if keys else []
    if args.older_than is not None or args.keep_last is not None:
        removed += prune_entries(path, older_than=args.older_than, keep_last=args.keep_last)
    if args.json:
        print(json.dumps({"cache": str(path), "removed": removed}))
    else:
        print("\n".join(f"removed {key} from {path}" for key in removed) or f"nothing to remove in {path}")
    return EXIT_OK
