"""Streams: the fit pass over an ``IterableDataset``, what identifies a stream, and its first images.

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

webdataset and datasets are never imported here: their objects are recognised
by the modules their classes come from.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import logging
import os
import re
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .fitting import _Batch, _Collate, default_batch_size, default_num_workers
from .fingerprint import _global_names
from .fitting import PassResult, reduce_batches, running
from .samples import Capture, _Failure, read_image
from .stats import ChannelStats

__all__ = ["stream_pass", "first_images", "stream_images", "describe_source"]

logger = logging.getLogger("torchnormfit")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 8
_MAX_ITEMS = 256
_DIGESTED = 4  # first images of a worker compared with the other workers' (hashing a whole batch cost 2% of a pass)
_LIBRARY_PATHS = tuple(
    os.path.realpath(path) + os.sep
    for path in {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
)


# --- the pass ------------------------------------------------------------------------------------


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
) -> PassResult:
    """One DataLoader pass over this process's part of a stream.

    Returns the statistics (``None`` if the part was empty), the number of
    images and a digest of the first images (for :func:`check_split_across_ranks`).
    The workers batch and reduce their own samples; the first images of each
    worker are compared with the others' to refuse a stream that is not split
    across workers. ``max_samples`` reads the first ``max_samples`` of the
    stream in this process (no workers), so they are the same whatever
    ``num_workers``.
    """
    num_workers = default_num_workers() if num_workers is None else num_workers
    if max_samples is not None:
        num_workers = 0
    device = torch.device(device) if device is not None else torch.device("cpu")
    length = _length(dataset, max_samples)
    reader = _StreamReader(dataset, capture, image, batch_size, max_samples, length, num_workers)
    loader = DataLoader(
        reader, batch_size=None, num_workers=num_workers, collate_fn=_StreamCollate(reduce=device.type == "cpu"),
        pin_memory=(device.type != "cpu") if pin_memory is None else pin_memory,
    )
    logger.info("fitting the stream %s: %s samples, batch_size=%s, num_workers=%d, device=%s",
                type(dataset).__name__, "?" if length is None else length, batch_size or "auto", num_workers, device)
    bar = tqdm(total=length, unit="img", desc="torchnormfit", disable=not progress)
    firsts: dict[str, int | None] = {}
    with bar, running(loader) as batches:
        result = reduce_batches(_split_checked(batches, num_workers, firsts), device, on_batch, bar)
    return result._replace(first=next(iter(firsts), None))


def _length(dataset: IterableDataset, max_samples: int | None) -> int | None:
    """The stream's ``len()`` (capped by ``max_samples``), or None when it has none."""
    try:
        length = len(dataset)
    except TypeError:  # an IterableDataset without __len__
        return max_samples
    return length if max_samples is None else min(length, max_samples)


def _samples(
    dataset: IterableDataset, capture: Capture | None, image: Callable[[Any], Any] | None, where: Callable[[int], str]
) -> Iterator[Tensor]:
    """The image of each sample of the stream, read through :func:`~torchnormfit.samples.read_image`."""
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
            found = read_image(read, where(position), capture, image)
        except StopIteration:
            return
        yield found
        position += 1


def _where(worker: int | None) -> Callable[[int], str]:
    if worker is None:
        return lambda position: f"Sample {position}: "
    return lambda position: f"Sample {position} of DataLoader worker {worker}'s part of the stream: "


