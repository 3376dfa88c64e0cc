"""The ``torchnormfit`` command line: fit an image folder, WebDataset shards or a torchvision dataset; see the cache.

::

    torchnormfit fit SOURCE | SHARDS | --dataset NAME --root DIR [--split SPLIT]   [options]
    torchnormfit ls [CACHE]
    torchnormfit show KEY
    torchnormfit export KEY --format normalize|json|hf
    torchnormfit rm [KEY ...] [--older-than DURATION] [--keep-last N]

Results go to stdout (``--json`` for machine-readable output), messages to
stderr. Exit codes: 0 success, 1 the job failed, 2 usage error (argparse's
convention). ``fit`` is :meth:`FitNormalize.fit`, ``show`` and ``export`` are
:meth:`FitNormalize.from_cache`: the command line prints what the library
computes and caches. This module is the only place that prints.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.ImageMode
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from . import __version__
from .cache import (
    CacheEntry,
    CacheError,
    default_cache_path,
    delete_entries,
    entry_folder,
    list_entries,
    prune_entries,
    read_entry,
)
from .fingerprint import describe_dataset, describe_pipeline
from .folder import MODES, ImageFiles, find_unreadable, to_float_pipeline, unreadable_file_message
from .passes import StandardErrors, default_num_workers, sample_pixels
from .transform import FitNormalize

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILURE = 0, 1  # usage errors exit 2, through argparse
PROG = "torchnormfit"
PLOT_EXTRA = "pip install 'torchnormfit[plot]'"
_COLORS = {"R": "tab:red", "G": "tab:green", "B": "tab:blue", "L": "0.3"}
_HIDDEN_ATTRS = {"format", "schema_version", "key"}
_CONVERT_MODE = re.compile(r"ConvertMode\(mode='(\w+)'\)")  # folder.ConvertMode's repr in a cached pipeline
_SHOWN_CHARS = 300
_IMAGE_ENTRIES = "jpg;jpeg;png;webp;bmp;tif;tiff;ppm;pgm"  # the image entries of a WebDataset sample, first found


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
    args = build_parser().parse_args(argv)
    if args.command == "fit":
        _check_fit_usage(args)
    if args.command == "rm" and not args.keys and args.older_than is None and args.keep_last is None:
        args.usage_error("give the KEY(s) to remove, or prune with --older-than DURATION and/or --keep-last N")
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


def _integer(minimum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer, at least ``minimum`` if given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """An argparse ``type``: a duration such as 90s, 15m, 12h, 30d or 2w, in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a number and a unit (s, m, h, d or w), such as 30d; got {text!r}")
    return float(match[1]) * _UNITS_S[match[2]]


