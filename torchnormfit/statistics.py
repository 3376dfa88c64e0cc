"""Statistics for a dataset: a verified cache hit, or one pass and a write. The one place that decides.

:func:`fit_dataset` is what ``FitNormalize.fit`` and the command line call::

    key (given, or the fingerprint of dataset + pipeline + settings)
    -> cache entry?  no -> pass -> write the entry (with a few images' own moments)
                     yes -> verify: read ``verify`` of those images again, paired test
                            passed -> hit;  failed -> warn, pass, replace the entry

and returns a :class:`FitRecord` of what happened. Under ``torch.distributed``
rank 0 reads the cache, verifies and writes; every rank gets its decision.

Which hits are verified (``verify=None``, the default): every hit on a fingerprint
key, with :data:`~torchnormfit.verification.DEFAULT_VERIFY` images; none on a key
given by hand (``key=``), which names an entry that may have been fitted on other
data on purpose (a train set's statistics used for a test set). ``verify=N``
verifies with N images whatever the key; ``verify=0`` never reads an image. An
entry that holds no per-image moments (written by ``partial_fit``/``save``, or by
torchnormfit 0.1) cannot be verified: its hit is taken and the record says so.

This module takes plain arguments (the transform is an opaque object to find in
the dataset, and a context manager that puts it in capture mode); it never
imports the transform.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, IterableDataset

from . import cache
from ._version import __version__
from ._warn import warn
from .distributed import current_ranks, on_root
from .images import moment_image
from .key import describe_dataset, describe_pipeline, fingerprint
from .passes import (
    Capture,
    PassResult,
    Reading,
    Reduction,
    StandardErrors,
    dataset_length,
    rereading,
    run_pass,
    tensor_stats,
)
from .stats import ChannelStats, ValueCounts
from .values import MAX_BINS
from .verification import (
    DEFAULT_VERIFY,
    MAX_VERIFY,
    Verification,
    identical,
    image_moments,
    threshold,
    verify_in_stages,
)

__all__ = ["MAX_RANK_ERROR", "FitRecord", "exact_percentiles", "fit_dataset", "pass_stats", "save_stats", "load_entry",
           "tensor_stats"]

logger = logging.getLogger("torchnormfit")

Capturing = Callable[[], AbstractContextManager[Capture]]
"""Puts the FitNormalize being fitted in capture mode for the duration of a ``with``."""


@dataclass(frozen=True)
class FitRecord:
    """How a fit got its statistics."""

    source: str
    """``"cache"`` (a hit) or ``"pass"`` (the dataset was read)."""
    key: str | None
    cache_path: Path | None
    verification: Verification | None
    """The check of the hit, or of the entry a pass replaced; None if none was made."""
    written: bool
    """Whether the statistics were written to the cache."""
    note: str
    """Why there was no hit, no verification or no write, in words ("" when all went as usual)."""
    key_gaps: tuple[str, ...]
    """What the key could not describe (a hit on it is verified)."""
    stats: ChannelStats
    num_samples: int
    standard_errors: StandardErrors | None = None
    integer: bool = False
    """Whether the images were integers (statistics in their own units)."""


@dataclass(frozen=True)
class _Lookup:
    entry: cache.CacheEntry | None
    verification: Verification | None
    note: str


def fit_dataset(
    dataset: Dataset,
    norm: Any,
    capturing: Capturing,
    *,
    cache_path: Path | None,
    key: str | None,
    refit: bool = False,
    verify: int | None = None,
    image: Callable[[Any], Any] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    process_group: Any = None,
    reduction: Reduction | None = None,
    **loader: Any,
) -> FitRecord:
    """Statistics of ``dataset`` as seen by ``norm``: a verified cache hit, or a pass (then written).

    ``reduction`` (ignore, mask, value counts for clip, volumes) goes into the key's settings and the pass.
    """
    verify = _check_verify(verify, explicit_key=key is not None)
    reduction = reduction or Reduction()
    settings: dict[str, Any] = {"image": image, "ddof": 0, "statistic": "per-channel population mean/std",
                                **reduction.settings()}
    if max_samples is not None:
        settings.update(max_samples=max_samples, seed=seed)
    if key is None:
        printed = fingerprint(dataset, norm, settings, cache=cache_path)
        key, gaps = printed.key, printed.gaps
    else:
        printed, gaps = None, ()
    ranks = current_ranks(process_group)
    note = "refit=True" if refit else ("no cache (cache=None)" if cache_path is None else "")
    verification = None
    if cache_path is not None and not refit:
        length = _length_check(dataset, max_samples) if printed is not None else None
        lookup = on_root(ranks, lambda: _lookup(dataset, capturing, image, cache_path, key, verify, gaps, reduction,
                                                length))
        if lookup.entry is not None:
            logger.info("cache hit: %r in %s (%s)", key, cache_path, lookup.note or "verified")
            return _entry_record(lookup.entry, key, cache_path, lookup.verification, lookup.note, gaps)
        verification, note = lookup.verification, lookup.note
    result, errors = _pass(dataset, capturing, image, max_samples, seed, process_group, loader,
                           track=cache_path is not None, reduction=reduction)
    assert result.stats is not None  # run_pass raises when it read no image
    stats = exact_percentiles(result.stats, reduction, lambda again: _pass(
        dataset, capturing, image, max_samples, seed, process_group, loader, reduction=again)[0].stats)
    if printed is not None and not printed.found_norm and result.captured:
        warn(
            f"The FitNormalize being fitted measured the images inside {type(dataset).__name__}'s pipeline, but the "
            "cache key could not find it there, so the key may not see the transforms before it. Pass key=... "
            "to name the entry yourself if the pipeline can change.",
            UserWarning)
    written = False
    if cache_path is not None:
        attrs = {**_provenance(dataset, norm, result.num_samples, gaps),
                 **_subset_provenance(dataset, max_samples, seed, errors), **_units(result.integer)}
        arrays, verdict = _tracked_fields(result.tracked, stats)
        attrs.update(verdict)
        if stats.values is not None:
            value_attrs, value_arrays = stats.values.to_arrays()
            attrs.update(value_attrs)
            arrays.update(value_arrays)
        written = on_root(ranks, lambda: _save(cache_path, key, stats, attrs, arrays))
        if not written:
            why = ("cache= names a file, which a fit only reads" if cache.is_entry_file(cache_path)
                   else "it could not be written")
            note = "; ".join(filter(None, [note, f"not saved: {why}"]))
    return FitRecord("pass", key, cache_path, verification, written, note, gaps, stats, result.num_samples, errors,
                     result.integer)


def pass_stats(
    dataset: Dataset, capturing: Capturing, reduction: Reduction | None = None, **options: Any
) -> tuple[ChannelStats, int, bool]:
    """One pass with no cache involved (``partial_fit``): statistics, the number of images, whether integers."""
    arguments = (dataset, capturing, options.pop("image", None), options.pop("max_samples", None),
                 options.pop("seed", 0), options.pop("process_group", None), options)
    result, _ = _pass(*arguments, reduction=reduction)
    assert result.stats is not None  # run_pass raises when it read no image
    stats = exact_percentiles(result.stats, reduction or Reduction(),
                              lambda again: _pass(*arguments, reduction=again)[0].stats)
    return stats, result.num_samples, result.integer


MAX_RANK_ERROR = 1e-3
"""The most a fitted float percentile's rank may be off (0.1%); a second pass makes it exact where one pass
cannot promise this."""


def exact_percentiles(stats: ChannelStats, reduction: Reduction,
                      again: Callable[[Reduction], ChannelStats | None]) -> ChannelStats:
    """``stats`` with the float percentiles ``reduction.percentiles`` made exact by a second pass ``again`` over
    the same pixels, where asked (``reduction.exact``) or, unless told not to (``exact=False``), where one pass
    cannot promise them within 0.1% in rank.

    The second pass counts every float32 value in the few buckets those percentiles fall in
    (:meth:`ValueCounts.windows`); if it did not see the pixels the first saw (a random transform), the
    one-pass percentiles stay, with a warning.
    """
    values = stats.values
    if values is None or values.kind != "float" or not reduction.percentiles or reduction.exact is False:
        return stats
    if reduction.exact is None and float(values.rank_error(reduction.percentiles).max()) <= MAX_RANK_ERROR:
        return stats
    windows = values.windows(reduction.percentiles)
    needed = windows.numel() << values.shift
    if needed > MAX_BINS:
        why = (f"Exact percentiles of {values.num_channels} channels need {needed} counters in a second pass, more "
               f"than {MAX_BINS}")
        if reduction.exact:
            raise ValueError(f"{why}: fit the channels in groups, or pass exact_percentiles=None or False.")
        warn(f"{why}, so the percentiles stay those of one pass, within the rank error that "
             "stats.values.rank_error(q) states (above 0.1% here). Fit the channels in groups to make them exact.",
             UserWarning)
        return stats
    logger.info("a second pass for exact percentiles %s", reduction.percentiles)
    counted = again(replace(reduction, windows=(windows, values.shift)))
    try:
        assert counted is not None and counted.values is not None  # the pass raises when it read no image
        return stats.with_values(values.refined(windows, counted.values))
    except ValueError as error:
        warn(f"{error} The percentiles stay those of one pass, within the rank error that "
             "stats.values.rank_error(q) states.", UserWarning)
        return stats


def save_stats(cache_path: Path, key: str, stats: ChannelStats, num_samples: int, integer: bool = False) -> None:
    """Write statistics built by hand (``partial_fit``) under ``key``; such an entry cannot be verified."""
    attrs: dict[str, Any] = {**_provenance(None, None, num_samples, ()), **_units(integer)}
    arrays: dict[str, np.ndarray] = {}
    if stats.values is not None:
        value_attrs, arrays = stats.values.to_arrays()
        attrs.update(value_attrs)
    cache.write_entry(cache_path, key, stats, attrs, arrays=arrays)


def _units(integer: bool) -> dict[str, Any]:
    """The entry attribute that says the images were integers (absent for float images, as in 0.1)."""
    return {"integer_input": True} if integer else {}


def load_entry(cache_path: Path, key: str | None) -> FitRecord:
    """The entry ``key`` (any key in an entry file) as read, not verified; else a
    :class:`~torchnormfit.CacheError` naming the entries there."""
    entry = cache.read_entry(cache_path, key)
    if entry is None:
        known = [e.key for e in cache.list_entries(cache_path)] if cache_path.is_dir() else []
        raise cache.CacheError(f"No cache entry {key!r} in {cache_path}. Entries there: {known}.")
    if key is not None and entry.key != key:
        raise cache.CacheError(f"The entry file {cache_path} holds {entry.key!r}, not {key!r}; leave out the key "
                               "to load it.")
    return _entry_record(entry, entry.key, cache_path, None, "loaded by key, not verified", ())


# --- the hit -------------------------------------------------------------------------------------


def _check_verify(verify: int | None, explicit_key: bool) -> int:
    if verify is None:
        return 0 if explicit_key else DEFAULT_VERIFY
    if isinstance(verify, bool) or not isinstance(verify, int) or not 0 <= verify <= MAX_VERIFY:
        raise ValueError(f"verify must be an int from 0 (no check) to {MAX_VERIFY}. Got {verify!r}.")
    return verify


def _lookup(
    dataset: Dataset, capturing: Capturing, image: Any, path: Path, key: str, verify: int, gaps: Sequence[str],
    reduction: Reduction, length: tuple[str, int] | None = None,
) -> _Lookup:
    """The entry if it is there, has the dataset's length (``length``: see :func:`_length_check`) and passes
    verification; else why not (runs on rank 0)."""
    try:
        entry = cache.read_entry(path, key)
    except cache.CacheError as error:
        warn(f"{error} Not using it; fitting again.", cache.CacheWarning)
        return _Lookup(None, None, f"the entry could not be used: {error}")
    if entry is None:
        return _Lookup(None, None, "no entry for this key")
    mismatch = _length_mismatch(entry, length)
    if mismatch:
        logger.info("cache entry %r in %s not used: %s", key, path, mismatch)
        return _Lookup(None, None, mismatch)
    samples = getattr(entry, "arrays", {}) or {}
    fitted_under = str(entry.attrs.get("torchvision_version", torchvision.__version__))
    if verify == 0 and fitted_under != torchvision.__version__:
        verify = DEFAULT_VERIFY  # its kernels make the pixels: a hit under another version is checked regardless
        logger.info("the entry %r was fitted under torchvision %s, this is %s: verifying it", key, fitted_under,
                    torchvision.__version__)
    if verify == 0:
        return _Lookup(entry, None, "not verified (verify=0)" + (f"; the key has gaps: {list(gaps)}" if gaps else ""))
    if not {"index", "mean", "var"} <= set(samples):
        return _Lookup(entry, None, "not verified: the entry holds no per-image moments (partial_fit/save or 0.1)")
    verification = _verify(dataset, capturing, image, entry, samples, verify, reduction)
    if verification.passed:
        return _Lookup(entry, verification, "")
    warn(f"The cache entry {key!r} in {path} does not match the data: {verification.detail}. Fitting again and "
         "replacing the entry.", cache.CacheWarning)
    return _Lookup(None, verification, "the entry failed verification")


def _length_check(dataset: Dataset, max_samples: int | None) -> tuple[str, int] | None:
    """``(entry attribute, len(dataset))`` to compare on a hit: the sample count of a full fit, the population
    of a subset fit. None for a stream or a dataset without a length."""
    if isinstance(dataset, IterableDataset):
        return None
    try:
        length = dataset_length(dataset)
    except Exception:  # no __len__, or one that fails: nothing to compare
        return None
    return ("num_samples" if max_samples is None else "population", int(length))


def _length_mismatch(entry: cache.CacheEntry, length: tuple[str, int] | None) -> str:
    """Why an entry fitted on another number of samples is a miss ("" when the counts agree or are unknown)."""
    if length is None or length[0] not in entry.attrs:
        return ""
    name, now = length
    then = int(entry.attrs[name])
    if then == now:
        return ""
    return f"a miss: the dataset has {now} samples now, the entry was fitted on {then} ({name})"


def _verify(
    dataset: Dataset, capturing: Capturing, image: Any, entry: cache.CacheEntry, samples: dict[str, np.ndarray],
    verify: int, reduction: Reduction,
) -> Verification:
    """Read up to ``verify`` of the entry's tracked images again (a fresh random draw; a stream's first
    images, in order) and test them against it, in :func:`~torchnormfit.verification.stages`."""
    channels = entry.stats.num_channels

    def rows_of(name: str, rows: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(samples[name][rows], dtype=np.float64))

    indices = samples["index"].tolist()
    with capturing() as capture, rereading(dataset, indices, verify, capture, image, reduction) as (rows, read):
        again = (rows_of("mean_again", rows), rows_of("var_again", rows)) if "mean_again" in samples else None
        deterministic = again is not None and bool(entry.attrs.get("deterministic", 0))
        all_rows = list(range(len(indices)))
        try:
            return verify_in_stages(
                rows_of("mean", rows), rows_of("var", rows),
                lambda start, stop: _moments(read(start, stop), channels, start, reduction.masked), entry.stats.mean,
                entry.stats.var, again=again, deterministic=deterministic,
                known=(rows_of("mean", all_rows), rows_of("var", all_rows)) if deterministic else None)
        except _ChannelMismatch as mismatch:
            limit = threshold(channels)
            return Verification(mismatch.read, False, math.inf, limit, str(mismatch), failed=("channels",))
        except IndexError as error:  # the dataset or a stream's shard shrank: a tracked image is gone
            detail = f"a tracked image could not be read again ({error})"
            return Verification(0, False, math.inf, threshold(channels), detail, failed=("read",))


class _ChannelMismatch(Exception):
    """Images read again have another number of channels than the entry (``read``: images read by then)."""

    def __init__(self, message: str, read: int):
        super().__init__(message)
        self.read = read


def _moments(images: list[torch.Tensor], channels: int, start: int, masked: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images' own means and variances, ``(n, C)`` each (``start``: the images read before these)."""
    pairs = [image_moments(moment_image(im, masked)) for im in images]
    other = sorted({mean.numel() for mean, _ in pairs} - {channels})
    if other:
        raise _ChannelMismatch(f"the images have {other} channels, the entry {channels}", start + len(images))
    if not pairs:
        return torch.empty(0, channels, dtype=torch.float64), torch.empty(0, channels, dtype=torch.float64)
    return torch.stack([mean for mean, _ in pairs]), torch.stack([var for _, var in pairs])


