"""Subset fits: statistics of a seeded uniform random subset of images, with their standard errors.

A user of a huge dataset can fit on N random images instead of all of them
and learn how far the numbers can be from the full pass. The subset is
visited in random order, so consecutive batches are independent, identically
distributed groups of images; the standard error of each channel's mean and
std comes from a delete-one-group jackknife over the batches' own
:class:`~torchnormfit.ChannelStats` (Efron & Stein 1981; Shao & Tu, "The
Jackknife and Bootstrap", 1995, ch. 2). It costs nothing beyond the pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from .fitting import DEFAULT_BATCH_SIZE, PassResult, fit_stats
from .images import find_image
from .stats import ChannelStats

__all__ = [
    "MIN_GROUPS",
    "StandardErrors",
    "subset_indices",
    "jackknife",
    "fit_subset",
    "sample_pixels",
]

MIN_GROUPS = 30
"""A subset pass uses batches small enough to give at least this many jackknife groups (if it has the images)."""


class StandardErrors(NamedTuple):
    """Per-channel standard errors (float64) of the fitted mean and std."""

    mean: Tensor
    std: Tensor


def subset_indices(length: int, max_samples: int, seed: int = 0) -> list[int]:
    """``min(max_samples, length)`` distinct indices of ``range(length)``, uniform at random, in random order.

    The same ``(length, max_samples, seed)`` gives the same indices in every
    process (a seeded ``torch.Generator``; same torch version), and a larger
    ``max_samples`` extends the subset of a smaller one.

    Examples
    --------
    >>> subset_indices(10, 3, seed=0) == subset_indices(10, 3, seed=0)
    True
    """
    if length < 1:
        raise ValueError(f"Cannot draw a subset of an empty dataset (length {length}).")
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1. Got {max_samples}.")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=generator)[: min(max_samples, length)].tolist()


def jackknife(groups: Sequence[ChannelStats]) -> StandardErrors:
    """Delete-one-group jackknife standard errors of the pooled mean and std.

    With ``G`` groups and ``theta_(g)`` the statistic of all groups but ``g``::

        se = sqrt((G - 1) / G * sum_g (theta_(g) - mean_g theta_(g)) ** 2)

    Each leave-one-out statistic is ``prefix[g].merge(suffix[g + 1])``, so the
    whole estimate takes O(G) merges. Fewer than two groups give NaN.

    Parameters
    ----------
    groups : sequence of ChannelStats
        The statistics of independent, identically distributed groups of images.

    Returns
    -------
    StandardErrors
        Float64 tensors of shape ``(C,)`` on the CPU.
    """
    count = len(groups)
    if count == 0:
        raise ValueError("jackknife() needs the statistics of at least one group. Got none.")
    channels = groups[0].num_channels
    groups = [group.to("cpu") for group in groups]
    if count < 2:
        nan = torch.full((channels,), float("nan"), dtype=torch.float64)
        return StandardErrors(nan, nan.clone())
    prefix = [ChannelStats.empty(channels)]
    for group in groups[:-1]:
        prefix.append(prefix[-1].merge(group))
    suffix = [ChannelStats.empty(channels)]
    for group in reversed(groups[1:]):
        suffix.append(suffix[-1].merge(group))
    left_out = [prefix[g].merge(suffix[count - 1 - g]) for g in range(count)]
    return StandardErrors(
        _jackknife_se(torch.stack([s.mean for s in left_out])),
        _jackknife_se(torch.stack([s.std for s in left_out])),
    )


def _jackknife_se(replicates: Tensor) -> Tensor:
    count = replicates.shape[0]
    spread = (replicates - replicates.mean(dim=0)).square().sum(dim=0)
    return (spread * (count - 1) / count).sqrt()


def _group_batch_size(num_samples: int, batch_size: int | None) -> int:
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    return max(1, min(batch_size, num_samples // MIN_GROUPS))


def fit_subset(
    dataset: Dataset, max_samples: int, seed: int = 0, *, batch_size: int | None = None, **fit_kwargs: Any
) -> tuple[PassResult, StandardErrors | None]:
    """Fit on a uniform random subset of ``max_samples`` images; return the pass and the standard errors.

    The subset is :func:`subset_indices` ``(len(dataset), max_samples, seed)``,
    visited in its random order, so the batches are random groups of images.
    The jackknife errors over those batches are scaled by the finite population
    correction ``sqrt(1 - n / len(dataset))``: they say how far the subset's
    mean and std can be from the full pass's (0 when the subset is everything);
    about 95% of seeds land within two of them.

    Parameters
    ----------
    dataset : Dataset
        A map-style dataset whose samples hold a float image. A stream
        (``IterableDataset``) is fitted on its first ``max_samples`` instead
        (not random; ``seed`` unused; no standard errors: None).
    max_samples : int
        Size of the subset; all images if the dataset is smaller.
    seed : int
        Seed of the subset (same seed, same subset, same statistics).
    batch_size : int, optional
        Upper bound on the batch size; it is lowered to give at least
        :data:`MIN_GROUPS` batches. It never changes the statistics.
    **fit_kwargs
        Passed on to :func:`~torchnormfit.fitting.fit_stats` (``num_workers``,
        ``progress``, ``device``, ``capture``, ``image``, ...).

    Returns
    -------
    (PassResult, StandardErrors)
        The pass over the subset (statistics, number of images, ...) and the standard errors.

    Examples
    --------
    >>> from torchvision.datasets import FakeData
    >>> from torchvision.transforms import v2
    >>> ds = FakeData(size=100, image_size=(3, 8, 8), transform=v2.Compose([v2.ToImage(),
    ...               v2.ToDtype(torch.float32, scale=True)]))
    >>> result, se = fit_subset(ds, 40, seed=0, num_workers=0, progress=False)
    >>> result.num_samples, se.mean.shape
    (40, torch.Size([3]))
    """
    if isinstance(dataset, IterableDataset):  # a stream: its first max_samples, no standard errors
        return fit_stats(dataset, max_samples=max_samples, batch_size=batch_size, **fit_kwargs), None
    indices = subset_indices(len(dataset), max_samples, seed)
    groups: list[ChannelStats] = []
    result = fit_stats(
        dataset, indices=indices, on_batch=groups.append, batch_size=_group_batch_size(len(indices), batch_size),
        **fit_kwargs,
    )
    errors = jackknife(groups)
    correction = math.sqrt(max(0.0, 1.0 - result.num_samples / len(dataset)))
    return result, StandardErrors(errors.mean * correction, errors.std * correction)


def sample_pixels(dataset: Dataset, *, max_pixels: int = 200_000, max_images: int = 32, seed: int = 0) -> Tensor:
    """A bounded uniform sample of pixel values, ``(C, n)`` float32, for histograms.

    Reads up to ``max_images`` random samples in this process and keeps up to
    ``max_pixels / max_images`` random pixels of each, so memory stays
    O(max_pixels) whatever the dataset. Samples that fail to load are passed over.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    per_image = max(1, max_pixels // max_images)
    parts: list[Tensor] = []
    for index in order:
        if len(parts) == max_images:
            break
        try:
            found = find_image(dataset[index])
        except Exception:
            continue
        if not isinstance(found, Tensor) or not found.is_floating_point() or found.ndim < 3:
            continue
        flat = found.as_subclass(Tensor).reshape(-1, found.shape[-3], found.shape[-2] * found.shape[-1])
        flat = flat.transpose(0, 1).reshape(found.shape[-3], -1)
        keep = torch.randperm(flat.shape[1], generator=generator)[:per_image]
        parts.append(flat[:, keep].float())
    if not parts:
        raise ValueError("Could not read any sample to draw pixels from.")
    return torch.cat(parts, dim=1)
