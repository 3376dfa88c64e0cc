"""The stream pass: a DataLoader pass over an ``IterableDataset``, and a stream's first images.

A stream (WebDataset shards, a Hugging Face ``IterableDataset``, your own
``IterableDataset``) has no indices, so nothing here can hand each DataLoader
worker or torch.distributed rank its share. The rule: **the stream splits
itself**. Each worker must yield its own part (WebDataset's
``split_by_worker``, the default of ``wds.WebDataset``; Hugging Face's shards;
``torch.utils.data.get_worker_info()`` in your own ``__iter__``), and under
torch.distributed each rank must read its own part (WebDataset's
``split_by_node``, ``datasets.distributed.split_dataset_by_node``, or your
own). A stream whose workers all start with the same samples is refused
instead of counted ``num_workers`` times.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..reduce import Reduction
from ..stats import ChannelStats
from .loader import (
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

__all__ = ["stream_pass", "stream_workers", "num_shards", "first_images", "stream_images", "check_split_across_ranks"]

logger = logging.getLogger("torchnormfit")

_DIGESTED = 4  # first images of a worker compared with the other workers' (hashing a whole batch cost 2% of a pass)


def stream_pass(
    dataset: IterableDataset,
    capture: Capture | None,
    image: Callable[[Any], Any] | None,
    on_batch: Callable[[ChannelStats], None] | None,
    progress: bool,
    *,
    batch_size: int | None,
    num_workers: int | None,
    device: torch.device | str | None,
    pin_memory: bool | None,
    max_samples: int | None,
    reduction: Reduction | None = None,
) -> PassResult:
    """One DataLoader pass over this process's part of a stream.

    Returns the statistics (``None`` if the part was empty), the number of
    images and a digest of the first images (for :func:`check_split_across_ranks`).
    The workers batch and reduce their own samples; the first images of each
    worker are compared with the others' to refuse a stream that is not split
    across workers. ``max_samples`` reads the first ``max_samples`` of the
    stream in this process (no workers), so they are the same whatever
    ``num_workers``; else :func:`stream_workers` caps them at the shards.
    """
    num_workers = 0 if max_samples is not None else stream_workers(dataset, num_workers)
    device = torch.device(device) if device is not None else torch.device("cpu")
    length = _length(dataset, max_samples)
    reader = _StreamReader(dataset, capture, image, batch_size, max_samples, length, num_workers, reduction)
    loader = DataLoader(
        reader, batch_size=None, num_workers=num_workers,
        collate_fn=_StreamCollate(reduce=device.type == "cpu", reduction=reduction),  # type: ignore[arg-type]
        pin_memory=(device.type != "cpu") if pin_memory is None else pin_memory,
    )
    logger.info("fitting the stream %s: %s samples, batch_size=%s, num_workers=%d, device=%s",
                type(dataset).__name__, "?" if length is None else length, batch_size or "auto", num_workers, device)
    bar = tqdm(total=length, unit="img", desc="torchnormfit", disable=not progress)
    firsts: dict[str, int | None] = {}
    with bar, running(loader) as batches:
        result = reduce_batches(_split_checked(batches, num_workers, firsts), device, on_batch, bar, reduction)
    return result._replace(first=next(iter(firsts), None))


def stream_workers(dataset: IterableDataset, num_workers: int | None = None) -> int:
    """The DataLoader workers of a pass over ``dataset``: ``num_workers`` (default :func:`default_num_workers`), at
    most its number of shards (:func:`num_shards`), since a worker without a shard would only idle (and WebDataset
    refuses a worker that finds no samples).

    Examples
    --------
    >>> class Stream(torch.utils.data.IterableDataset):
    ...     num_shards = 2
    ...     def __iter__(self):
    ...         return iter(())
    >>> stream_workers(Stream(), 8), stream_workers(Stream(), 1)
    (2, 1)
    """
    workers = default_num_workers() if num_workers is None else num_workers
    shards = num_shards(dataset)
    if shards is not None and shards < workers:
        logger.info("%d DataLoader workers for the %d shard(s) of %s", shards, shards, type(dataset).__name__)
        return shards
    return workers


def num_shards(dataset: IterableDataset) -> int | None:
    """How many parts a stream splits into across workers; None when it does not say.

    A stream's own ``num_shards`` (a Hugging Face ``IterableDataset``), or the
    length of the shard list that starts a pipeline (``wds.WebDataset``, a
    ``wds.DataPipeline`` beginning with ``SimpleShardList``; resampled shards
    have no length: any number of workers can draw from them).
    """
    shards = getattr(dataset, "num_shards", None)
    if isinstance(shards, int) and not isinstance(shards, bool):
        return shards
    stages = getattr(dataset, "pipeline", None)
    if isinstance(stages, list) and stages and hasattr(stages[0], "urls"):
        try:
            return len(stages[0])
        except TypeError:
            return None
    return None


def _length(dataset: IterableDataset, max_samples: int | None) -> int | None:
    """The stream's ``len()`` (capped by ``max_samples``), or None when it has none."""
    try:
        length = dataset_length(dataset)
    except TypeError:  # an IterableDataset without __len__
        return max_samples
    return length if max_samples is None else min(length, max_samples)