def _entry_record(
    entry: cache.CacheEntry, key: str, path: Path, verification: Verification | None, note: str, gaps: tuple[str, ...]
) -> FitRecord:
    """What an entry gives: its statistics, images and standard errors (after a subset fit)."""
    errors = None
    if "mean_se" in entry.attrs and "std_se" in entry.attrs:
        errors = StandardErrors(torch.tensor(entry.attrs["mean_se"], dtype=torch.float64),
                                torch.tensor(entry.attrs["std_se"], dtype=torch.float64))
    num_samples = int(entry.attrs.get("num_samples", 0))
    values = ValueCounts.from_arrays(entry.attrs, getattr(entry, "arrays", {}) or {})
    stats = entry.stats if values is None else entry.stats.with_values(values)
    return FitRecord("cache", key, path, verification, False, note, gaps, stats, num_samples, errors,
                     bool(entry.attrs.get("integer_input", False)))


# --- the pass and the write ----------------------------------------------------------------------


def _pass(
    dataset: Dataset, capturing: Capturing, image: Any, max_samples: int | None, seed: int, process_group: Any,
    loader: dict[str, Any], track: bool = False, reduction: Reduction | None = None,
) -> tuple[PassResult, StandardErrors | None]:
    """One pass with the transform in capture mode; it is left unchanged if the pass fails.

    With ``track``, some images' own moments are kept for the entry (see :func:`~torchnormfit.passes.run_pass`).
    """
    with capturing() as capture:
        return run_pass(dataset, capture, image=image, max_samples=max_samples, seed=seed,
                        process_group=process_group, track=track, reduction=reduction, **loader)


