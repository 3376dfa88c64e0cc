"""A deterministic cache key for (dataset, pipeline up to FitNormalize, settings).

Nothing here reads a sample through ``__getitem__`` and nothing depends on the
process (no ``hash()``, no memory addresses), so the same dataset gets the same
key in every run, and a different length, root, content digest or preceding
transform gets another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

__all__ = ["fingerprint", "describe_dataset", "describe_pipeline"]

_TRANSFORM_ATTRS = {"transform", "target_transform", "transforms"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PIECES, _PIECE_BYTES = 4096, 256  # what a tensor's digest hashes (see _digest_array)
_MAX_LISTED = 64


def fingerprint(dataset: Dataset, norm: Any, settings: dict[str, Any]) -> str:
    """``"<DatasetClass>-<20 hex digits>"``: the cache key of fitting ``norm`` on ``dataset``."""
    document = {
        "dataset": describe_dataset(dataset),
        "pipeline": [_describe_transform(t) for t in _transforms_before(dataset, norm)],
        "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()
    return f"{type(dataset).__name__}-{digest[:20]}"


def describe_dataset(dataset: Any) -> dict[str, Any]:
    """What identifies a dataset: class, length, root, simple settings and content digests."""
    description: dict[str, Any] = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    try:
        description["length"] = len(dataset)
    except TypeError:
        pass
    from .streams import describe_source  # WebDataset and Hugging Face datasets (streams imports fitting)

    source = describe_source(dataset)
    if source is not None:
        return {**description, "source": source}
    if isinstance(dataset, Subset):
        description["dataset"] = describe_dataset(dataset.dataset)
        description["indices"] = _describe_value(list(dataset.indices))
        return description
    if isinstance(dataset, ConcatDataset):
        description["datasets"] = [describe_dataset(part) for part in dataset.datasets]
        return description
    for name, value in sorted(vars(dataset).items()):
        if name.startswith("_") or name in _TRANSFORM_ATTRS:
            continue
        if name == "root" and isinstance(value, (str, os.PathLike)):
            description[name] = os.path.abspath(os.fspath(value))
        elif isinstance(value, Dataset):
            description[name] = describe_dataset(value)
        else:
            described = _describe_value(value)
            if described is not None:
                description[name] = described
    return description


def _describe_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _digest_array(torch.as_tensor(value))
    if isinstance(value, (list, tuple)):
        if len(value) <= _MAX_LISTED:
            return [_describe_value(item) for item in value]
        step = len(value) // _MAX_LISTED
        sampled = [_describe_value(item) for item in value[::step]] + [_describe_value(value[-1])]
        return {"length": len(value), "sampled": _sha(json.dumps(sampled, default=str))}
    if isinstance(value, dict) and len(value) <= _MAX_LISTED:
        return {str(k): _describe_value(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return None


def _digest_array(tensor: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and a hash of 4096 evenly spaced runs of 256 bytes: cheap (1 MiB), content-sensitive.

    Contiguous runs, not single elements at a stride: a stride touches every
    cache line of a large tensor (18 ms for 150 MB), the runs only 1 MiB.
    """
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() > _PIECES * _PIECE_BYTES:
        stride = (raw.numel() - _PIECE_BYTES) // (_PIECES - 1)
        runs = raw.as_strided((_PIECES - 1, _PIECE_BYTES), (stride, 1))
        raw = torch.cat([runs.reshape(-1), raw[-_PIECE_BYTES:]])  # the last run ends at the last byte
    data = raw.contiguous().cpu().numpy().tobytes()
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "sampled": _sha(data)}


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:32]


def describe_pipeline(dataset: Any, norm: Any) -> str:
    """The repr of the transforms that run before ``norm`` in the dataset's pipeline.

    If ``norm`` is not in the pipeline, the repr of the whole pipeline: it
    makes the samples that will be measured.
    """
    return "\n".join(_ADDRESS.sub("", repr(t)) for t in _transforms_before(dataset, norm))


def _transforms_before(dataset: Any, norm: Any) -> list[Any]:
    pipeline = _find_transform(dataset)
    if pipeline is None:
        return []
    before = _before(pipeline, norm)
    return before if before is not None else [pipeline]


def _describe_transform(transform: Any) -> dict[str, Any]:
    """repr plus public attributes: v2 reprs leave out some settings (``ToDtype`` hides its dtype)."""
    attributes = {
        name: _ADDRESS.sub("", str(value))
        for name, value in sorted(getattr(transform, "__dict__", {}).items())
        if not name.startswith("_") and name != "training"
    }
    return {"repr": _ADDRESS.sub("", repr(transform)), "attributes": attributes}


def _find_transform(dataset: Any) -> Any:
    """The sample transform of a dataset, looking inside Subset-like wrappers."""
    for name in ("transform", "transforms"):
        value = getattr(dataset, name, None)
        if value is not None:
            return value
    inner = getattr(dataset, "dataset", None)
    return _find_transform(inner) if inner is not None else None


def _before(pipeline: Any, norm: Any) -> list[Any] | None:
    """Transforms applied before ``norm`` in a (nested) Compose, or None if it is not there."""
    if pipeline is norm:
        return []
    children = getattr(pipeline, "transforms", None)
    if not isinstance(children, (list, tuple)):
        for name in ("transform",):  # StandardTransform wraps the sample transform
            inner = getattr(pipeline, name, None)
            if inner is not None:
                return _before(inner, norm)
        return None
    for position, child in enumerate(children):
        inside = _before(child, norm)
        if inside is not None:
            return list(children[:position]) + inside
    return None