def _add_fit(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    fit = commands.add_parser(
        "fit", parents=parents, help="fit mean/std on an image folder or a torchvision dataset",
        description="Fit the exact per-channel mean and std (population, ddof=0) of every pixel, "
        "cache them, and print them with a ready-to-paste transforms.Normalize line.",
    )
    fit.set_defaults(run=_cmd_fit, usage_error=fit.error)
    source = fit.add_argument_group("source (one of)")
    source.add_argument("source", nargs="?", metavar="SOURCE",
                        help="image folder: ImageFolder layout or images at any depth (JPEG, PNG, WebP, BMP, TIFF); "
                        "or WebDataset shards, e.g. 'shards/train-{000000..000099}.tar' (the first image entry of "
                        "each sample is fitted)")
    source.add_argument("--dataset", metavar="NAME",
                        help="a torchvision dataset class, e.g. CIFAR10 (never downloaded)")
    source.add_argument("--root", metavar="DIR", help="the torchvision dataset's root folder")
    source.add_argument("--split", metavar="SPLIT", help="the torchvision dataset's split (default: train)")
    pipeline = fit.add_argument_group("pipeline")
    pipeline.add_argument("--mode", choices=MODES, metavar="MODE",
                          help=f"convert images to this PIL mode, one of {', '.join(MODES)} "
                          "(default: RGB for folders, unchanged for --dataset)")
    pipeline.add_argument("--resize", type=_integer(1), metavar="N", help="Resize(N): smaller edge to N pixels")
    pipeline.add_argument("--center-crop", type=_integer(1), metavar="N", help="CenterCrop(N) after the resize")
    run = fit.add_argument_group("run")
    run.add_argument("--batch-size", type=_integer(1), metavar="N",
                     help="images per batch (default: 64 MiB of images, 1 to 256, at least 16 batches per worker); "
                          "never changes the result")
    run.add_argument("--workers", type=_integer(0), metavar="N",
                     help="DataLoader worker processes (default: usable CPUs, at most 8)")
    run.add_argument("--key", help="cache entry name; an entry of that name is used as it is (default: a fingerprint "
                     "of the file list with each file's size and modification time, the pipeline and the options)")
    run.add_argument("--verify", type=_integer(0), metavar="N",
                     help="on a cache hit, read N of the fitted images again and refit if they no longer match "
                          "(default 64 with a fingerprint key, 0 with --key)")
    run.add_argument("--refit", action="store_true", help="fit again even if the cache has the entry")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    run.add_argument("--skip-bad", action="store_true",
                     help="skip unreadable or truncated image files and report how many (folders only)")
    run.add_argument("--max-samples", type=_integer(1), metavar="N",
                     help="fit on a uniform random subset of N images and report standard errors")
    run.add_argument("--seed", type=_integer(), metavar="S", help="seed of the --max-samples subset (default 0)")
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
    rm = commands.add_parser(
        "rm", parents=parents, help="remove entries from the cache, by key or by age",
        description="Remove the KEYs (all of them, or none if one is missing), then prune: every entry that "
        "--older-than or --keep-last does not keep is removed. An entry's age is its created_utc.",
    )
    rm.add_argument("keys", nargs="*", metavar="KEY")
    rm.add_argument("--older-than", type=_duration, metavar="DURATION",
                    help="remove entries created longer ago than this: a number and s, m, h, d or w (e.g. 30d)")
    rm.add_argument("--keep-last", type=_integer(0), metavar="N", help="keep only the N newest entries")
    rm.set_defaults(run=_cmd_rm, usage_error=rm.error)


def _check_fit_usage(args: argparse.Namespace) -> None:
    """Rules between options; a violation is a usage error (exit 2, with the 'fit' usage line)."""
    fail = args.usage_error
    if (args.source is None) == (args.dataset is None):
        fail("give an image folder (SOURCE) or --dataset NAME --root DIR, not both and not neither")
    if args.dataset is None and (args.root is not None or args.split is not None):
        fail("--root and --split go with --dataset")
    if args.dataset is not None and args.skip_bad:
        fail("--skip-bad applies to image folders (SOURCE), not to --dataset")
    if args.source is not None and _is_shards(args.source) and (args.skip_bad or args.plot is not None):
        fail("--skip-bad and --plot apply to image folders and --dataset, not to WebDataset shards")
    if args.source is not None and _is_shards(args.source) and args.seed is not None:
        fail("--seed does not apply to WebDataset shards: --max-samples N fits the first N samples of the stream")
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


def _cmd_fit(args: argparse.Namespace) -> int:
    if args.plot is not None:
        _check_plot(args.plot)
    path = _cache_path(args.cache)
    norm = FitNormalize(cache=path, key=args.key)
    dataset, skipped = _fit(norm, _open_source(args), args)
    record = norm.fit_record
    cached, saved = record.source == "cache", record.written
    stream = isinstance(dataset, IterableDataset)
    described = describe_dataset(dataset)
    names = _channel_names({"mode": args.mode or "RGB"} if stream else described, describe_pipeline(dataset, norm),
                           len(norm.mean))
    settings = {"max_samples": args.max_samples, "seed": args.seed or 0, "population": None if stream else len(dataset)}
    report = {
        "key": norm.cache_key, "cache": str(path), "cached": cached, "saved": saved,
        "source": f"WebDataset shards {args.source}" if stream else _summary(described),
        "verified": _verified(record.verification), "note": record.note,
        **_numbers(norm, names, _subset(settings, norm.standard_errors)),
        "first_of_stream": stream and args.max_samples is not None,
        "skipped": len(skipped), "skipped_files": skipped, "plot": None,
    }
    if args.plot is not None:
        pixels = sample_pixels(dataset, seed=args.seed or 0)
        _plot_pixels(args.plot, pixels, norm, names, f"{report['source']}\n{pixels.shape[1]:,} pixels sampled")
        report["plot"] = str(args.plot)
    print(json.dumps(report, indent=2) if args.json else _format_fit(report))
    return EXIT_OK


def _open_source(args: argparse.Namespace) -> Dataset:
    """The dataset to fit: the image folder, the shards or the torchvision dataset, with the options' pipeline."""
    if args.source is not None and _is_shards(args.source):
        return _open_shards(args)
    if args.source is not None:
        pipeline = to_float_pipeline(resize=args.resize, center_crop=args.center_crop)
        try:
            return ImageFiles(args.source, mode=args.mode or "RGB", transform=pipeline)
        except FileNotFoundError as error:
            raise CliError(str(error)) from None
    cls, kwargs = args.dataset_class, dict(args.dataset_kwargs)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        return cls(**kwargs, transform=to_float_pipeline(args.mode, args.resize, args.center_crop))
    except Exception as error:
        raise CliError(
            f"Could not open torchvision.datasets.{cls.__name__}({shown}): "
            f"{type(error).__name__}: {str(error).rstrip('.')}. "
            f"torchnormfit never downloads: fetch the files once in Python with "
            f"torchvision.datasets.{cls.__name__}({kwargs.get('root', '...')!r}, download=True), "
            "or point --root at the folder that already holds them."
        ) from None


def _is_shards(source: str) -> bool:
    """A WebDataset shard or shard pattern: a name ending in .tar or .tgz (braces allowed)."""
    return re.search(r"\.(tar|tgz|tar\.gz)$", source) is not None


def _open_shards(args: argparse.Namespace) -> Dataset:
    """The shards as a WebDataset: the first image entry of each sample, decoded to float in [0, 1].

    Also caps ``--workers`` at the number of shards: a worker without a shard would only idle.
    """
    try:
        import webdataset as wds
    except ImportError:
        raise CliError("Fitting WebDataset shards needs the webdataset package: pip install webdataset.") from None
    urls = wds.shardlists.expand_urls(args.source)
    missing = [url for url in urls if "://" not in url and ":" not in url.split("/")[0] and not os.path.isfile(url)]
    if missing:
        raise CliError(f"{len(missing)} of the {len(urls)} shards of {args.source!r} do not exist, "
                       f"for example {missing[0]}. Check the path and the {{first..last}} range.")
    args.workers = min(len(urls), args.workers if args.workers is not None else default_num_workers())
    pipeline = to_float_pipeline(args.mode or "RGB", args.resize, args.center_crop)
    return (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
            .to_tuple(_IMAGE_ENTRIES).map_tuple(pipeline))


def _fit(norm: FitNormalize, dataset: Dataset, args: argparse.Namespace) -> tuple[Dataset, list[str]]:
    """``norm.fit(dataset)``; with --skip-bad, an unreadable file makes it fit the readable files instead.

    Returns the dataset fitted and the paths of the files skipped.
    """
    loader = {"batch_size": args.batch_size, "num_workers": args.workers,
              "progress": False if args.no_progress else None}
    fit_options = {**loader, "refit": args.refit, "verify": args.verify, "max_samples": args.max_samples,
                   "seed": args.seed or 0}
    try:
        norm.fit(dataset, **fit_options)
        return dataset, []
    except Exception as error:
        message = unreadable_file_message(error)
        if message is None:
            raise
        if not args.skip_bad:
            raise CliError(
                f"{message.rstrip('.')}. Fix or remove the file, or pass --skip-bad to skip unreadable files."
            ) from None
    print(f"{PROG}: found an unreadable file; checking every file (--skip-bad)", file=sys.stderr)
    bad = find_unreadable(dataset, **loader)
    for _, message in bad:
        warnings.warn(f"skipped: {message}", UserWarning)
    if len(bad) == len(dataset):
        raise CliError(f"None of the {len(dataset)} image files could be read.")
    readable = dataset.without(index for index, _ in bad)
    norm.fit(readable, **fit_options)
    return readable, [dataset.path(index) for index, _ in bad]


def _cache_path(cache: Path | None) -> Path:
    return cache.expanduser() if cache is not None else default_cache_path()


def _verified(verification: Any) -> dict[str, Any] | None:
    if verification is None:
        return None
    return {"samples": verification.samples, "passed": verification.passed, "detail": verification.detail}


def _format_fit(report: dict[str, Any]) -> str:
    images = f"images: {report['num_samples']:,}"
    subset = report["subset"]
    if subset:
        images += f", a uniform random subset of {subset['population']:,} (--max-samples, seed {subset['seed']})"
    if report["first_of_stream"]:
        images += ", the first of the stream (--max-samples; no standard errors)"
    if report["skipped"]:
        images += f"; {report['skipped']} unreadable file(s) skipped"
    lines = [f"source: {report['source']}", images, f"pixels per channel: {report['pixels_per_channel']:,}"]
    state = "loaded from the cache; --refit fits again" if report["cached"] else (
        "fitted and saved" if report["saved"] else "fitted, NOT saved")
    verified = report["verified"]
    if verified is not None:
        state += f"; {verified['samples']} images checked against it: {'match' if verified['passed'] else 'MISMATCH'}"
    elif report["cached"] and report["note"]:
        state += f"; {report['note']}"
    lines += [*_numbers_lines(report), "", f"cache: {report['cache']} key {report['key']} ({state})"]
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


# --- numbers shared by fit and show ------------------------------------------------------------


def _numbers(norm: FitNormalize, names: list[str], subset: dict[str, Any] | None) -> dict[str, Any]:
    """The statistics of a fitted FitNormalize (raw ``stats``; the Normalize line with its policy applied)."""
    stats = norm.stats
    return {
        "channels": names,
        "mean": _floats(stats.mean),
        "std": _floats(stats.std),
        "min": _floats(stats.min),
        "max": _floats(stats.max),
        "pixels_per_channel": int(stats.count[0]),
        "num_samples": norm.num_samples,
        "subset": subset,
        "normalize": _normalize_line(norm.mean, norm.std),
    }


def _subset(settings: Mapping[str, Any], errors: StandardErrors | None) -> dict[str, Any] | None:
    """The --max-samples settings (max_samples, seed, population) and standard errors; None for a full pass."""
    if settings.get("max_samples") is None or errors is None:
        return None
    return {**{name: settings.get(name) for name in ("max_samples", "seed", "population")},
            "mean_se": _floats(errors.mean), "std_se": _floats(errors.std)}


def _described(attrs: Mapping[str, Any]) -> Any:
    """The cached ``dataset`` attribute: a describe_dataset() dict, or its text if it is not JSON."""
    try:
        return json.loads(attrs.get("dataset") or "{}")
    except (TypeError, ValueError):
        return str(attrs.get("dataset"))


def _summary(described: Any) -> str:
    """One line for a describe_dataset() dict: class, root, number of samples and simple settings."""
    if not isinstance(described, dict):
        return str(described)
    name = str(described.get("class", "?")).rsplit(".", 1)[-1]
    settings = [f"{k}={v}" for k, v in sorted(described.items())
                if k not in ("class", "root", "length") and isinstance(v, (str, int, float))]
    counted = f"{described.get('length', '?')} samples"
    return " ".join(str(p) for p in (name, described.get("root")) if p) + f" ({', '.join([counted, *settings])})"


def _channel_names(described: Any, pipeline: str, channels: int) -> list[str]:
    """The bands of the PIL mode the images were converted to (a ConvertMode, or ImageFiles' mode), else numbers."""
    converted = _CONVERT_MODE.search(pipeline or "")
    for mode in (converted and converted.group(1), isinstance(described, dict) and described.get("mode")):
        bands = list(PIL.ImageMode.getmode(mode).bands) if mode in MODES else []
        if len(bands) == channels:
            return bands
    return [str(c) for c in range(channels)]


def _floats(values: Tensor | Sequence[float]) -> list[float | None]:
    """Plain floats for JSON; NaN becomes null."""
    items = values.tolist() if isinstance(values, Tensor) else list(values)
    return [None if math.isnan(v) else float(v) for v in items]


def _g(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.8g}"


def _se(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"± {value:.2g}"


def _normalize_line(mean: Sequence[float], std: Sequence[float]) -> str:
    return f"transforms.Normalize(mean=[{', '.join(map(_g, mean))}], std=[{', '.join(map(_g, std))}])"


def _numbers_lines(report: dict[str, Any]) -> list[str]:
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
    return ["", *_table(rows), *note, "", report["normalize"]]


def _table(rows: list[list[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Rows of cells as aligned lines: the columns in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


# --- ls, show, export, rm ----------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace) -> int:
    path = _cache_path(args.cache_file or args.cache)
    rows = [_entry_row(entry) for entry in list_entries(path)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        there = path.exists() or entry_folder(path).exists()
        print(f"no entries in {path}" + ("" if there else " (the cache does not exist)"))
    else:
        print(_format_ls(path, rows))
    return EXIT_OK


def _entry_row(entry: CacheEntry) -> dict[str, Any]:
    return {
        "key": entry.key,
        "channels": entry.stats.num_channels,
        "num_samples": entry.attrs.get("num_samples"),
        "pixels_per_channel": int(entry.stats.count[0]),
        "created_utc": entry.attrs.get("created_utc"),
        "dataset": _summary(_described(entry.attrs)),
        "mean": _floats(entry.stats.mean),
        "std": _floats(entry.stats.std),
    }


def _format_ls(path: Path, rows: list[dict[str, Any]]) -> str:
    table = [["KEY", "CH", "IMAGES", "PIXELS/CH", "CREATED (UTC)", "DATASET"]]
    for row in rows:
        images = "?" if row["num_samples"] is None else f"{row['num_samples']:,}"
        created = (row["created_utc"] or "?")[:16].replace("T", " ")
        table.append([row["key"], str(row["channels"]), images, f"{row['pixels_per_channel']:,}", created,
                      row["dataset"]])
    return "\n".join([f"{path}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}", *_table(table, left=(0, 4, 5))])


def _read(path: Path, key: str) -> CacheEntry:
    """The cache entry ``key``, or a CliError that lists the keys there are."""
    if not path.exists() and not entry_folder(path).exists():
        raise CliError(f"There is no cache at {path}. Run '{PROG} fit' first, or pass --cache FILE.")
    entry = read_entry(path, key)
    if entry is None:
        known = [e.key for e in list_entries(path)]
        raise CliError(f"No entry {key!r} in {path}. Entries there: {known or 'none'} (see '{PROG} ls').")
    return entry


def _load(path: Path, key: str) -> tuple[FitNormalize, dict[str, Any]]:
    """The entry ``key`` as a FitNormalize (its Normalize mean/std), and the entry's attributes."""
    attrs = _read(path, key).attrs
    return FitNormalize.from_cache(path, key), attrs


def _cmd_show(args: argparse.Namespace) -> int:
    if args.plot is not None:
        _check_plot(args.plot)
    path = _cache_path(args.cache)
    norm, attrs = _load(path, args.key)
    described = _described(attrs)
    names = _channel_names(described, attrs.get("pipeline", ""), len(norm.mean))
    report = {
        "key": args.key,
        "cache": str(path),
        **_numbers(norm, names, _subset(attrs, norm.standard_errors)),
        "count": _floats(norm.stats.count),
        "var": _floats(norm.stats.var),
        "attrs": {k: _jsonable(v) for k, v in attrs.items() if k not in _HIDDEN_ATTRS},
        "plot": None,
    }
    if args.plot is not None:
        _plot_normal(args.plot, norm, names, f"{args.key}: {_summary(described)}")
        report["plot"] = str(args.plot)
    print(json.dumps(report, indent=2) if args.json else _format_show(report))
    return EXIT_OK


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
    attrs = report["attrs"]
    lines = [
        f"key: {report['key']}",
        f"cache: {report['cache']}",
        f"images: {report['num_samples']:,}   pixels per channel: {report['pixels_per_channel']:,}   "
        f"channels: {len(report['channels'])}",
        *_numbers_lines(report),
        "",
        "provenance:",
    ]
    width = max(map(len, attrs), default=0)
    for name in sorted(attrs):
        text = str(attrs[name])
        if len(text) > _SHOWN_CHARS:
            text = f"{text[:_SHOWN_CHARS]}... ({len(text):,} characters; --json shows them all)"
        lines.append(f"  {name.ljust(width)}  " + text.replace("\n", "\n  " + " " * (width + 2)))
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def _cmd_export(args: argparse.Namespace) -> int:
    norm, _ = _load(_cache_path(args.cache), args.key)
    if args.format == "normalize":
        print(_normalize_line(norm.mean, norm.std))
    elif args.format == "json":
        print(json.dumps({"key": args.key, "mean": norm.mean, "std": norm.std}, indent=2))
    else:
        print(json.dumps({"image_mean": norm.mean, "image_std": norm.std}, indent=2))
    return EXIT_OK


def _cmd_rm(args: argparse.Namespace) -> int:
    path = _cache_path(args.cache)
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


def _check_plot(path: Path) -> None:
    """Fail before any work if the plot cannot be made: no matplotlib, or no folder for the file."""
    _require_matplotlib()
    folder = path.expanduser().resolve().parent
    if not folder.is_dir():
        raise CliError(f"Cannot write the plot {path}: the folder {folder} does not exist.")


def _plot_pixels(path: Path, pixels: Tensor, norm: FitNormalize, names: list[str], title: str) -> None:
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


def _plot_normal(path: Path, norm: FitNormalize, names: list[str], title: str) -> None:
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
