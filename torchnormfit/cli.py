"""The ``torchnormfit`` command line: fit an image folder or a torchvision dataset, inspect the cache.

::

    torchnormfit fit SOURCE | --dataset NAME --root DIR [--split SPLIT]   [options]
    torchnormfit ls [CACHE]
    torchnormfit show KEY
    torchnormfit export KEY --format normalize|json|hf
    torchnormfit rm KEY [KEY ...]

Results go to stdout (``--json`` for machine-readable output), messages to
stderr. Exit codes: 0 success, 1 the job failed, 2 usage error (argparse's
convention). Built on the library's own functions; this module is the only
place that prints.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.ImageMode
import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset

from . import __version__
from .cache import (
    CacheEntry,
    CacheError,
    CacheWarning,
    default_cache_path,
    delete_entry,
    list_entries,
    read_entry,
    write_entry,
)
from .fingerprint import describe_dataset, describe_pipeline, fingerprint
from .fitting import DEFAULT_BATCH_SIZE, default_num_workers, fit_stats
from .folder import MODES, ImageFiles, find_unreadable, to_float_pipeline, unreadable_file_message
from .sampling import fit_indices, sample_pixels, subset_indices
from .stats import ChannelStats

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PROG = "torchnormfit"
PLOT_EXTRA = "pip install 'torchnormfit[plot]'"
_COLORS = {"R": "tab:red", "G": "tab:green", "B": "tab:blue", "L": "0.3"}
_HIDDEN_ATTRS = {"format", "schema_version", "key"}


class CliError(Exception):
    """The job failed: the message (what happened, and the fix) is printed and the exit code is 1."""


# --- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Examples
    --------
    >>> main(["ls", "--cache", "/tmp/none.h5"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fit":
        _check_fit_usage(args)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except BrokenPipeError:  # stdout closed early (| head): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILURE
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; nothing was written to the cache.", file=sys.stderr)
            return 130
        except (CliError, CacheError, OSError, ValueError, TypeError, RuntimeError) as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return EXIT_FAILURE


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


# --- arguments ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact per-channel mean and std of an image dataset, fitted once and cached in HDF5.",
        epilog="Exit codes: 0 success, 1 the job failed, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--cache", type=Path, metavar="FILE",
        help="HDF5 cache file (default: $TORCHNORMFIT_CACHE, else $XDG_CACHE_HOME/torchnormfit/stats.h5)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print machine-readable JSON instead")
    _add_fit(commands, [cache, as_json])
    _add_inspect(commands, [cache, as_json], cache)
    return parser


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _add_fit(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    fit = commands.add_parser(
        "fit", parents=parents, help="fit mean/std on an image folder or a torchvision dataset",
        description="Fit the exact per-channel mean and std (population, ddof=0) of every pixel, "
        "cache them, and print them with a ready-to-paste transforms.Normalize line.",
    )
    fit.set_defaults(run=_cmd_fit, usage_error=fit.error)
    source = fit.add_argument_group("source (one of)")
    source.add_argument("source", nargs="?", metavar="SOURCE",
                        help="image folder: ImageFolder layout or images at any depth (JPEG, PNG, WebP, BMP, TIFF)")
    source.add_argument("--dataset", metavar="NAME",
                        help="a torchvision dataset class, e.g. CIFAR10 (never downloaded)")
    source.add_argument("--root", metavar="DIR", help="the torchvision dataset's root folder")
    source.add_argument("--split", metavar="SPLIT", help="the torchvision dataset's split (default: train)")
    pipeline = fit.add_argument_group("pipeline")
    pipeline.add_argument("--mode", choices=MODES, metavar="MODE",
                          help=f"convert images to this PIL mode, one of {', '.join(MODES)} "
                          "(default: RGB for folders, unchanged for --dataset)")
    pipeline.add_argument("--resize", type=_positive, metavar="N", help="Resize(N): smaller edge to N pixels")
    pipeline.add_argument("--center-crop", type=_positive, metavar="N", help="CenterCrop(N) after the resize")
    run = fit.add_argument_group("run")
    run.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, metavar="N",
                     help=f"images per batch (default {DEFAULT_BATCH_SIZE}); never changes the result")
    run.add_argument("--workers", type=_non_negative, metavar="N",
                     help="DataLoader worker processes (default: usable CPUs, at most 8)")
    run.add_argument("--key", help="cache entry name; an entry of that name is used as it is (default: a fingerprint "
                     "of the files, pipeline and options)")
    run.add_argument("--refit", action="store_true", help="fit again even if the cache has the entry")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    run.add_argument("--skip-bad", action="store_true",
                     help="skip unreadable or truncated image files and report how many (folders only)")
    run.add_argument("--max-samples", type=_positive, metavar="N",
                     help="fit on a uniform random subset of N images and report standard errors")
    run.add_argument("--seed", type=_integer, metavar="S", help="seed of the --max-samples subset (default 0)")
    run.add_argument("--plot", type=Path, metavar="FILE.png",
                     help=f"save histograms before/after normalization (needs matplotlib: {PLOT_EXTRA})")


def _add_inspect(commands: Any, parents: list[argparse.ArgumentParser], cache: argparse.ArgumentParser) -> None:
    ls = commands.add_parser("ls", parents=parents, help="list the cache entries")
    ls.add_argument("cache_file", nargs="?", type=Path, metavar="CACHE", help="cache file (same as --cache)")
    ls.set_defaults(run=_cmd_ls)
    show = commands.add_parser("show", parents=parents, help="one entry in full, provenance included")
    show.add_argument("key", metavar="KEY")
    show.add_argument("--plot", type=Path, metavar="FILE.png",
                      help="save the normal approximation of each channel before/after normalization "
                      f"(the cache keeps no pixels; needs matplotlib: {PLOT_EXTRA})")
    show.set_defaults(run=_cmd_show)
    export = commands.add_parser("export", parents=[cache], help="print an entry's mean/std for a config")
    export.add_argument("key", metavar="KEY")
    export.add_argument("--format", choices=("normalize", "json", "hf"), default="normalize",
                        help="a transforms.Normalize line, a JSON object, or the image_mean/image_std fields "
                        "of a Hugging Face image processor config (default: normalize)")
    export.set_defaults(run=_cmd_export)
    rm = commands.add_parser("rm", parents=parents, help="remove entries from the cache")
    rm.add_argument("keys", nargs="+", metavar="KEY")
    rm.set_defaults(run=_cmd_rm)


def _check_fit_usage(args: argparse.Namespace) -> None:
    """Rules between options; a violation is a usage error (exit 2, with the 'fit' usage line)."""
    fail = args.usage_error
    if (args.source is None) == (args.dataset is None):
        fail("give an image folder (SOURCE) or --dataset NAME --root DIR, not both and not neither")
    if args.dataset is None and (args.root is not None or args.split is not None):
        fail("--root and --split go with --dataset")
    if args.dataset is not None and args.skip_bad:
        fail("--skip-bad applies to image folders (SOURCE), not to --dataset")
    if args.seed is not None and args.max_samples is None:
        fail("--seed chooses the --max-samples subset; give --max-samples N too")
    if args.dataset is not None:
        args.dataset_class = _dataset_class(args.dataset, fail)
        args.dataset_kwargs = _dataset_kwargs(args, fail)


def _dataset_class(name: str, fail: Any) -> type:
    import torchvision.datasets as datasets

    known = sorted(
        n for n in datasets.__all__
        if isinstance(getattr(datasets, n, None), type) and issubclass(getattr(datasets, n), Dataset)
    )
    matches = [n for n in known if n == name] or [n for n in known if n.lower() == name.lower()]
    if len(matches) != 1:
        by_lower = {n.lower(): n for n in known}
        close = [by_lower[n] for n in difflib.get_close_matches(name.lower(), list(by_lower), n=3)]
        hint = f" Did you mean {' or '.join(close)}?" if close else f" Known: {', '.join(known)}."
        fail(f"torchvision.datasets has no dataset {name!r}.{hint}")
    return getattr(datasets, matches[0])


def _dataset_kwargs(args: argparse.Namespace, fail: Any) -> dict[str, Any]:
    """Keyword arguments for the torchvision dataset class: root, split/train, download=False."""
    cls = args.dataset_class
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "root" in params:
        if args.root is None:
            fail(f"--dataset {cls.__name__} needs --root DIR (the folder that holds the downloaded files)")
        kwargs["root"] = args.root
    split = args.split or "train"
    if "split" in params:
        kwargs["split"] = split
    elif "train" in params:
        if split not in ("train", "test"):
            fail(f"{cls.__name__} has a train and a test split; got --split {split!r}")
        kwargs["train"] = split == "train"
    elif args.split is not None:
        fail(f"{cls.__name__} has no split; leave out --split")
    if "download" in params:
        kwargs["download"] = False
    return kwargs


# --- fit ---------------------------------------------------------------------------------------


@dataclass
class _Fit:
    """The outcome of ``fit``: fitted now or loaded from the cache."""

    stats: ChannelStats
    num_samples: int | None
    cached: bool
    skipped: int = 0
    subset: dict[str, Any] | None = None
    indices: list[int] | None = None
    saved: bool = False
    skipped_files: list[str] = field(default_factory=list)


def _cmd_fit(args: argparse.Namespace) -> int:
    if args.plot is not None:
        _require_matplotlib()
        _check_output(args.plot)
    dataset, source, names = _open_source(args)
    path = _cache_path(args.cache)
    key = args.key or _fit_key(dataset, args)
    fit = None if args.refit else _load_fit(path, key)
    if fit is None:
        fit = _run_fit(dataset, args)
        fit.saved = _save_fit(path, key, fit, dataset, source, names)
    plot = None
    if args.plot is not None:
        pixels = sample_pixels(dataset, fit.indices, seed=args.seed or 0)
        _plot_pixels(args.plot, pixels, fit.stats, names, f"{source}\n{pixels.shape[1]:,} pixels sampled")
        plot = str(args.plot)
    report = _fit_report(key, path, source, names, fit, plot)
    print(json.dumps(report, indent=2) if args.json else _format_fit(report))
    return EXIT_OK


def _open_source(args: argparse.Namespace) -> tuple[Dataset, str, list[str] | None]:
    """The dataset to fit, a one-line description of it, and the channel names if known."""
    if args.source is not None:
        mode = args.mode or "RGB"
        pipeline = to_float_pipeline(resize=args.resize, center_crop=args.center_crop)
        try:
            dataset = ImageFiles(args.source, mode=mode, transform=pipeline)
        except FileNotFoundError as error:
            raise CliError(str(error)) from None
        return dataset, dataset.describe(), _channel_names(mode)
    cls, kwargs = args.dataset_class, dict(args.dataset_kwargs)
    kwargs["transform"] = to_float_pipeline(args.mode, args.resize, args.center_crop)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "transform")
    try:
        dataset = cls(**kwargs)
    except Exception as error:
        raise CliError(
            f"Could not open torchvision.datasets.{cls.__name__}({shown}): "
            f"{type(error).__name__}: {str(error).rstrip('.')}. "
            f"torchnormfit never downloads: fetch the files once in Python with "
            f"torchvision.datasets.{cls.__name__}({kwargs.get('root', '...')!r}, download=True), "
            "or point --root at the folder that already holds them."
        ) from None
    source = f"torchvision.datasets.{cls.__name__}({shown}) ({len(dataset)} images)"
    return dataset, source, _channel_names(args.mode) if args.mode else None


def _channel_names(mode: str) -> list[str]:
    return list(PIL.ImageMode.getmode(mode).bands)


def _cache_path(cache: Path | None) -> Path:
    return cache.expanduser() if cache is not None else default_cache_path()


def _fit_key(dataset: Dataset, args: argparse.Namespace) -> str:
    """A fingerprint of the files, the pipeline, and the options that change the numbers."""
    settings = {
        "statistic": "per-channel population mean/std",
        "ddof": 0,
        "max_samples": args.max_samples,
        "seed": (args.seed or 0) if args.max_samples else None,
        "skip_bad": args.skip_bad,
    }
    return fingerprint(dataset, None, settings)


def _load_fit(path: Path, key: str) -> _Fit | None:
    try:
        entry = read_entry(path, key)
    except CacheError as error:
        warnings.warn(f"{error} Not using it; fitting again.", CacheWarning, stacklevel=2)
        return None
    if entry is None:
        return None
    attrs = entry.attrs
    return _Fit(entry.stats, attrs.get("num_samples"), cached=True, skipped=int(attrs.get("skipped", 0)),
                subset=_subset_from_attrs(attrs))


def _run_fit(dataset: Dataset, args: argparse.Namespace) -> _Fit:
    """The pass; with --skip-bad, an unreadable file makes it check every file and fit the readable ones."""
    indices = subset_indices(len(dataset), args.max_samples, args.seed or 0) if args.max_samples else None
    try:
        return _pass(dataset, indices, args)
    except Exception as error:
        message = unreadable_file_message(error)
        if message is None:
            raise
        if not args.skip_bad:
            raise CliError(
                f"{message.rstrip('.')}. Fix or remove the file, or pass --skip-bad to skip unreadable files."
            ) from None
    _note("found an unreadable file; checking each file of the pass (--skip-bad)")
    bad = find_unreadable(dataset, indices, num_workers=_workers(args), progress=_progress(args))
    for _, message in bad:
        warnings.warn(f"skipped: {message}", UserWarning, stacklevel=2)
    unreadable = {index for index, _ in bad}
    good = [i for i in (indices if indices is not None else range(len(dataset))) if i not in unreadable]
    if not good:
        raise CliError(f"None of the {len(unreadable)} image files could be read.")
    fit = _pass(dataset, good, args)
    fit.skipped = len(bad)
    fit.skipped_files = [dataset.path(index) for index, _ in bad]
    return fit


def _workers(args: argparse.Namespace) -> int:
    return default_num_workers() if args.workers is None else args.workers


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _pass(dataset: Dataset, indices: list[int] | None, args: argparse.Namespace) -> _Fit:
    options = {"batch_size": args.batch_size, "num_workers": _workers(args), "progress": _progress(args)}
    if args.max_samples is None:
        stats, num_samples = fit_stats(dataset, indices=indices, **options)
        return _Fit(stats, num_samples, cached=False, indices=indices)
    stats, num_samples, errors = fit_indices(dataset, indices, population=len(dataset), **options)
    subset = {
        "max_samples": args.max_samples,
        "seed": args.seed or 0,
        "population": len(dataset),
        "mean_se": _floats(errors.mean),
        "std_se": _floats(errors.std),
    }
    return _Fit(stats, num_samples, cached=False, subset=subset, indices=indices)


def _save_fit(path: Path, key: str, fit: _Fit, dataset: Dataset, source: str, names: list[str] | None) -> bool:
    attrs = _provenance(dataset, source, names, fit)
    try:
        write_entry(path, key, fit.stats, attrs)
    except (OSError, CacheError) as error:
        warnings.warn(f"The statistics were fitted but not saved to the cache {path}: {error}", CacheWarning)
        return False
    return True


def _provenance(dataset: Dataset, source: str, names: list[str] | None, fit: _Fit) -> dict[str, Any]:
    """The entry's attributes: the core's provenance, plus what the command line adds."""
    scalars = {k: v for k, v in describe_dataset(dataset).items() if v is None or isinstance(v, (str, int, float))}
    attrs: dict[str, Any] = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "torchnormfit_version": __version__,
        "dataset": json.dumps(scalars, sort_keys=True, default=str),
        "pipeline": describe_pipeline(dataset, None),
        "num_samples": fit.num_samples,
        "ddof": 0,
        "source": source,
        "created_by": f"{PROG} fit",
        "skipped": fit.skipped,
    }
    if names is not None:
        attrs["channel_names"] = json.dumps(names)
    if fit.subset is not None:
        attrs.update({k: fit.subset[k] for k in ("max_samples", "seed", "population")})
        for name in ("mean_se", "std_se"):
            attrs[name] = np.array([math.nan if v is None else v for v in fit.subset[name]], dtype=np.float64)
    return attrs


def _subset_from_attrs(attrs: dict[str, Any]) -> dict[str, Any] | None:
    if "max_samples" not in attrs:
        return None
    subset = {k: attrs.get(k) for k in ("max_samples", "seed", "population")}
    for name in ("mean_se", "std_se"):
        subset[name] = [None if v is None or math.isnan(v) else float(v) for v in np.atleast_1d(attrs[name]).tolist()]
    return subset


# --- reports -----------------------------------------------------------------------------------


def _floats(values: Tensor | Sequence[float]) -> list[float | None]:
    """Plain floats for JSON; NaN becomes null."""
    items = values.tolist() if isinstance(values, Tensor) else list(values)
    return [None if math.isnan(v) else float(v) for v in items]


def _normalize_params(stats: ChannelStats) -> tuple[list[float], list[float]]:
    """Normalize's mean/std: a constant channel gets std 1.0, as FitNormalize does (with a warning)."""
    std = stats.std.clone()
    constant = stats.constant_channels()
    if bool(constant.any()):
        warnings.warn(
            f"Channel(s) {constant.nonzero().flatten().tolist()} have (near) zero variance: their std is set to 1.0 "
            "in the Normalize line, so it only subtracts their mean (FitNormalize's policy).",
            UserWarning,
        )
        std[constant] = 1.0
    return stats.mean.tolist(), std.tolist()


