"""What identifies a stream: WebDataset pipelines and Hugging Face datasets, described for the cache key.

webdataset and datasets are never imported here: their objects are recognised
by the modules their classes come from.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
import sys
import sysconfig
import types
from typing import Any

import torch
from torch import Tensor

from .fingerprint import _global_names

__all__ = ["describe_source"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 8
_MAX_ITEMS = 256
_LIBRARY_PATHS = tuple(
    os.path.realpath(path) + os.sep
    for path in {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
)


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
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha": _tensor_digest(value)}
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


def _tensor_digest(value: Tensor) -> str:
    """A digest of a tensor's shape, dtype and bytes."""
    flat = value.reshape(1, 1, -1)
    hasher = hashlib.sha256(f"{tuple(flat.shape)} {flat.dtype}".encode())
    hasher.update(flat.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()
