"""The fit pass: one DataLoader pass over a dataset, reduced to ChannelStats.

The workers read samples (:mod:`torchnormfit.samples`), group a batch's images by shape and reduce them
(:class:`_Collate`), and send back a few floats per batch; this process merges them exactly, across
torch.distributed ranks too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from ._warn import warn
from .accumulator import BatchNormAccumulator, batch_stats, reuse_buffer
from .distributed import Ranks, agree, current_ranks, gather_merge, shard
from .images import check_image
from .samples import Capture, _Failure, read_image
from .stats import ChannelStats
from .verification import image_moments

__all__ = ["fit_stats", "tensor_stats", "PassResult", "default_num_workers", "default_batch_size", "DEFAULT_BATCH_SIZE"]

logger = logging.getLogger("torchnormfit")

DEFAULT_BATCH_SIZE = 64  # for sampling's groups and the file check; fit() picks its own (default_batch_size)
_BATCH_BYTES = 64 << 20  # see default_batch_size
_MAX_BATCH_SIZE = 256
_BATCHES_PER_WORKER = 16
_STACK_BYTES = 8 << 20  # images stacked and reduced at a time in a worker
_LOOKS_0_255 = 1.5


def default_num_workers() -> int:
    """Worker processes used when ``num_workers`` is not given: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def default_batch_size(image: Tensor, num_samples: int | None = None, num_workers: int = 0) -> int:
    """Images per batch when ``batch_size`` is not given, from one image of the dataset.

    64 MiB of images like ``image``, at most 256: small images want large
    batches (a fixed cost per batch: 256 for 3x32x32), large ones fewer (each
    worker holds a whole batch: 111 for 3x224x224, 5 for 3x1024x1024). And
    small enough that each worker gets 16 batches of the ``num_samples``, so
    that no worker idles long over the last ones. Measured on 2 cores: see
    benchmarks/README.md.
    """
    by_size = _BATCH_BYTES // max(1, image.numel() * image.element_size())
    by_count = -(-num_samples // (_BATCHES_PER_WORKER * max(1, num_workers))) if num_samples else _MAX_BATCH_SIZE
    return max(1, min(_MAX_BATCH_SIZE, by_size, by_count))


class _SampleReader(Dataset):
    """``dataset[i]`` -> ``(i, image tensor)``, or ``(i, _Failure)`` naming ``i``."""

    def __init__(self, dataset: Dataset, capture: Capture | None, image: Callable[[Any], Any] | None):
        self.dataset = dataset
        self.capture = capture
        self.image = image

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Tensor | _Failure, bool]:
        """``(index, image or failure, whether FitNormalize captured the image)``."""
        try:
            image = read_image(lambda: self.dataset[index], f"Sample {index}: ", self.capture, self.image)
        except Exception as error:
            return index, _Failure.capture(error), False
        return index, image, self.capture is not None and self.capture.took


@dataclass
class _Batch:
    """What a worker sends back for one batch: statistics, or the images themselves."""

    first_index: int
    num_samples: int
    channels: int
    moments: list[list[float]] | None = None  # the batch's ChannelStats as plain floats (see _Collate)
    groups: list[tuple[list[int], Tensor]] | None = None
    failure: _Failure | None = None
    tracked: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)
    """Per-image moments of the batch's tracked images (see :func:`fit_stats`)."""
    captured: int = 0
    """Images that the FitNormalize being fitted captured (the others were found in the sample)."""


