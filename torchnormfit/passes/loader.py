"""What both passes share: reading one sample, the DataLoader's batches, and merging them exactly.

A sample's image is the one FitNormalize captures in the dataset's pipeline, else the one found in the sample;
errors are named by sample. The DataLoader workers read samples, group a batch's images by shape and reduce
them (:class:`Collate`), and send back a few floats per batch (:class:`Batch`); :func:`reduce_batches` merges
them exactly in this process. Errors raised in the workers travel back as data (:class:`Failure`), so the user
gets the original exception type and a ``Sample 7: ...`` message instead of DataLoader's wrapper.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import pickle
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._warn import warn
from ..accumulator import BatchNormAccumulator
from ..images import (
    check_image,
    check_mask,
    find_image,
    find_mask,
    moment_image,
    planar,
)
from ..reduce import Reduction, batch_stats, check_finite, reuse_buffer
from ..stats import ChannelStats, ValueCounts
from ..verification import image_moments

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Batch",
    "Capture",
    "Collate",
    "Failure",
    "Item",
    "PassResult",
    "Reading",
    "SampleMismatch",
    "ScaleProbe",
    "dataset_length",
    "default_batch_size",
    "default_num_workers",
    "own_moments",
    "read_image",
    "read_images",
    "reduce_batches",
    "running",
    "tensor_stats",
]

DEFAULT_BATCH_SIZE = 64  # for subsets' groups and the file check; fit() picks its own (default_batch_size)
_BATCH_BYTES = 64 << 20  # see default_batch_size
_MAX_BATCH_SIZE = 256
_BATCHES_PER_WORKER = 16
_PROBED = 4096  # pixels of an image the scale probe counts (ScaleProbe)
_STACK_BYTES = 8 << 20  # images stacked and reduced at a time in a worker


class Capture:
    """Where the FitNormalize being fitted hands over the image it sees in a sample.

    During a fit, the FitNormalize inside the dataset's own pipeline offers each
    image here instead of normalizing it, and the sample stops right there
    (:class:`_Captured` unwinds the dataset's ``__getitem__``): the transforms
    after it cost nothing and cannot change what is measured, and a dataset
    that memoizes its samples never keeps a pass-through one. The stop is
    raised once per sample, so a dataset that swallows it (a bare ``except:``
    that retries) cannot loop.

    A stream's sample cannot be stopped (the exception would end its
    generator): with ``stop=False`` the image is copied, in case a later
    transform works in place, and passed on unchanged.
    """

    def __init__(self, stop: bool = True) -> None:
        self.stop = stop
        self.image: Tensor | None = None
        self.stopped = False
        self.took = False
        self.mask_source: Any = None
        """``fit(mask=...)``: FitNormalize looks for the mask in what reaches it (see FitNormalize.forward)."""
        self.mask: Any = None
        self.taken_mask: Any = None

    def offer(self, image: Tensor) -> Tensor:
        if self.image is None:
            self.image = image if self.stop else image.clone()
        if self.stop and not self.stopped:
            self.stopped = True
            raise _Captured
        return image

    def take(self) -> Tensor | None:
        """The image offered since the last take (None if none); ``took`` says whether there was one.

        The mask found beside it, if one was asked for, is then ``taken_mask``.
        """
        image, self.image, self.stopped = self.image, None, False
        self.taken_mask, self.mask = self.mask, None
        self.took = image is not None
        return image


class _Captured(BaseException):
    """Stops reading a sample once the FitNormalize being fitted has its image (not an ``Exception``, so a
    dataset that catches ``Exception`` to skip bad files lets it through)."""


class SampleMismatch(ValueError):
    """Two samples of a pass that cannot be fitted together: different channel counts, or integer and float images.

    ``index`` is the sample that differs, ``first_index`` the one it differs from; ``kind`` is ``"channels"`` or
    ``"units"``, ``got`` and ``expected`` are theirs (channel counts, or ``"integer"`` and ``"float"``). Built from
    its message alone (as DataLoader re-raises a worker's error), all four are None.

    Examples
    --------
    >>> error = SampleMismatch("Sample 6 has 1 channels, but sample 0 has 3.", 6, 0, "channels", 1, 3)
    >>> error.index, error.first_index, isinstance(error, ValueError)
    (6, 0, True)
    """

    def __init__(self, message: str, index: int | None = None, first_index: int | None = None,
                 kind: str | None = None, got: Any = None, expected: Any = None):
        super().__init__(message)  # args is the message alone: pickling restores the rest from __dict__
        self.index, self.first_index = index, first_index
        self.kind, self.got, self.expected = kind, got, expected


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a DataLoader worker (as in ``concurrent.futures``)."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class Failure:
    """An error raised while reading or reducing samples, sent back as data.

    Raising it in the main process gives the user the original exception type and
    message (``Sample 7: ...``) instead of DataLoader's worker wrapper, with the
    worker's traceback attached as the cause.
    """

    error: Exception
    traceback: str

    @classmethod
    def capture(cls, error: Exception) -> Failure:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        try:
            pickle.dumps(error)
        except Exception:  # it must cross the worker queue
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return cls(error, text)

    def reraise(self) -> NoReturn:
        raise self.error from _RemoteTraceback(f'\n"""\n{self.traceback}"""')


def read_image(
    read: Callable[[], Any], where: str, capture: Capture | None, image: Callable[[Any], Any] | None,
    reduction: Reduction | None = None,
) -> Tensor:
    """Read one sample with ``read()`` and return its image tensor, checked.

    The image a FitNormalize in the pipeline captured, else the one found in
    the sample (``image(sample)`` or :func:`find_image`). Every error names
    the sample with ``where`` (``"Sample 7: "``). The map-style and the
    stream readers both read through here; a stream's ``StopIteration``
    passes through unchanged. Under a ``reduction`` integer images are kept as
    they are, a volume comes back as the image ``(C, D*H, W)``, and a mask
    as a last channel (``(C + 1, H, W)``, in the image's dtype).
    """
    reduction = reduction or Reduction()
    if capture is not None:
        capture.take()
        capture.mask_source = reduction.mask
    try:
        sample = read()
    except _Captured:  # FitNormalize has the image: the rest of the sample is not built
        assert capture is not None  # only a Capture raises it
        return _with_mask(capture.take(), capture.taken_mask, where, reduction)
    except StopIteration:
        raise
    except Exception as error:
        named = _naming_sample(error, where)
        if named is error:
            raise
        raise named from error
    captured = capture.take() if capture is not None else None
    if capture is not None and captured is not None:
        if capture.stop:
            _warn_swallowed_stop()
        return _with_mask(captured, capture.taken_mask, where, reduction)
    found = image(sample) if image is not None else find_image(sample)
    if found is None:
        raise TypeError(
            f"{where}found no image tensor in a sample of type {type(sample).__name__}. "
            "Return a tensor, a tv_tensors.Image or a tuple/dict holding one, or pass image=... to fit()."
        )
    mask = find_mask(sample, reduction.mask, where) if reduction.masked else None
    return _with_mask(found, mask, where, reduction)


def _with_mask(found: Any, mask: Any, where: str, reduction: Reduction) -> Tensor:
    """The checked image, planar, with its mask as a last channel when the reduction wants one."""
    image = check_image(found, where, integer=True, spatial_dims=reduction.spatial_dims)
    if not reduction.masked:
        return planar(image, reduction.spatial_dims)
    if image.ndim != reduction.spatial_dims + 1:
        raise ValueError(f"{where}with mask=, each sample holds one image (C, ...). Got {tuple(image.shape)}.")
    kept = check_mask(mask, image, where, reduction.spatial_dims).to(image.dtype)
    return planar(torch.cat([image, kept]), reduction.spatial_dims)


def _warn_swallowed_stop() -> None:
    warn(
        "The dataset's __getitem__ caught the signal FitNormalize raises to stop a sample once it has its image "
        "(a bare 'except:' or 'except BaseException:'). The statistics are right, but a dataset that memoizes "
        "samples may now hold un-normalized ones from this fit: catch Exception instead, or clear its memo.",
        UserWarning)


def _naming_sample(error: Exception, where: str) -> Exception:
    """The same kind of error, its message starting with the sample index.

    An exception class that cannot be built from one message is kept whole
    (its own attributes may matter to the caller), with the index in a note.
    """
    try:
        return type(error)(f"{where}reading the dataset failed: {error}")
    except Exception:
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"{where}reading the dataset failed")
        return error


def read_images(
    dataset: Dataset, indices: Sequence[int], capture: Capture | None = None, image: Callable[[Any], Any] | None = None,
    reduction: Reduction | None = None,
) -> list[Tensor]:
    """The images of ``dataset[i]`` for ``i`` in ``indices``, read here, one by one (to verify a cache hit)."""
    return [read_image(functools.partial(operator.getitem, dataset, index), f"Sample {index}: ", capture, image,
                       reduction)
            for index in indices]


def dataset_length(dataset: Dataset) -> int:
    """``len(dataset)`` of a map-style dataset (torch's ``Dataset`` does not declare ``__len__``)."""
    return len(cast(Sized, dataset))


def own_moments(image: Tensor) -> tuple[list[float], list[float]]:
    """An image's own per-channel mean and variance, as plain floats (kept to verify cache hits)."""
    mean, var = image_moments(image)
    return mean.tolist(), var.tolist()


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


Reading = tuple[list[float], list[float]]
"""One reading of an image: its per-channel mean and variance, as plain floats (:func:`own_moments`)."""

Item = tuple[int, Tensor | Failure, bool, list[Reading]]
"""A sample as a worker reads it: ``(index, image or failure, whether FitNormalize captured the image, the moments
of its further readings)`` (those only for a tracked image)."""


class ScaleProbe(NamedTuple):
    """Pixels of a few images (the first of each batch): how many, how many above 1, how many not whole numbers.

    Enough to tell data scaled to 0-255 (most pixels above 1, and whole numbers or far above 1) from float data
    that merely exceeds 1 somewhere. At most ``_PROBED`` evenly spaced pixels of an image are counted: the whole
    image cost 6% of a worker's reduction of 64 images of 3x224x224.
    """

    pixels: int = 0
    above_one: int = 0
    fractional: int = 0

    @classmethod
    def of(cls, image: Tensor) -> ScaleProbe:
        """The counts of one image."""
        flat = image.detach().reshape(-1)
        flat = flat[:: max(1, flat.numel() // _PROBED)]
        fractional = int((flat != flat.round()).sum()) if flat.is_floating_point() else 0
        return cls(flat.numel(), int((flat > 1).sum()), fractional)

    def merge(self, other: ScaleProbe) -> ScaleProbe:
        """The counts of both."""
        return ScaleProbe(*(a + b for a, b in zip(self, other)))


@dataclass
class Batch:
    """What a worker sends back for one batch: statistics, or the images themselves."""

    first_index: int
    num_samples: int
    channels: int
    moments: list[list[float]] | None = None  # the batch's ChannelStats as plain floats (see Collate)
    groups: list[tuple[list[int], Tensor]] | None = None
    failure: Failure | None = None
    tracked: dict[int, list[Reading]] = field(default_factory=dict)
    """Per-image moments of the batch's tracked images, each reading of them (to verify cache hits)."""
    captured: int = 0
    """Images that the FitNormalize being fitted captured (the others were found in the sample)."""
    probe: ScaleProbe = ScaleProbe()
    """The scale of the batch's first image (see :class:`ScaleProbe`)."""
    values: ValueCounts | None = None
    """The batch's value counts, when the reduction counts values (clip=)."""
    integer: bool = False
    """Whether the batch's images are integers (fitted in their own units)."""


class Collate:
    """Groups a batch's images by shape (so sizes may differ) and reduces them to statistics.

    Runs in the DataLoader workers, so the statistics cost is spread over them and
    only a few numbers per batch travel back. Each group is stacked and reduced
    at most ``_STACK_BYTES`` at a time, into a buffer reused from batch to batch.
    With ``reduce=False`` (an accelerator does the reduction) it returns the
    stacked groups instead.
    """

    def __init__(self, reduce: bool, track: frozenset[int] = frozenset(), reduction: Reduction | None = None):
        self.reduce = reduce
        self.track = track
        self.reduction = reduction or Reduction()
        self._stacked: Tensor | None = None

    def __call__(self, items: Sequence[Item]) -> Batch:
        for index, item, _, _ in items:
            if isinstance(item, Failure):
                return Batch(index, 0, 0, failure=item)
        try:
            batch = self._reduce([(index, image) for index, image, _, _ in items if not isinstance(image, Failure)])
        except Exception as error:
            return Batch(items[0][0], 0, 0, failure=Failure.capture(error))
        batch.captured = sum(captured for _, _, captured, _ in items)
        for index, _, _, again in items:
            if index in batch.tracked:
                batch.tracked[index].extend(again)
        return batch

    def _reduce(self, items: Sequence[tuple[int, Tensor]]) -> Batch:
        first_index, first = items[0]
        channels = first.shape[-3] - self.reduction.masked
        by_shape: dict[tuple[Any, ...], list[tuple[int, Tensor]]] = {}
        for index, image in items:
            if image.shape[-3] - self.reduction.masked != channels:
                raise _channel_mismatch(index, image.shape[-3] - self.reduction.masked, channels, first_index)
            if image.is_floating_point() != first.is_floating_point():
                raise _units_mismatch(index, not image.is_floating_point(), first_index,
                                      f" ({image.dtype}, sample {first_index} {first.dtype})")
            by_shape.setdefault((*image.shape, image.dtype), []).append((index, image))
        masked = self.reduction.masked
        with _one_thread():  # a few images: threads gain nothing, and a forked process may have no thread pool
            probe = ScaleProbe.of(moment_image(first, masked)) if first.is_floating_point() else ScaleProbe()
            tracked = {index: [own_moments(moment_image(image, masked))] for index, image in items
                       if index in self.track}
        batch = Batch(first_index, len(items), channels, tracked=tracked, probe=probe,
                      integer=not first.is_floating_point())
        if not self.reduce:
            batch.groups = [([i for i, _ in group], torch.stack([im for _, im in group]))
                            for group in by_shape.values()]
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
        batch.values = stats.values
        return batch

    def _piece_stats(self, piece: list[tuple[int, Tensor]]) -> ChannelStats:
        """Statistics of images of one shape, stacked into the reused buffer."""
        images = [image.detach() for _, image in piece]  # stack(out=) refuses tensors that require grad
        numel = len(images) * images[0].numel()
        self._stacked = reuse_buffer(self._stacked, numel, images[0])
        stacked = torch.stack(images, out=self._stacked[:numel].view(len(images), *images[0].shape))
        piece_stats = self.reduction.stats(stacked)
        check_finite(piece_stats, [index for index, _ in piece], stacked)
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


def _channel_mismatch(index: int, got: int, expected: int, first_index: int) -> SampleMismatch:
    return SampleMismatch(
        f"Sample {index} has {got} channels, but sample {first_index} has {expected}. All images must have "
        "the same number of channels: convert them in the pipeline (for example v2.Grayscale(num_output_channels=3) "
        "or PIL's .convert('RGB')).", index, first_index, "channels", got, expected,
    )


def _units_mismatch(index: int, integer: bool, first_index: int, dtypes: str = "") -> SampleMismatch:
    got, expected = ("integer", "float") if integer else ("float", "integer")
    return SampleMismatch(
        f"Sample {index} holds {got} images, but sample {first_index} {expected} ones{dtypes}: integer images are "
        "fitted in their own units, float images in theirs. Convert them all alike in the pipeline (v2.ToDtype).",
        index, first_index, "units", got, expected,
    )


class PassResult(NamedTuple):
    """What a pass found: the statistics (None if it read nothing), the images read, the tracked images' moments,
    how many images FitNormalize captured, for a stream a digest of its first images (see streamed.py), the
    :class:`ScaleProbe` of the first image of each batch, and whether the images were integers."""

    stats: ChannelStats | None
    num_samples: int
    tracked: dict[int, list[Reading]]
    captured: int = 0
    first: str | None = None
    probe: ScaleProbe = ScaleProbe()
    integer: bool = False


@contextlib.contextmanager
def running(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """The loader's batches; its worker processes are shut down at once when the pass ends or fails.

    DataLoader has no public close: its iterator shuts its workers down when collected, which a traceback that
    holds the iterator delays, so this calls what that collection calls (and nothing if the name goes away).
    """
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def reduce_batches(
    batches: Iterable[Batch],
    device: torch.device,
    on_batch: Callable[[ChannelStats], None] | None,
    bar: Any,
    reduction: Reduction | None = None,
) -> PassResult:
    """Merge each batch into one accumulator; a failure is raised as it was."""
    reduction = reduction or Reduction()
    accumulator: BatchNormAccumulator | None = None
    first: Batch | None = None
    num_samples, captured, probe = 0, 0, ScaleProbe()
    tracked: dict[int, list[Reading]] = {}
    for batch in batches:
        if batch.failure is not None:
            batch.failure.reraise()
        if first is None or accumulator is None:
            first, accumulator = batch, BatchNormAccumulator(batch.channels, device=device)
        elif batch.channels != first.channels:
            raise _channel_mismatch(batch.first_index, batch.channels, first.channels, first.first_index)
        elif batch.integer != first.integer:
            raise _units_mismatch(batch.first_index, batch.integer, first.first_index)
        with _one_thread():  # small merges: a second thread only adds waits (60x on a busy machine)
            one_batch = _accumulate(accumulator, batch, device, reduction)
        if on_batch is not None:
            on_batch(one_batch)
        num_samples += batch.num_samples
        captured += batch.captured
        probe = probe.merge(batch.probe)
        tracked.update(batch.tracked)
        bar.update(batch.num_samples)
    stats = None if accumulator is None else accumulator.stats.to("cpu")
    return PassResult(stats, num_samples, tracked, captured, probe=probe, integer=first is not None and first.integer)


def tensor_stats(images: Tensor) -> tuple[ChannelStats, int]:
    """Exact statistics of one float batch ``(..., C, H, W)`` and its number of images."""
    images = check_image(images)
    with _one_thread():
        stats = batch_stats(images)
    count = images.reshape(-1, *images.shape[-3:]).shape[0]
    check_finite(stats, list(range(count)), images.reshape(count, -1))
    return stats, count


def _accumulate(accumulator: BatchNormAccumulator, batch: Batch, device: torch.device,
                reduction: Reduction) -> ChannelStats:
    """Merge one batch into the accumulator; return the batch's own statistics."""
    if batch.moments is not None:
        count, mean, m2, low, high = (torch.tensor(values, dtype=torch.float64) for values in batch.moments)
        stats = ChannelStats(count, mean, m2, low, high, values=batch.values)
        accumulator.merge(stats.to(device))
        return stats
    stats = ChannelStats.empty(batch.channels, device=device)
    for indices, images in batch.groups or ():
        images = images.to(device, non_blocking=True)
        group_stats = reduction.stats(images)
        check_finite(group_stats, indices, images)
        accumulator.merge(group_stats)
        stats = stats.merge(group_stats)
    return stats
