"""``torchnormfit fit``: an image folder, WebDataset shards or a torchvision dataset, fitted with FitNormalize."""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import os
import re
import sys
import warnings
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset
from torchvision.datasets.vision import StandardTransform
from torchvision.transforms import v2

from ..key import describe_dataset, describe_pipeline
from ..passes import SampleMismatch, sample_pixels
from ..transform import FitNormalize
from . import EXIT_FAILURE, EXIT_OK, PROG, CliError
from .entries import cache_path
from .folder import (
    TIFF_EXTRA,
    ImageFiles,
    find_unreadable,
    to_float_pipeline,
    unreadable_file_message,
)
from .plots import check_plot, plot_pixels
from .report import channel_names, numbers, numbers_lines, subset, summary

__all__ = ["check_usage", "run_fit"]

_IMAGE_ENTRIES = "jpg;jpeg;png;webp;bmp;tif;tiff;ppm;pgm"  # the image entries of a WebDataset sample, first found
_MISMATCH_FIX = {
    "channels": "The files of a folder must have the same number of channels (bands, samples a pixel or pages): "
                "move the files with another number of channels out, and fit them as a folder of their own.",
    "units": "The files of a folder must all be read as integers, or all as floats: move the files of the other "
             "kind out, and fit them as a folder of their own.",
}


def check_usage(args: argparse.Namespace) -> None:
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
    if args.exact_percentiles != "auto" and args.clip is None:
        fail("--exact-percentiles is about the --clip percentiles: give --clip LOW,HIGH too")
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