def _samples(
    dataset: IterableDataset, capture: Capture | None, image: Callable[[Any], Any] | None, where: Callable[[int], str],
    reduction: Reduction | None = None,
) -> Generator[Tensor, None, None]:
    """The image of each sample of the stream, read through :func:`~torchnormfit.passes.loader.read_image`."""
    if capture is not None:
        capture.stop = False  # an exception would end the stream's generator: FitNormalize only hands over
    stream: Iterator[Any] | None = None

    def read() -> Any:
        nonlocal stream
        if stream is None:
            stream = iter(dataset)
        return next(stream)

    position = 0
    while True:
        try:
            found = read_image(read, where(position), capture, image, reduction)
        except StopIteration:
            return
        yield found
        position += 1


def _where(worker: int | None) -> Callable[[int], str]:
    if worker is None:
        return lambda position: f"Sample {position}: "
    return lambda position: f"Sample {position} of DataLoader worker {worker}'s part of the stream: "


class _StreamReader(IterableDataset):
    """Yields ``(worker id, [(position, image or Failure), ...])``: batches made in each worker.

    Without ``batch_size``, the first image sets it (:func:`default_batch_size`),
    so no sample is read twice. A failure ends the worker's batches.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        capture: Capture | None,
        image: Callable[[Any], Any] | None,
        batch_size: int | None,
        max_samples: int | None,
        length: int | None,
        num_workers: int,
        reduction: Reduction | None = None,
    ):
        self.dataset, self.capture, self.image, self.reduction = dataset, capture, image, reduction
        self.batch_size, self.max_samples, self.length, self.num_workers = batch_size, max_samples, length, num_workers

    def __iter__(self) -> Iterator[tuple[int | None, list[tuple[int, Tensor | Failure]]]]:
        info = get_worker_info()
        worker = None if info is None else info.id
        samples = _samples(self.dataset, self.capture, self.image, _where(worker), self.reduction)
        size, position = self.batch_size, 0
        batch: list[tuple[int, Tensor | Failure]] = []
        while self.max_samples is None or position < self.max_samples:
            try:
                item = next(samples)
            except StopIteration:
                break
            except Exception as error:
                yield worker, [*batch, (position, Failure.capture(error))]
                return
            size = size or default_batch_size(item, self.length, self.num_workers)
            batch.append((position, item))
            position += 1
            if len(batch) == size:
                yield worker, batch
                batch = []
        if batch:
            yield worker, batch


class _StreamCollate:
    """:class:`~torchnormfit.passes.loader.Collate` on a worker's batch, with a digest of the worker's first images."""

    def __init__(self, reduce: bool, reduction: Reduction | None = None):
        self.collate = Collate(reduce, reduction=reduction)

    def __call__(self, tagged: tuple[int | None, list[tuple[int, Any]]]) -> tuple[int | None, str | None, Batch]:
        worker, items = tagged
        batch = self.collate([(position, image, False) for position, image in items])
        first = items[0][0] == 0 and batch.failure is None
        return worker, _digest([image for _, image in items[:_DIGESTED]]) if first else None, batch


def _digest(images: list[Tensor]) -> str:
    hasher = hashlib.sha256()
    for image in images:
        hasher.update(f"{tuple(image.shape)} {image.dtype}".encode())
        hasher.update(image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _split_checked(
    tagged: Iterable[tuple[int | None, str | None, Batch]], num_workers: int, firsts: dict[str, int | None]
) -> Iterator[Batch]:
    """The batches, refusing a stream whose workers start with the same images (it is not split).

    ``firsts`` maps the digest of each worker's first images to the worker, in the order received.
    """
    for worker, digest, batch in tagged:
        if digest is not None and firsts.setdefault(digest, worker) != worker:
            raise ValueError(
                f"DataLoader workers {firsts[digest]} and {worker} both started the stream with the same "
                f"{min(batch.num_samples, _DIGESTED)} sample(s): it is not split across workers, so each of the "
                f"{num_workers} workers would read every sample. Make each worker yield its own part: in your "
                "own IterableDataset, use torch.utils.data.get_worker_info() in __iter__ (for example "
                "itertools.islice(samples, info.id, None, info.num_workers)); in a webdataset.DataPipeline, add "
                "wds.split_by_worker after the shard list; for Hugging Face, to_iterable_dataset(num_shards=N) "
                "with N >= num_workers. Or pass num_workers=0."
            )
        yield batch


def check_split_across_ranks(firsts: list[str | None]) -> None:
    """Raise if two torch.distributed ranks started their streams alike (``firsts``: first-batch digests by rank)."""
    seen: dict[str, int] = {}
    for rank, digest in enumerate(firsts):
        if digest is not None and seen.setdefault(digest, rank) != rank:
            raise ValueError(
                f"Ranks {seen[digest]} and {rank} both started the stream with the same samples: it is not split "
                "across ranks, so every rank would read every sample. Give each rank its own part: "
                "wds.WebDataset(urls, nodesplitter=wds.split_by_node), "
                "datasets.distributed.split_dataset_by_node(dataset, rank, world_size), "
                "or torch.distributed.get_rank() in your own __iter__."
            )


def first_images(
    dataset: IterableDataset, n: int, capture: Capture | None = None, image: Callable[[Any], Any] | None = None,
    reduction: Reduction | None = None,
) -> list[Tensor]:
    """The images of the first ``n`` samples of a stream, read in this process (no workers).

    Each is the image ``capture`` received from a FitNormalize in the
    stream's pipeline, else the one found in the sample as the fit finds it
    (``image(sample)`` or :func:`~torchnormfit.images.find_image`). Fewer if
    the stream is shorter. Errors name the sample (``Sample 3: ...``).

    Examples
    --------
    >>> class Stream(torch.utils.data.IterableDataset):
    ...     def __iter__(self):
    ...         return iter(torch.ones(5, 3, 2, 2).unbind(0))
    >>> len(first_images(Stream(), 2))
    2
    """
    return list(itertools.islice(stream_images(dataset, capture, image, reduction), n))


def stream_images(
    dataset: IterableDataset, capture: Capture | None = None, image: Callable[[Any], Any] | None = None,
    reduction: Reduction | None = None,
) -> Generator[Tensor, None, None]:
    """The images of a stream's samples in order, read in this process as :func:`first_images` reads them."""
    return _samples(dataset, capture, image, _where(None), reduction)