class _Collate:
    """Groups a batch's images by shape (so sizes may differ) and reduces them to statistics.

    Runs in the DataLoader workers, so the statistics cost is spread over them and
    only a few numbers per batch travel back. Each group is stacked and reduced
    at most ``_STACK_BYTES`` at a time, into a buffer reused from batch to batch.
    With ``reduce=False`` (an accelerator does the reduction) it returns the
    stacked groups instead.
    """

    def __init__(self, reduce: bool, track: frozenset[int] = frozenset()):
        self.reduce = reduce
        self.track = track
        self._stacked: Tensor | None = None

    def __call__(self, items: Sequence[tuple[int, Tensor | _Failure, bool]]) -> _Batch:
        for index, item, _ in items:
            if isinstance(item, _Failure):
                return _Batch(index, 0, 0, failure=item)
        try:
            batch = self._reduce([(index, image) for index, image, _ in items])
        except Exception as error:
            return _Batch(items[0][0], 0, 0, failure=_Failure.capture(error))
        batch.captured = sum(captured for _, _, captured in items)
        return batch

    def _reduce(self, items: Sequence[tuple[int, Tensor]]) -> _Batch:
        first_index, first = items[0]
        channels = first.shape[-3]
        by_shape: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        for index, image in items:
            if image.shape[-3] != channels:
                raise ValueError(_channel_mismatch(index, image.shape[-3], channels, first_index))
            by_shape.setdefault((*image.shape, image.dtype), []).append((index, image))
        batch = _Batch(first_index, len(items), channels)
        batch.tracked = {
            index: tuple(moments.tolist() for moments in image_moments(image))
            for index, image in items if index in self.track
        }
        if not self.reduce:
            batch.groups = [([i for i, _ in group], torch.stack([im for _, im in group])) for group in by_shape.values()]
            return batch
        stats = ChannelStats.empty(channels)
        with _one_thread():
            for group in by_shape.values():
                image_bytes = group[0][1].numel() * group[0][1].element_size()
                step = max(1, _STACK_BYTES // max(1, image_bytes))
                for start in range(0, len(group), step):
                    stats = stats.merge(self._piece_stats(group[start : start + step]))
        # Plain floats, not tensors: a tensor crossing the worker queue costs a shared-memory handle each.
        batch.moments = [value.tolist() for value in stats.to_dict().values()]
        return batch

    def _piece_stats(self, piece: list[tuple[int, Tensor]]) -> ChannelStats:
        """Statistics of images of one shape, stacked into the reused buffer."""
        images = [image.detach() for _, image in piece]  # stack(out=) refuses tensors that require grad
        numel = len(images) * images[0].numel()
        self._stacked = reuse_buffer(self._stacked, numel, images[0])
        stacked = torch.stack(images, out=self._stacked[:numel].view(len(images), *images[0].shape))
        piece_stats = batch_stats(stacked)
        _check_finite(piece_stats, [index for index, _ in piece], stacked)
        return piece_stats


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Reduce with one torch thread (as DataLoader workers already do).

    In the main process (``num_workers=0``) a multi-threaded kernel on small
    blocks gains little and, beside a busy core, waits for a time slice.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _channel_mismatch(index: int, got: int, expected: int, first_index: int) -> str:
    return (
        f"Sample {index} has {got} channels, but sample {first_index} has {expected}. All images must have "
        "the same number of channels: convert them in the pipeline (for example v2.Grayscale(num_output_channels=3) "
        "or PIL's .convert('RGB'))."
    )


def _check_finite(stats: ChannelStats, indices: list[int], images: Tensor) -> None:
    if bool(torch.isfinite(stats.mean).all() and torch.isfinite(stats.m2).all()):
        return
    finite = torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
    bad = indices[int((~finite).nonzero()[0])] if not bool(finite.all()) else indices[0]
    raise ValueError(
        f"Sample {bad} contains NaN or Inf pixel values. Statistics need finite pixels: fix or drop the sample."
    )


def fit_stats(
    dataset: Dataset,
    *,
    capture: Capture | None = None,
    image: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    pin_memory: bool | None = None,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[ChannelStats], None] | None = None,
    process_group: Any = None,
    max_samples: int | None = None,
    track: Collection[int] = (),
) -> PassResult:
    """One pass over ``dataset``: the exact per-channel statistics and the number of images.

    Statistics are reduced in the DataLoader workers on the CPU, or in this
    process on ``device`` when it is an accelerator. ``indices`` restricts the
    pass to those samples (a subset); ``on_batch`` receives each batch's own
    statistics (for standard errors across batches); the images of the indices
    in ``track`` also get their own mean and variance (to verify cache hits).
    Under an initialized ``torch.distributed`` process group (or
    ``process_group``) each rank reads its own shard and every rank returns the
    merged statistics of all of them.

    An ``IterableDataset`` (a stream) is read by :mod:`torchnormfit.streams`:
    each worker and rank reads the part its stream gives it, and
    ``max_samples`` takes the first ``max_samples`` of the stream.
    """
    ranks = current_ranks(process_group)
    progress = sys.stderr.isatty() if progress is None else progress
    loader = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "pin_memory": pin_memory}
    if isinstance(dataset, IterableDataset):
        from .streams import stream_pass

        if indices is not None:
            raise TypeError(f"A stream ({type(dataset).__name__}) has no indices to choose a subset by; "
                            "pass max_samples=N to fit its first N samples.")

        def run_local(show_progress: bool) -> PassResult:
            return stream_pass(dataset, capture, image, on_batch, show_progress, max_samples=max_samples, **loader)
    else:
        _check_dataset(dataset)
        if max_samples is not None:
            raise TypeError("max_samples= of fit_stats() is for streams; for a map-style dataset pass indices=.")
        indices = range(len(dataset)) if indices is None else indices
        if ranks is not None:
            indices = shard(indices, ranks)

        def run_local(show_progress: bool) -> PassResult:
            return _local_pass(dataset, indices, capture, image, on_batch, show_progress, frozenset(track), **loader)

    result = run_local(progress) if ranks is None else _ranked_pass(ranks, lambda: run_local(progress and ranks.rank == 0))
    if result.stats is None:
        what = "the stream" if isinstance(dataset, IterableDataset) else "the subset of"
        raise ValueError(f"No samples to fit: {what} {type(dataset).__name__} is empty.")
    _warn_if_0_255(result.stats)
    return result


