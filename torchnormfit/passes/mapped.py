"""The map-style pass (a DataLoader over indices), and subsets: a seeded uniform random subset of images, with
the standard errors of its statistics.

A user of a huge dataset can fit on N random images instead of all of them
and learn how far the numbers can be from the full pass. The subset is
visited in random order, so consecutive batches are independent, identically
distributed groups of images; the standard error of each channel's mean and
std comes from a delete-one-group jackknife over the batches' own
:class:`~torchnormfit.ChannelStats` (Efron & Stein 1981; Shao & Tu, "The
Jackknife and Bootstrap", 1995, ch. 2). It costs nothing beyond the pass.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..images import find_image
from ..reduce import Reduction
from ..stats import ChannelStats
from ..verification import TRACKED
from .loader import (
    DEFAULT_BATCH_SIZE,
    Batch,
    Capture,
    Collate,
    Failure,
    PassResult,
    dataset_length,
    default_batch_size,
    default_num_workers,
    read_image,
    reduce_batches,
    running,
)

__all__ = [
    "MIN_GROUPS",
    "StandardErrors",
    "map_pass",
    "check_dataset",
    "subset_indices",
    "tracked_indices",
    "group_batch_size",
    "subset_errors",
    "jackknife",
    "sample_pixels",
]

logger = logging.getLogger("torchnormfit")

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


def group_batch_size(num_samples: int, batch_size: int | None) -> int:
    """The batch size of a subset pass: at most ``batch_size``, small enough for :data:`MIN_GROUPS` batches."""
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    return max(1, min(batch_size, num_samples // MIN_GROUPS))


def subset_errors(groups: Sequence[ChannelStats], num_samples: int, population: int) -> StandardErrors:
    """The standard errors of a subset's mean and std from its batches' statistics ``groups``.

    The jackknife errors over the batches (random groups of images, as the
    subset is visited in its random order) are scaled by the finite population
    correction ``sqrt(1 - n / population)``: they say how far the subset's
    mean and std can be from the full pass's (0 when the subset is
    everything); about 95% of seeds land within two of them.
    """
    errors = jackknife(groups)
    correction = math.sqrt(max(0.0, 1.0 - num_samples / population))
    return StandardErrors(errors.mean * correction, errors.std * correction)


def tracked_indices(indices: Sequence[int]) -> list[int]:
    """Up to TRACKED of ``indices``, a fixed random choice, whose images' own moments the entry keeps."""
    if len(indices) <= TRACKED:
        return list(indices)
    return [indices[i] for i in subset_indices(len(indices), TRACKED, seed=0)]


def sample_pixels(dataset: Dataset, *, max_pixels: int = 200_000, max_images: int = 32, seed: int = 0) -> Tensor:
    """A bounded uniform sample of pixel values, ``(C, n)`` float32, for histograms.

    Reads up to ``max_images`` random samples in this process and keeps up to
    ``max_pixels / max_images`` random pixels of each, so memory stays
    O(max_pixels) whatever the dataset. Samples that fail to load are passed over.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(dataset_length(dataset), generator=generator).tolist()
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


class _SampleReader(Dataset):
    """``dataset[i]`` -> ``(i, image tensor)``, or ``(i, Failure)`` naming ``i``."""

    def __init__(self, dataset: Dataset, capture: Capture | None, image: Callable[[Any], Any] | None,
                 reduction: Reduction | None = None):
        self.dataset = dataset
        self.capture = capture
        self.image = image
        self.reduction = reduction

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Tensor | Failure, bool]:
        """``(index, image or failure, whether FitNormalize captured the image)``."""
        try:
            image = read_image(lambda: self.dataset[index], f"Sample {index}: ", self.capture, self.image,
                               self.reduction)
        except Exception as error:
            return index, Failure.capture(error), False
        return index, image, self.capture is not None and self.capture.took


def map_pass(
    dataset: Dataset,
    indices: Sequence[int],
    capture: Capture | None,
    image: Callable[[Any], Any] | None,
    on_batch: Callable[[ChannelStats], None] | None,
    progress: bool,
    track: frozenset[int],
    *,
    batch_size: int | None,
    num_workers: int | None,
    device: torch.device | str | None,
    pin_memory: bool | None,
    reduction: Reduction | None = None,
) -> PassResult:
    """The DataLoader pass over ``indices`` (reduced as ``reduction`` says)."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    device = torch.device(device) if device is not None else torch.device("cpu")
    probed, loader = _loader(dataset, indices, capture, image, track, batch_size, num_workers, device, pin_memory,
                             reduction)
    logger.info("fitting %s: %d samples, batch_size=%d, num_workers=%d, device=%s",
                type(dataset).__name__, len(indices), loader.batch_size, num_workers, device)
    bar = tqdm(total=len(indices), unit="img", desc="torchnormfit", disable=not progress)
    with bar, running(loader) as batches:
        return reduce_batches(itertools.chain(probed, batches), device, on_batch, bar, reduction)


def _loader(
    dataset: Dataset,
    indices: Sequence[int],
    capture: Capture | None,
    image: Callable[[Any], Any] | None,
    track: frozenset[int],
    batch_size: int | None,
    num_workers: int,
    device: torch.device,
    pin_memory: bool | None,
    reduction: Reduction | None = None,
) -> tuple[list[Batch], DataLoader]:
    """The DataLoader of the pass, and the batches read before it.

    Without ``batch_size``, the first sample is read here: its size sets the
    batch size (:func:`default_batch_size`) and it is the first batch, so no
    sample is read twice.
    """
    reader = _SampleReader(dataset, capture, image, reduction)
    collate = Collate(reduce=device.type == "cpu", track=track, reduction=reduction)
    probed: list[Batch] = []
    if batch_size is None and len(indices) > 0:
        index, item, captured = reader[indices[0]]
        if isinstance(item, Failure):  # before any worker process is started
            item.reraise()
        probed = [collate([(index, item, captured)])]
        if probed[0].failure is not None:
            probed[0].failure.reraise()
        batch_size, indices = default_batch_size(item, len(indices), num_workers), indices[1:]
    loader = DataLoader(
        Subset(reader, indices),
        batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
        shuffle=False,
        num_workers=num_workers if len(indices) > 0 else 0,
        collate_fn=collate,
        pin_memory=(device.type != "cpu") if pin_memory is None else pin_memory,
    )
    return probed, loader


def check_dataset(dataset: Dataset) -> int:
    """The length of ``dataset``; raises unless it is a map-style dataset with at least one sample."""
    if not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"fit() needs a map-style dataset (with __len__ and __getitem__) or a torch.utils.data.IterableDataset. "
            f"Got {type(dataset).__name__}."
        )
    try:
        length = dataset_length(dataset)
    except TypeError as error:
        raise TypeError(f"fit() needs a dataset with __len__. Got {type(dataset).__name__}: {error}") from error
    if length == 0:
        raise ValueError(f"The dataset {type(dataset).__name__} is empty: there are no pixels to fit statistics on.")
    return length