def _g(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.8g}"


def _se(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"± {value:.2g}"


def _normalize_line(mean: Sequence[float], std: Sequence[float]) -> str:
    return (f"transforms.Normalize(mean=[{', '.join(map(_g, mean))}], "
            f"std=[{', '.join(map(_g, std))}])")


def _names(names: list[str] | None, channels: int) -> list[str]:
    return names if names is not None and len(names) == channels else [str(c) for c in range(channels)]


def _fit_report(key: str, path: Path, source: str, names: list[str] | None, fit: _Fit, plot: str | None) -> dict:
    stats = fit.stats
    mean, std = _normalize_params(stats)
    return {
        "key": key,
        "cache": str(path),
        "cached": fit.cached,
        "saved": fit.saved,
        "source": source,
        "channels": _names(names, stats.num_channels),
        "mean": _floats(stats.mean),
        "std": _floats(stats.std),
        "min": _floats(stats.min),
        "max": _floats(stats.max),
        "pixels_per_channel": int(stats.count[0]),
        "num_samples": fit.num_samples,
        "skipped": fit.skipped,
        "skipped_files": fit.skipped_files,
        "subset": fit.subset,
        "normalize": _normalize_line(mean, std),
        "plot": plot,
    }


def _stats_table(report: dict[str, Any]) -> list[str]:
    subset = report.get("subset")
    se = ["(se)"] if subset else []
    header = ["channel", "mean", *se, "std", *se, "min", "max"]
    rows = [header]
    for c, name in enumerate(report["channels"]):
        row = [name, _g(report["mean"][c])]
        row += [_se(subset["mean_se"][c])] if subset else []
        row += [_g(report["std"][c])]
        row += [_se(subset["std_se"][c])] if subset else []
        rows.append(row + [_g(report["min"][c]), _g(report["max"][c])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]


def _format_fit(report: dict[str, Any]) -> str:
    images = f"images: {_count(report['num_samples'])}"
    subset = report["subset"]
    if subset:
        images += f", a uniform random subset of {subset['population']:,} (--max-samples, seed {subset['seed']})"
    if report["skipped"]:
        images += f"; {report['skipped']} unreadable file(s) skipped"
    lines = [f"source: {report['source']}", images, f"pixels per channel: {report['pixels_per_channel']:,}"]
    lines += ["", *_stats_table(report)]
    if subset:
        lines.append("(± se: standard error of the subset's value against the full pass)")
    lines += ["", report["normalize"], ""]
    state = "loaded from the cache; --refit fits again" if report["cached"] else (
        "fitted and saved" if report["saved"] else "fitted, NOT saved")
    lines.append(f"cache: {report['cache']} key {report['key']} ({state})")
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


# --- ls, show, export, rm ----------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace) -> int:
    path = _cache_path(args.cache_file or args.cache)
    entries = list_entries(path)
    rows = [_entry_summary(entry) for entry in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no entries in {path}" + ("" if path.exists() else " (the file does not exist)"))
    else:
        print(_format_ls(path, rows))
    return EXIT_OK


def _entry_summary(entry: CacheEntry) -> dict[str, Any]:
    attrs = entry.attrs
    return {
        "key": entry.key,
        "channels": entry.stats.num_channels,
        "num_samples": attrs.get("num_samples"),
        "pixels_per_channel": int(entry.stats.count[0]),
        "created_utc": attrs.get("created_utc"),
        "dataset": _entry_source(attrs),
        "mean": _floats(entry.stats.mean),
        "std": _floats(entry.stats.std),
    }


def _entry_source(attrs: dict[str, Any]) -> str:
    """A one-line description of the fitted dataset, from the entry's attributes."""
    if attrs.get("source"):
        return str(attrs["source"])
    try:
        described = json.loads(attrs.get("dataset") or "{}")
    except (TypeError, ValueError):
        return str(attrs.get("dataset", ""))
    if not isinstance(described, dict):
        return str(described)
    parts = [str(described.get("class", "?")).rsplit(".", 1)[-1], described.get("root")]
    if described.get("length") is not None:
        parts.append(f"({described['length']} samples)")
    return " ".join(str(p) for p in parts if p)


def _format_ls(path: Path, rows: list[dict[str, Any]]) -> str:
    table = [["KEY", "CH", "IMAGES", "PIXELS/CH", "CREATED (UTC)", "DATASET"]]
    for row in rows:
        created = (row["created_utc"] or "?")[:16].replace("T", " ")
        table.append([row["key"], str(row["channels"]), _count(row["num_samples"]),
                      f"{row['pixels_per_channel']:,}", created, row["dataset"]])
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = [f"{path}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}"]
    for r in table:
        cells = [r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in (1, 2, 3)), r[4].ljust(widths[4]), r[5]]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _read(path: Path, key: str) -> CacheEntry:
    """The cache entry ``key``, or a CliError that lists the keys there are."""
    if not path.exists():
        raise CliError(f"There is no cache file at {path}. Run '{PROG} fit' first, or pass --cache FILE.")
    entry = read_entry(path, key)
    if entry is None:
        known = [e.key for e in list_entries(path)]
        raise CliError(f"No entry {key!r} in {path}. Entries there: {known or 'none'} (see '{PROG} ls').")
    return entry


def _cmd_show(args: argparse.Namespace) -> int:
    if args.plot is not None:
        _require_matplotlib()
        _check_output(args.plot)
    path = _cache_path(args.cache)
    entry = _read(path, args.key)
    stats, attrs = entry.stats, entry.attrs
    names = _names(_stored_names(attrs), stats.num_channels)
    mean, std = _normalize_params(stats)
    report = {
        "key": entry.key,
        "cache": str(path),
        "channels": names,
        "count": _floats(stats.count),
        "mean": _floats(stats.mean),
        "std": _floats(stats.std),
        "var": _floats(stats.var),
        "min": _floats(stats.min),
        "max": _floats(stats.max),
        "subset": _subset_from_attrs(attrs),
        "normalize": _normalize_line(mean, std),
        "attrs": {k: _jsonable(v) for k, v in attrs.items() if k not in _HIDDEN_ATTRS},
        "plot": None,
    }
    if args.plot is not None:
        _plot_normal(args.plot, stats, names, f"{entry.key}: {_entry_source(attrs)}")
        report["plot"] = str(args.plot)
    print(json.dumps(report, indent=2) if args.json else _format_show(report))
    return EXIT_OK


def _stored_names(attrs: dict[str, Any]) -> list[str] | None:
    try:
        names = json.loads(attrs.get("channel_names") or "null")
    except (TypeError, ValueError):
        return None
    return names if isinstance(names, list) else None


def _jsonable(value: Any) -> Any:
    """Attribute values as strict JSON: NaN becomes null, anything unusual its str()."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _format_show(report: dict[str, Any]) -> str:
    count = report["count"][0]
    attrs = report["attrs"]
    lines = [
        f"key: {report['key']}",
        f"cache: {report['cache']}",
        f"images: {_count(attrs.get('num_samples'))}   pixels per channel: {int(count):,}   "
        f"channels: {len(report['channels'])}",
        "",
        *_stats_table(report),
        "",
        report["normalize"],
        "",
        "provenance:",
    ]
    width = max(len(name) for name in attrs) if attrs else 0
    for name in sorted(attrs):
        text = str(attrs[name]).replace("\n", "\n  " + " " * (width + 2))
        lines.append(f"  {name.ljust(width)}  {text}")
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _cmd_export(args: argparse.Namespace) -> int:
    entry = _read(_cache_path(args.cache), args.key)
    mean, std = _normalize_params(entry.stats)
    if args.format == "normalize":
        print(_normalize_line(mean, std))
    elif args.format == "json":
        print(json.dumps({"key": entry.key, "mean": mean, "std": std}, indent=2))
    else:
        print(json.dumps({"image_mean": mean, "image_std": std}, indent=2))
    return EXIT_OK


def _cmd_rm(args: argparse.Namespace) -> int:
    path = _cache_path(args.cache)
    for key in args.keys:  # all present, or nothing is removed
        _read(path, key)
    for key in dict.fromkeys(args.keys):
        delete_entry(path, key)
    removed = list(dict.fromkeys(args.keys))
    if args.json:
        print(json.dumps({"cache": str(path), "removed": removed}))
    else:
        print("\n".join(f"removed {key} from {path}" for key in removed))
    return EXIT_OK


# --- plots -------------------------------------------------------------------------------------


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


def _check_output(path: Path) -> None:
    folder = path.expanduser().resolve().parent
    if not folder.is_dir():
        raise CliError(f"Cannot write the plot {path}: the folder {folder} does not exist.")


def _plot_pixels(path: Path, pixels: Tensor, stats: ChannelStats, names: list[str] | None, title: str) -> None:
    """Histograms of sampled pixels per channel, before and after normalization, side by side."""
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None] for v in _normalize_params(stats))
    after = (pixels.double() - mean) / std
    figure, (left, right) = _figure(title)
    for c, name in enumerate(_names(names, stats.num_channels)):
        color = _COLORS.get(name)
        left.hist(pixels[c].numpy(), bins=64, histtype="step", density=True, color=color,
                  label=f"{name}: mean {float(mean[c]):.4g}, std {float(std[c]):.4g}")
        right.hist(after[c].numpy(), bins=64, histtype="step", density=True, color=color, label=name)
    _finish(figure, left, right, path)


def _plot_normal(path: Path, stats: ChannelStats, names: list[str], title: str) -> None:
    """The normal approximation of each channel from its cached mean/std, within its [min, max]."""
    figure, (left, right) = _figure(f"{title}\nnormal approximation from mean/std (the cache keeps no pixels)")
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in _normalize_params(stats))
    for c, name in enumerate(names):
        color = _COLORS.get(name)
        x = torch.linspace(float(stats.min[c]), float(stats.max[c]), 256, dtype=torch.float64)
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