class PassResult(NamedTuple):
    """What a pass found: the statistics (None if it read nothing), the images read, the tracked images' moments,
    how many images FitNormalize captured, and for a stream a digest of its first images (see streams.py)."""

    stats: ChannelStats | None
    num_samples: int
    tracked: dict[int, tuple[list[float], list[float]]]
    captured: int = 0
    first: str | None = None


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
        from .streams import check_split_across_ranks

        check_split_across_ranks([part.first for _, part in outcomes])
    if not channels:
        return PassResult(None, 0, {})
    stats = local.stats if local.stats is not None else ChannelStats.empty(channels.pop())
    parts = [part for _, part in outcomes]
    tracked = {index: moments for part in parts for index, moments in part.tracked.items()}
    return PassResult(gather_merge(ranks, stats), sum(p.num_samples for p in parts), tracked,
                      sum(p.captured for p in parts))


def _local_pass(
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
) -> PassResult:
    """The DataLoader pass over ``indices``."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    device = torch.device(device) if device is not None else torch.device("cpu")
    probed, loader = _loader(dataset, indices, capture, image, track, batch_size, num_workers, device, pin_memory)
    logger.info("fitting %s: %d samples, batch_size=%d, num_workers=%d, device=%s",
                type(dataset).__name__, len(indices), loader.batch_size, num_workers, device)
    bar = tqdm(total=len(indices), unit="img", desc="torchnormfit", disable=not progress)
    with bar, running(loader) as batches:
        return reduce_batches(itertools.chain(probed, batches), device, on_batch, bar)


@contextlib.contextmanager
def running(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """The loader's batches; its worker processes are shut down at once when the pass ends or fails."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def reduce_batches(
    batches: Iterable[_Batch],
    device: torch.device,
    on_batch: Callable[[ChannelStats], None] | None,
    bar: Any,
) -> PassResult:
    """Merge each batch into one accumulator; a failure is raised as it was."""
    accumulator: BatchNormAccumulator | None = None
    first: _Batch | None = None
    num_samples, captured = 0, 0
    tracked: dict[int, tuple[list[float], list[float]]] = {}
    for batch in batches:
        if batch.failure is not None:
            batch.failure.reraise()
        if first is None:
            first, accumulator = batch, BatchNormAccumulator(batch.channels, device=device)
        elif batch.channels != first.channels:
            raise ValueError(_channel_mismatch(batch.first_index, batch.channels, first.channels, first.first_index))
        one_batch = _accumulate(accumulator, batch, device)
        if on_batch is not None:
            on_batch(one_batch)
        num_samples += batch.num_samples
        captured += batch.captured
        tracked.update(batch.tracked)
        bar.update(batch.num_samples)
    return PassResult(None if accumulator is None else accumulator.stats.to("cpu"), num_samples, tracked, captured)


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
) -> tuple[list[_Batch], DataLoader]:
    """The DataLoader of the pass, and the batches read before it.

    Without ``batch_size``, the first sample is read here: its size sets the
    batch size (:func:`default_batch_size`) and it is the first batch, so no
    sample is read twice.
    """
    reader, collate = _SampleReader(dataset, capture, image), _Collate(reduce=device.type == "cpu", track=track)
    probed: list[_Batch] = []
    if batch_size is None and len(indices) > 0:
        index, item, captured = reader[indices[0]]
        probed = [collate([(index, item, captured)])]
        if probed[0].failure is not None:  # before any worker process is started
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


def tensor_stats(images: Tensor) -> tuple[ChannelStats, int]:
    """Exact statistics of one float batch ``(..., C, H, W)`` and its number of images."""
    images = check_image(images)
    with _one_thread():
        stats = batch_stats(images)
    count = images.reshape(-1, *images.shape[-3:]).shape[0]
    _check_finite(stats, list(range(count)), images.reshape(count, -1))
    return stats, count


def _accumulate(accumulator: BatchNormAccumulator, batch: _Batch, device: torch.device) -> ChannelStats:
    """Merge one batch into the accumulator; return the batch's own statistics."""
    if batch.moments is not None:
        stats = ChannelStats(*(torch.tensor(values, dtype=torch.float64) for values in batch.moments))
        accumulator.merge(stats.to(device))
        return stats
    stats = ChannelStats.empty(batch.channels, device=device)
    for indices, images in batch.groups:
        images = images.to(device, non_blocking=True)
        group_stats = accumulator.update(images)
        _check_finite(group_stats, indices, images)
        stats = stats.merge(group_stats)
    return stats


def _check_dataset(dataset: Dataset) -> None:
    if not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"fit() needs a map-style dataset (with __len__ and __getitem__) or a torch.utils.data.IterableDataset. "
            f"Got {type(dataset).__name__}."
        )
    try:
        length = len(dataset)
    except TypeError as error:
        raise TypeError(f"fit() needs a dataset with __len__. Got {type(dataset).__name__}: {error}") from error
    if length == 0:
        raise ValueError(f"The dataset {type(dataset).__name__} is empty: there are no pixels to fit statistics on.")


def _warn_if_0_255(stats: ChannelStats) -> None:
    if float(stats.max.max()) > _LOOKS_0_255:
        warn(
            f"The pixel values reach {float(stats.max.max()):g}: the data looks scaled to 0-255, not 0-1. "
            "If that is not intended, use ToTensor() or v2.ToDtype(torch.float32, scale=True).",
            UserWarning)