def run_fit(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_plot(args.plot)
    path = cache_path(args.cache)
    ignore = args.ignore[0] if args.ignore is not None and len(args.ignore) == 1 else args.ignore
    norm = FitNormalize(cache=path, key=args.key, ignore=ignore, clip=None if args.clip is None else tuple(args.clip),
                        exact_percentiles={"auto": None, "yes": True, "no": False}[args.exact_percentiles],
                        spatial_dims=args.spatial_dims)
    dataset, skipped = _fit(norm, _open_source(args, norm), args)
    record = norm.fit_record
    assert record is not None and norm.mean is not None and norm.std is not None  # fit() sets them or raises
    cached, saved = record.source == "cache", record.written
    stream = isinstance(dataset, IterableDataset)
    described = describe_dataset(dataset)
    names = channel_names({"mode": args.mode or "RGB"} if stream else described, describe_pipeline(dataset, norm),
                           len(norm.mean))
    settings = {"max_samples": args.max_samples, "seed": args.seed or 0, "population": None if stream else len(dataset)}
    report = {
        "key": norm.cache_key, "cache": str(path), "cached": cached, "saved": saved,
        "source": f"WebDataset shards {args.source}" if stream else summary(described),
        "verified": _verified(record.verification), "note": record.note,
        **numbers(norm, names, subset(settings, norm.standard_errors)),
        "first_of_stream": stream and args.max_samples is not None,
        "skipped": len(skipped), "skipped_files": skipped, "plot": None,
    }
    if args.plot is not None:  # the pipeline ends in the fitted norm: undo it
        mean, std = (torch.tensor(v, dtype=torch.float64)[:, None] for v in (norm.mean, norm.std))
        pixels = sample_pixels(dataset, seed=args.seed or 0).double() * std + mean
        plot_pixels(args.plot, pixels, norm, names, f"{report['source']}\n{pixels.shape[1]:,} pixels sampled")
        report["plot"] = str(args.plot)
    print(json.dumps(report, indent=2) if args.json else _format_fit(report))
    if not cached and not saved:
        print(f"{PROG}: error: the statistics were fitted but not saved to {path} ({record.note}).", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _open_source(args: argparse.Namespace, norm: FitNormalize) -> Dataset:
    """The dataset to fit: the image folder, the shards or the torchvision dataset, with the options' pipeline
    ending in ``norm``, as a user's would (so the entry's provenance names the transforms before it)."""
    if args.source is not None and _is_shards(args.source):
        return _open_shards(args, norm)
    if args.source is not None:
        pipeline = _ending_in(norm, to_float_pipeline(resize=args.resize, center_crop=args.center_crop))
        try:
            folder = ImageFiles(args.source, mode=args.mode or "RGB", transform=pipeline)
        except FileNotFoundError as error:
            raise CliError(str(error)) from None
        if folder.integers:  # 16-bit or TIFF: no scaling to [0, 1]; the values stay in their own units
            _check_tifffile(folder)
            folder.transform = _ending_in(
                norm, to_float_pipeline(resize=args.resize, center_crop=args.center_crop, integers=True))
            folder.transforms = StandardTransform(folder.transform)
        return folder
    cls, kwargs = args.dataset_class, dict(args.dataset_kwargs)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        return cls(**kwargs, transform=_ending_in(norm, to_float_pipeline(args.mode, args.resize, args.center_crop)))
    except Exception as error:
        raise CliError(
            f"Could not open torchvision.datasets.{cls.__name__}({shown}): "
            f"{type(error).__name__}: {str(error).rstrip('.')}. "
            f"torchnormfit never downloads: fetch the files once in Python with "
            f"torchvision.datasets.{cls.__name__}({kwargs.get('root', '...')!r}, download=True), "
            "or point --root at the folder that already holds them."
        ) from None


def _check_tifffile(folder: ImageFiles) -> None:
    """A clear error, before any file is read, when the folder holds TIFF files and tifffile is not installed."""
    tiffs = [name for name, _ in folder.samples if name.lower().endswith((".tif", ".tiff"))]
    if not tiffs:
        return
    try:
        import tifffile  # noqa: F401
    except ImportError:
        raise CliError(f"Reading the TIFF files of {folder.root} ({len(tiffs)}, for example {tiffs[0]}) "
                       f"needs tifffile: {TIFF_EXTRA}") from None


def _ending_in(norm: FitNormalize, pipeline: v2.Compose) -> v2.Compose:
    return v2.Compose([*pipeline.transforms, norm])


def _is_shards(source: str) -> bool:
    """A WebDataset shard or shard pattern: a name ending in .tar or .tgz (braces allowed)."""
    return re.search(r"\.(tar|tgz|tar\.gz)$", source) is not None


def _open_shards(args: argparse.Namespace, norm: FitNormalize) -> Dataset:
    """The shards as a WebDataset: the first image entry of each sample, decoded to float in [0, 1].

    The fit caps ``--workers`` at the number of shards (a worker without a shard would only idle).
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
    pipeline = _ending_in(norm, to_float_pipeline(args.mode or "RGB", args.resize, args.center_crop))
    return (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
            .to_tuple(_IMAGE_ENTRIES).map_tuple(pipeline))


def _fit(norm: FitNormalize, dataset: Any, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """``norm.fit(dataset)``; with --skip-bad, an unreadable file makes it fit the readable files instead.

    Returns the dataset fitted and the paths of the files skipped.
    """
    loader = {"batch_size": args.batch_size, "num_workers": args.workers,
              "progress": False if args.no_progress else None}
    fit_options = {**loader, "refit": args.refit, "verify": args.verify, "max_samples": args.max_samples,
                   "seed": args.seed or 0}
    try:
        _fit_files(norm, dataset, fit_options)
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
        warnings.warn(f"skipped: {message}", UserWarning, stacklevel=2)
    if len(bad) == len(dataset):
        raise CliError(f"None of the {len(dataset)} image files could be read.")
    readable = dataset.without(index for index, _ in bad)
    _fit_files(norm, readable, fit_options)
    return readable, [dataset.path(index) for index, _ in bad]


def _fit_files(norm: FitNormalize, dataset: Any, fit_options: dict[str, Any]) -> None:
    """``norm.fit(dataset)``; two files of an image folder that cannot be fitted together (different numbers of
    channels, integer and float values) are a CliError that names both files (the fit names samples by index)."""
    try:
        norm.fit(dataset, **fit_options)
    except SampleMismatch as error:
        if error.index is None or error.first_index is None or error.kind not in _MISMATCH_FIX \
                or not isinstance(dataset, ImageFiles):
            raise
        what = " channel(s)" if error.kind == "channels" else " values"
        raise CliError(
            f"{dataset.path(error.index)} has {error.got}{what}, but {dataset.path(error.first_index)} has "
            f"{error.expected}{what}. {_MISMATCH_FIX[error.kind]}"
        ) from None


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
    lines += [*numbers_lines(report), "", f"cache: {report['cache']} key {report['key']} ({state})"]
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)
