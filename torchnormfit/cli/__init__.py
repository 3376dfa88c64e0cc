"""The ``torchnormfit`` command line: fit an image folder, WebDataset shards or a torchvision dataset; see the cache.

::

    torchnormfit fit SOURCE | SHARDS | --dataset NAME --root DIR [--split SPLIT]   [options]
    torchnormfit ls [CACHE]
    torchnormfit show KEY
    torchnormfit export KEY [-o FILE.h5 | --format normalize|json|hf]
    torchnormfit rm [KEY ...] [--older-than DURATION] [--keep-last N]

Results go to stdout (``--json`` for machine-readable output), messages to stderr. Exit codes: 0 success,
1 the job failed (a fit whose statistics could not be saved included), 2 usage error (argparse's
convention). ``fit`` is :meth:`FitNormalize.fit`, ``show`` is :meth:`FitNormalize.from_cache`: the command
line prints what the library computes and caches; it is the only place that prints.

This module parses arguments only: torch is imported by the command that needs it (``fit``, ``show``), so
``--help``, ``ls``, ``export`` and ``rm`` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._version import __version__

__all__ = ["EXIT_FAILURE", "EXIT_OK", "MODES", "PLOT_EXTRA", "PROG", "CliError", "build_parser", "main"]

EXIT_OK, EXIT_FAILURE = 0, 1  # usage errors exit 2, through argparse
PROG = "torchnormfit"
PLOT_EXTRA = "pip install 'torchnormfit[plot]'"
MODES = ("RGB", "L", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV")
"""PIL modes images can be converted to: 8 bits a channel, so ``ToDtype(scale=True)`` maps them to [0, 1]."""


class CliError(Exception):
    """The job failed: the message (what happened, and the fix) is printed and the exit code is 1."""


# --- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Examples
    --------
    >>> main(["ls", "--cache", "/tmp/no-cache"])  # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f".{args.module}", __name__)  # fit and show import torch, the others not
    if args.command == "fit":
        module.check_usage(args)
    run = getattr(module, f"run_{args.command}")
    if args.command == "rm" and not args.keys and args.older_than is None and args.keep_last is None:
        args.usage_error("give the KEY(s) to remove, or prune with --older-than DURATION and/or --keep-last N")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return run(args)
        except BrokenPipeError:  # stdout closed early (| head): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILURE
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; nothing was written to the cache.", file=sys.stderr)
            return 130
        except (CliError, OSError, ValueError, TypeError, RuntimeError) as error:  # CacheError is a ValueError
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
        "--cache", type=Path, metavar="DIR",
        help="cache folder (default: $TORCHNORMFIT_CACHE, else $XDG_CACHE_HOME/torchnormfit, else "
        "~/.cache/torchnormfit), or one entry file to read",
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


def _floats(least: int, most: int | None) -> Callable[[str], list[float]]:
    """An argparse ``type``: comma-separated numbers (``nan`` allowed), from ``least`` to ``most`` of them."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
        if len(values) < least or (most is not None and len(values) > most):
            count = f"{least}" if least == most else f"at least {least}"
            raise argparse.ArgumentTypeError(f"expected {count} number(s), got {len(values)} in {text!r}")
        return values

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
    fit.set_defaults(module="fit", usage_error=fit.error)
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
    statistic = fit.add_argument_group("statistic (as FitNormalize's arguments)")
    statistic.add_argument("--ignore", type=_floats(1, None), metavar="V[,V...]",
                           help="nodata: leave pixels of this value out (one value, or one per channel; nan for NaN), "
                           "in the units the pipeline gives (0-1 for image files)")
    statistic.add_argument("--clip", type=_floats(2, 2), metavar="LOW,HIGH",
                           help="learn these percentiles per channel too, e.g. 0.5,99.5 (show prints them)")
    statistic.add_argument("--exact-percentiles", choices=("auto", "yes", "no"), default="auto",
                           help="float images: yes: --clip percentiles exact with a second pass; auto: within 0.1%% "
                           "of the pixels in rank (a second pass where one cannot promise it); no: one pass")
    statistic.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2,
                           help="2 for images (C, H, W), 3 for volumes (C, D, H, W)")
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
    ls.add_argument("cache_file", nargs="?", type=Path, metavar="CACHE", help="cache folder or entry file (as --cache)")
    ls.set_defaults(module="entries")
    show = commands.add_parser("show", parents=parents, help="one entry in full, provenance included")
    show.add_argument("key", metavar="KEY")
    show.add_argument("--plot", type=Path, metavar="FILE.png",
                      help="save the normal approximation of each channel before/after normalization "
                      f"(the cache keeps no pixels; needs matplotlib: {PLOT_EXTRA})")
    show.set_defaults(module="entries")
    export = commands.add_parser(
        "export", parents=[cache], help="write an entry to one file to hand over, or print its mean/std",
        description="With -o, copy the entry to FILE.h5: one self-contained entry file that plain h5py opens, "
        "FitNormalize.from_cache('FILE.h5') loads and cache='FILE.h5' reads. Without it, print mean/std.")
    export.add_argument("key", metavar="KEY")
    export.add_argument("-o", "--output", type=Path, metavar="FILE.h5",
                        help="write the entry file here (a folder: named for the key); an existing file is "
                        "replaced only if it is an entry file")
    export.add_argument("--format", choices=("normalize", "json", "hf"), default="normalize",
                        help="a transforms.Normalize line, a JSON object, or the image_mean/image_std fields "
                        "of a Hugging Face image processor config (default: normalize)")
    export.set_defaults(module="entries")
    rm = commands.add_parser(
        "rm", parents=parents, help="remove entries from the cache, by key or by age",
        description="Remove the KEYs (all of them, or none if one is missing), then prune: every entry that "
        "--older-than or --keep-last does not keep is removed. An entry's age is its created_utc.",
    )
    rm.add_argument("keys", nargs="*", metavar="KEY")
    rm.add_argument("--older-than", type=_duration, metavar="DURATION",
                    help="remove entries created longer ago than this: a number and s, m, h, d or w (e.g. 30d)")
    rm.add_argument("--keep-last", type=_integer(0), metavar="N", help="keep only the N newest entries")
    rm.set_defaults(module="entries", usage_error=rm.error)