def _tracked_fields(
    tracked: dict[int, list[Reading]], stats: ChannelStats | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The entry's arrays of the tracked images (``index``; ``mean``, ``var``: the first reading; ``mean_again``,
    ``var_again``: the second) and its attrs ``readings`` and ``deterministic`` (every reading equal to the first,
    up to rounding: :func:`~torchnormfit.verification.identical`)."""
    if not tracked or stats is None:
        return {}, {}
    order = sorted(tracked)
    readings = min(len(tracked[i]) for i in order)
    as_array = [
        (np.asarray([tracked[i][r][0] for i in order], dtype=np.float64),
         np.asarray([tracked[i][r][1] for i in order], dtype=np.float64))
        for r in range(readings)
    ]
    arrays = {"index": np.asarray(order, dtype=np.int64), "mean": as_array[0][0], "var": as_array[0][1]}
    if readings < 2:
        return arrays, {"readings": readings}
    arrays.update(mean_again=as_array[1][0], var_again=as_array[1][1])
    as_tensors = [(torch.from_numpy(mean), torch.from_numpy(var)) for mean, var in as_array]
    deterministic = identical(as_tensors, stats.mean.double(), stats.var.double())
    return arrays, {"readings": readings, "deterministic": int(deterministic)}


def _save(path: Path, key: str, stats: ChannelStats, attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
    if cache.is_entry_file(path):
        logger.info("not saved: the cache %s is a file, which a fit only reads", path)
        return False
    try:
        cache.write_entry(path, key, stats, attrs, arrays=arrays)
    except (OSError, cache.CacheError) as error:
        warn(f"The statistics were fitted but not saved to the cache {path}: {error}", cache.CacheWarning)
        return False
    logger.info("cached %r in %s", key, path)
    return True


def _provenance(dataset: Dataset | None, norm: Any, num_samples: int, gaps: Sequence[str]) -> dict[str, Any]:
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "torchnormfit_version": __version__,
        "dataset": "partial_fit" if dataset is None else _never_raising(
            lambda: json.dumps(describe_dataset(dataset), sort_keys=True, default=str)),
        "pipeline": "" if dataset is None else _never_raising(lambda: describe_pipeline(dataset, norm)),
        "num_samples": num_samples,
        "ddof": 0,
        "key_gaps": json.dumps(list(gaps)),
    }


def _never_raising(describe: Callable[[], str]) -> str:
    """A provenance text; a dataset that cannot be described must not fail a fit that has its statistics."""
    try:
        return describe()
    except Exception as error:
        return f"(not described: {type(error).__name__}: {error})"


def _subset_provenance(
    dataset: Dataset, max_samples: int | None, seed: int, errors: StandardErrors | None
) -> dict[str, Any]:
    if max_samples is None or errors is None:
        return {}
    return {
        "max_samples": max_samples,
        "seed": seed,
        "population": dataset_length(dataset),
        "mean_se": errors.mean.tolist(),
        "std_se": errors.std.tolist(),
    }