class _StreamReader(IterableDataset):
    """Yields ``(worker id, [(position, image or _Failure), ...])``: batches made in each worker.

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
    ):
        self.dataset, self.capture, self.image = dataset, capture, image
        self.batch_size, self.max_samples, self.length, self.num_workers = batch_size, max_samples, length, num_workers

    def __iter__(self) -> Iterator[tuple[int | None, list[tuple[int, Tensor | _Failure]]]]:
        info = get_worker_info()
        worker = None if info is None else info.id
        samples = _samples(self.dataset, self.capture, self.image, _where(worker))
        size, batch, position = self.batch_size, [], 0
        while self.max_samples is None or position < self.max_samples:
            try:
                item = next(samples)
            except StopIteration:
                break
            except Exception as error:
                yield worker, [*batch, (position, _Failure.capture(error))]
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
    """:class:`~torchnormfit.fitting._Collate` on a worker's batch, with a digest of the worker's first images."""

    def __init__(self, reduce: bool):
        self.collate = _Collate(reduce)

    def __call__(self, tagged: tuple[int | None, list[tuple[int, Any]]]) -> tuple[int | None, str | None, _Batch]:
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
    tagged: Iterable[tuple[int | None, str | None, _Batch]], num_workers: int, firsts: dict[str, int | None]
) -> Iterator[_Batch]:
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
    dataset: IterableDataset, n: int, capture: Capture | None = None, image: Callable[[Any], Any] | None = None
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
    return list(itertools.islice(stream_images(dataset, capture, image), n))


def stream_images(
    dataset: IterableDataset, capture: Capture | None = None, image: Callable[[Any], Any] | None = None
) -> Iterator[Tensor]:
    """The images of a stream's samples in order, read in this process as :func:`first_images` reads them."""
    return _samples(dataset, capture, image, _where(None))


# --- what identifies a stream --------------------------------------------------------------------


def describe_source(dataset: Any) -> dict[str, Any] | None:
    """What identifies a WebDataset pipeline or a Hugging Face dataset; None for any other dataset.

    - WebDataset (``wds.WebDataset`` or any ``wds.DataPipeline``): its stages in
      order, with the shard URLs (and each local shard's size and mtime) and
      the functions and transforms of ``.map()``, ``.map_tuple()``,
      ``.decode()``... A shuffle is described by its buffer, not its seed: the
      order does not change the statistics.
    - Hugging Face ``datasets.Dataset``: its ``_fingerprint``, or, after
      ``set_transform``/``with_transform`` (whose fingerprint hashes the
      transform closure, a FitNormalize's fitted state and cache path
      included), the fingerprint of the same data without the transform plus
      a description of the transform.
    - Hugging Face ``datasets.IterableDataset`` (no ``_fingerprint``): its
      chain of examples iterables: the data (shards as above, data files with
      size and mtime), ``.map()`` functions and their settings, features,
      format and ``split_dataset_by_node`` settings. A source made by a Python
      generator is known only by the generator's code and arguments: pass
      ``key=`` if its data can change.

    Functions are described by their code, closure and the global values they
    use, unless they come from an installed library (then by name); a
    FitNormalize anywhere in them is described by its class name only.
    """
    if _from_library(dataset, "webdataset") and isinstance(getattr(dataset, "pipeline", None), list):
        return {"webdataset": [_describe(stage, 1) for stage in dataset.pipeline]}
    if _from_library(dataset, "datasets"):
        if hasattr(dataset, "_ex_iterable"):
            return {"huggingface_iterable": _describe_hf_iterable(dataset)}
        if hasattr(dataset, "_fingerprint") and hasattr(dataset, "_format_kwargs"):
            return {"huggingface": _describe_hf_dataset(dataset)}
    return None


def _from_library(value: Any, library: str) -> bool:
    return any(cls.__module__.split(".")[0] == library for cls in type(value).__mro__)


def _describe_hf_dataset(dataset: Any) -> dict[str, Any]:
    transform = dataset._format_kwargs.get("transform")
    if transform is None:
        data = dataset._fingerprint
    else:
        from datasets.fingerprint import generate_fingerprint

        plain = copy.copy(dataset)
        plain._format_kwargs = {k: v for k, v in dataset._format_kwargs.items() if k != "transform"}
        data = generate_fingerprint(plain)
    return {
        "fingerprint": data,
        "format": dataset._format_type,
        "columns": _describe(dataset._format_columns),
        "output_all_columns": dataset._output_all_columns,
        "transform": _describe(transform, 1),
    }


