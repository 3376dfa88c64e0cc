"""Passes over a dataset: the one place that picks how a dataset is read.

A map-style dataset is read by :mod:`~torchnormfit.passes.mapped` (a DataLoader over its indices, all of them or a
seeded random subset with standard errors); an ``IterableDataset`` (a stream) by
:mod:`~torchnormfit.passes.streamed` (each worker and rank reads the part its stream gives it). Both share
:mod:`~torchnormfit.passes.loader`: reading a sample, the workers' batches, and the exact merge. Under
torch.distributed each rank reads its own part and every rank gets the merged statistics.

:func:`run_pass` makes that choice for a fit; :func:`rereading` for the images a cache hit reads again.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from .._warn import warn
from ..distributed import Ranks, agree, current_ranks, gather_merge, shard
from ..reduce import Reduction
from ..stats import ChannelStats
from ..verification import DEFAULT_VERIFY
from .loader import (
    DEFAULT_BATCH_SIZE,
    Capture,
    PassResult,
    Reading,
    SampleMismatch,
    ScaleProbe,
    dataset_length,
    default_batch_size,
    default_num_workers,
    read_images,
    tensor_stats,
)
from .mapped import (
    StandardErrors,
    check_dataset,
    group_batch_size,
    map_pass,
    sample_pixels,
    subset_errors,
    subset_indices,
    tracked_indices,
)
from .streamed import (
    check_split_across_ranks,
    first_images,
    rereading_stream,
    stream_pass,
    stream_workers,
    tracked_images,
)

__all__ = [
    "run_pass",
    "rereading",
    "PassResult",
    "Reading",
    "SampleMismatch",
    "StandardErrors",
    "Capture",
    "Reduction",
    "tensor_stats",
    "dataset_length",
    "subset_indices",
    "sample_pixels",
    "first_images",
    "stream_workers",
    "default_num_workers",
    "default_batch_size",
    "DEFAULT_BATCH_SIZE",
]

_FAR_ABOVE_ONE = 10.0
"""A maximum this far above 1 with most pixels above 1 looks like 0-255 even in fractions (resized, blurred)."""


def run_pass(
    dataset: Dataset,
    capture: Capture | None = None,
    *,
    image: Callable[[Any], Any] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    process_group: Any = None,
    track: bool = False,
    progress: bool | None = None,
    reduction: Reduction | None = None,
    **loader: Any,
) -> tuple[PassResult, StandardErrors | None]:
    """One pass over ``dataset``: its exact per-channel statistics, and their standard errors after a subset.

    Parameters
    ----------
    dataset : Dataset
        A map-style dataset, or an ``IterableDataset`` (a stream).
    capture : Capture, optional
        Where the FitNormalize being fitted hands over the images it sees.
    image : callable, optional
        ``image(sample)`` -> the image tensor, when neither a capture nor
        :func:`~torchnormfit.images.find_image` finds it.
    max_samples : int, optional
        A map-style dataset: a uniform random subset of this many images,
        drawn with ``seed`` (:func:`subset_indices`), with standard errors.
        A stream: its first ``max_samples`` (no standard errors).
    process_group : optional
        Under it (or an initialized default ``torch.distributed`` group) each
        rank reads its own part and every rank returns the merged statistics.
    track : bool
        Keep some images' own mean and variance (:func:`rereading` reads them
        again to verify a cache hit), each image read
        :func:`~torchnormfit.verification.readings_per_image` times (at least
        twice): up to ``TRACKED`` random ones of a map-style dataset, read in
        the workers; ``DEFAULT_VERIFY`` of a stream, read here before the pass
        (its first ones, or the first ones of up to 16 random shards of a
        WebDataset shard list or a sharded Hugging Face stream).
    progress : bool, optional
        A progress bar (default: when stderr is a terminal).
    reduction : Reduction, optional
        What to leave out (``ignore``, ``mask``), whether to count values
        (percentiles), and ``spatial_dims``; default every pixel of images.
    **loader
        ``batch_size``, ``num_workers``, ``device``, ``pin_memory``.

    Returns
    -------
    (PassResult, StandardErrors or None)

    Examples
    --------
    >>> import torch
    >>> from torchvision.datasets import FakeData
    >>> from torchvision.transforms import v2
    >>> ds = FakeData(size=100, image_size=(3, 8, 8), transform=v2.Compose([v2.ToImage(),
    ...               v2.ToDtype(torch.float32, scale=True)]))
    >>> result, se = run_pass(ds, max_samples=40, seed=0, num_workers=0, progress=False)
    >>> result.num_samples, se.mean.shape
    (40, torch.Size([3]))
    """
    ranks = current_ranks(process_group)
    progress = sys.stderr.isatty() if progress is None else progress
    loader = {"batch_size": None, "num_workers": None, "device": None, "pin_memory": None, **loader}
    errors = None
    if isinstance(dataset, IterableDataset):
        tracked = {}
        if track and ranks is None:  # each rank's stream is only its own part: rank 0's images are not the stream's
            count = DEFAULT_VERIFY if max_samples is None else min(DEFAULT_VERIFY, max_samples)
            tracked = tracked_images(dataset, count, capture, image, sharded=max_samples is None, reduction=reduction)
        result = _on_ranks(ranks, progress, lambda show: stream_pass(
            dataset, capture, image, None, show, max_samples=max_samples, reduction=reduction, **loader))
        result = result._replace(tracked=tracked)
    else:
        result, errors = _map_style(dataset, capture, image, max_samples, seed, ranks, track, progress, loader,
                                    reduction)
    if result.stats is None:
        what = "the stream" if isinstance(dataset, IterableDataset) else "the subset of"
        raise ValueError(f"No samples to fit: {what} {type(dataset).__name__} is empty.")
    if not result.integer:  # integer images are fitted in their own units: any range is theirs
        _warn_if_0_255(result.stats, result.probe)
    return result, errors


def _map_style(
    dataset: Dataset, capture: Capture | None, image: Callable[[Any], Any] | None, max_samples: int | None, seed: int,
    ranks: Ranks | None, track: bool, progress: bool, loader: dict[str, Any], reduction: Reduction | None = None,
) -> tuple[PassResult, StandardErrors | None]:
    """The pass over all of a map-style dataset, or over a random subset with its standard errors."""
    length = check_dataset(dataset)
    if max_samples is None:
        indices: Sequence[int] = range(length)
    elif ranks is not None:
        raise ValueError("max_samples is not supported across a process group: fit the subset on one rank.")
    else:
        indices = subset_indices(length, max_samples, seed)
        loader = {**loader, "batch_size": group_batch_size(len(indices), loader["batch_size"])}
    chosen = frozenset(tracked_indices(indices) if track else ())
    local = indices if ranks is None else shard(indices, ranks)
    groups: list[ChannelStats] = []
    on_batch = None if max_samples is None else groups.append
    result = _on_ranks(ranks, progress, lambda show: map_pass(
        dataset, local, capture, image, on_batch, show, chosen, reduction=reduction, **loader))
    return result, subset_errors(groups, result.num_samples, length) if groups else None

def _on_ranks(ranks: Ranks | None, progress: bool, run_local: Callable[[bool], PassResult]) -> PassResult:
    """``run_local(progress)`` here, or on every rank with the results merged (progress shown on rank 0)."""
    if ranks is None:
        return run_local(progress)
    return _ranked_pass(ranks, lambda: run_local(progress and ranks.rank == 0))


def _ranked_pass(ranks: Ranks, run_local: Callable[[], PassResult]) -> PassResult:
    """This rank's shard, then the exact merge with every other rank's; errors reach every rank.

    For a stream, ranks whose streams start alike did not split it: refused.
    """
    error, local = None, PassResult(None, 0, {})
    try:
        local = run_local()
    except Exception as caught:
        error = caught
    channels_here = None if local.stats is None else local.stats.num_channels
    outcomes = agree(ranks, error, (channels_here, local._replace(stats=None)))
    channels = {c for c, _ in outcomes if c is not None}
    if len(channels) > 1:
        by_rank = {rank: c for rank, (c, _) in enumerate(outcomes)}
        raise ValueError(f"The ranks saw images with different channel counts: {by_rank}.")
    if any(part.first is not None for _, part in outcomes):
        check_split_across_ranks([part.first for _, part in outcomes])
    if not channels:
        return PassResult(None, 0, {})
    stats = local.stats if local.stats is not None else ChannelStats.empty(channels.pop())
    parts = [part for _, part in outcomes]
    tracked = {index: moments for part in parts for index, moments in part.tracked.items()}
    probe = ScaleProbe()
    for part in parts:
        probe = probe.merge(part.probe)
    return PassResult(gather_merge(ranks, stats), sum(p.num_samples for p in parts), tracked,
                      sum(p.captured for p in parts), probe=probe, integer=any(p.integer for p in parts))


@contextlib.contextmanager
def rereading(
    dataset: Dataset,
    indices: Sequence[int],
    count: int,
    capture: Capture | None,
    image: Callable[[Any], Any] | None,
    reduction: Reduction | None = None,
) -> Iterator[tuple[list[int], Callable[[int, int], list[Tensor]]]]:
    """Read tracked images again, in this process, to verify a cache hit.

    ``indices`` are the samples whose moments an entry keeps (a stream's: as
    :func:`~torchnormfit.passes.streamed.tracked_images` keyed them). Yields ``(rows, read)``:
    ``count`` positions in ``indices`` (a fresh random draw for a map-style
    dataset; a stream's first ones, or a random order of its tracked shards),
    and ``read(start, stop)``, the images of ``rows[start:stop]``, to be called
    in order.
    """
    count = min(count, len(indices))
    if isinstance(dataset, IterableDataset):
        with rereading_stream(dataset, indices, count, capture, image, reduction) as found:
            yield found
        return
    rows = random.SystemRandom().sample(range(len(indices)), count)
    yield rows, lambda start, stop: read_images(dataset, [int(indices[row]) for row in rows[start:stop]], capture,
                                                image, reduction)


def looks_0_255(stats: ChannelStats, probe: ScaleProbe) -> bool:
    """Whether the data plausibly is scaled to 0-255: most pixels probed are above 1, and they are whole numbers or
    the maximum is far above 1 (float data that merely exceeds 1, say up to 2.99, is not)."""
    if 2 * probe.above_one <= probe.pixels:
        return False
    return probe.fractional == 0 or float(stats.max.max()) > _FAR_ABOVE_ONE


def _warn_if_0_255(stats: ChannelStats, probe: ScaleProbe) -> None:
    if looks_0_255(stats, probe):
        whole = ", all whole numbers" if probe.fractional == 0 else ""
        warn(
            f"The pixel values reach {float(stats.max.max()):g} and {probe.above_one / probe.pixels:.0%} of those "
            f"checked are above 1{whole}: the data looks scaled to 0-255, not 0-1. "
            "If that is not intended, use ToTensor() or v2.ToDtype(torch.float32, scale=True).",
            UserWarning)