def _describe_hf_iterable(dataset: Any) -> dict[str, Any]:
    formatting = getattr(dataset, "_formatting", None)
    distributed = getattr(dataset, "_distributed", None)
    return {
        "examples": _describe(dataset._ex_iterable, 1),
        "features": str(getattr(dataset._info, "features", None)),
        "format": getattr(formatting, "format_type", None),
        "distributed": None if distributed is None else _describe(vars(distributed), 1),
    }


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able, process-independent description of a stage, function, transform or value."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (str, os.PathLike)):
        return _describe_path(os.fspath(value))
    if depth > _MAX_DEPTH:
        return _class_name(value)
    if isinstance(value, (list, tuple)):
        listed = [_describe(item, depth + 1) for item in value[:_MAX_ITEMS]]
        return listed if len(value) <= _MAX_ITEMS else {"length": len(value), "first": listed}
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, (_describe(item, depth + 1) for item in value)))
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha": _digest([value.reshape(1, 1, -1)])}
    if any(cls.__name__ == "FitNormalize" for cls in type(value).__mro__):
        return "FitNormalize"  # its fitted state and cache path do not change what it measures
    source = describe_source(value)
    if source is not None:
        return source
    return _describe_object(value, depth)


def _describe_object(value: Any, depth: int) -> Any:
    if isinstance(value, functools.partial):
        return {"partial": _describe(value.func, depth + 1), "args": _describe(value.args, depth + 1),
                "keywords": _describe(value.keywords, depth + 1)}
    if isinstance(value, types.MethodType):
        return {"method": _describe(value.__func__, depth + 1), "self": _describe(value.__self__, depth + 1)}
    if isinstance(value, types.FunctionType):
        return _describe_function(value, depth)
    if isinstance(value, (type, types.ModuleType, types.BuiltinFunctionType)) or not hasattr(value, "__dict__"):
        return _ADDRESS.sub("", repr(value)) if not isinstance(value, type) else _qualname(value)
    if _is_shuffle(value):
        return {"shuffle": _describe(value.args, depth + 1)}
    attributes = {k: v for k, v in vars(value).items() if not k.startswith("_") and k != "training"}
    return {"class": _class_name(value), **_describe(attributes, depth)}


def _is_shuffle(value: Any) -> bool:
    """WebDataset's shuffle stage, whose seed is drawn at random when none is given."""
    return _from_library(value, "webdataset") and getattr(getattr(value, "f", None), "__name__", "") == "_shuffle"


def _describe_function(function: types.FunctionType, depth: int) -> Any:
    """A library function by its name; your own by its code, closure and the globals it reads."""
    name = _qualname(function)
    path = getattr(sys.modules.get(function.__module__), "__file__", None)
    if path and os.path.realpath(path).startswith(_LIBRARY_PATHS):
        return name
    code = function.__code__
    globals_used = {
        n: function.__globals__[n] for n in sorted(_global_names(code))
        if n in function.__globals__ and not isinstance(function.__globals__[n], types.ModuleType)
    }
    cells = [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
    return {
        "function": name,
        "code": _code_digest(code),
        "closure": _describe(cells, depth + 1),
        "globals": _describe(globals_used, depth + 1),
        "defaults": _describe(function.__defaults__, depth + 1),
    }


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _code_digest(code: types.CodeType) -> str:
    hasher = hashlib.sha256(code.co_code)
    hasher.update(repr((code.co_names, code.co_varnames)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            hasher.update(_code_digest(const).encode())
        elif isinstance(const, frozenset):
            hasher.update(repr(sorted(map(repr, const))).encode())
        else:
            hasher.update(repr(const).encode())
    return hasher.hexdigest()[:32]


def _describe_path(text: str) -> Any:
    """A local file as its absolute path, size and mtime; any other string as it is."""
    if len(text) > 4096 or "\n" in text or not os.path.isfile(text):
        return text
    stat = os.stat(text)
    return {"file": os.path.abspath(text), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _qualname(value: Any) -> str:
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"


def _class_name(value: Any) -> str:
    return _qualname(type(value))
