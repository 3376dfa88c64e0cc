"""A deterministic, total cache key for (dataset, pipeline up to FitNormalize, settings).

The key walks the dataset object: every attribute, public or private (``__dict__``
and ``__slots__``), through wrappers, containers and closures, so a pipeline kept
under any name (``self.aug``, a wrapper's ``_dataset``, a Hugging Face format
transform) is seen. What it describes, and how:

- numbers, strings, numpy scalars, enums by value; a string or path naming an
  existing file also by that file's size and modification time, spelled absolute
  (a relative name is also looked up in the dataset's folders: any of its
  attributes that is a folder); a folder given as one value by its listing;
- tensors and numpy arrays of any dtype and layout by dtype, shape and content: a
  transform's (a ``LinearTransformation`` matrix, module weights) hashed whole up to
  64 MiB; a dataset's (the images themselves) by a digest of 4096 evenly spaced
  256-byte runs (first and last byte included), bounded time and memory whatever
  their size or strides; string and object arrays item by item (file lists);
- lists and tuples item by item, all items hashed; a long list in a dataset (more than
  64 items, file lists for example) and ``Subset`` indices as a multiset, because
  the statistics do not depend on sample order; sets and dict keys sorted;
- functions by their code, constants, defaults, closure values and the plain values
  of the globals they name (lambdas differ by body); installed code (standard
  library, site-packages) by name, closure and defaults; ``functools.partial`` and
  ``operator.itemgetter`` by their arguments; methods by function and instance;
  the methods of classes that are not installed code by their code;
- ``nn.Module`` transforms through their attributes, parameters and buffers included;
- the special types of :mod:`torchnormfit.key.describe` by their state: the parts of
  a ``ConcatDataset``/``ChainDataset`` as a multiset, random generators by their
  state, open h5py/zip/files by their file's state, pandas, PIL, WebDataset and
  Hugging Face datasets;
- in a pipeline (an ordered list), only what comes before the FitNormalize being
  fitted: later transforms do not change what it measures. That FitNormalize
  counts by its position only, never by its fitted state or cache path.

Nothing here reads a sample and nothing depends on the process (no ``hash()``, no
memory addresses). It never raises: what it cannot describe (objects without
attributes such as locks, a walk over ~2 million values) is listed in
:attr:`Fingerprint.gaps`, and a hit on such a key is always verified.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import operator
import os
import re
import types
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .describe import (
    FileStates,
    Multiset,
    Whole,
    describer_for,
    folders,
    is_library_module,
)

__all__ = ["Fingerprint", "describe_pipeline", "fingerprint"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PIECES, _PIECE_BYTES = 4096, 256  # what an array's digest reads (see _array_bytes)
_WHOLE_BYTES = 64 << 20  # a transform's tensor up to this size is hashed whole; a dataset's is sampled
_MULTISET_OVER = 64  # a dataset's list longer than this is hashed as a multiset
_BUDGET = 2_000_000  # values visited before the walk gives up (a gap)
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes)


@dataclass(frozen=True)
class Fingerprint:
    """A cache key and what its walk found."""

    key: str
    found_norm: bool
    """Whether the FitNormalize being fitted was found in the dataset (its pipeline is then known)."""
    gaps: tuple[str, ...]
    """What the key could not describe; a hit on this key is always verified."""


def fingerprint(
    dataset: Any, norm: Any, settings: Mapping[str, Any], cache: str | os.PathLike[str] | None = None
) -> Fingerprint:
    """``"<DatasetClass>-<20 hex digits>"``: the cache key of fitting ``norm`` on ``dataset`` with ``settings``.

    ``cache``: the cache file the entry goes to; if it lies in a folder the key lists (a dataset's root), it and
    its companions (lock, entry folder, temporary files) are left out of the listing, so writing the entry does
    not change the key.

    Examples
    --------
    >>> from torchvision.datasets import FakeData
    >>> printed = fingerprint(FakeData(size=8), None, {"image": None})
    >>> printed.key.startswith("FakeData-"), len(printed.key), printed.gaps
    (True, 29, ())
    """
    walk = _Walk(norm)
    if cache is not None:
        walk.files.leave_out(os.fspath(cache))
    digest = hashlib.sha256()
    digest.update(walk.of(dataset, "dataset", data=True))
    digest.update(walk.of(dict(settings), "settings"))
    key = f"{type(dataset).__name__}-{digest.hexdigest()[:20]}"
    return Fingerprint(key, walk.norm_hits > 0, tuple(walk.gaps))


def describe_pipeline(dataset: Any, norm: Any) -> str:
    """The repr of the transforms that run before ``norm`` in the dataset's pipeline ("" if it is not there)."""
    walk = _Walk(norm)
    walk.of(dataset, "dataset", data=True)
    return "\n".join(_ADDRESS.sub("", repr(t)) for t in walk.before_norm or [])


def _sha(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


_DICTS = (dict, OrderedDict)
_EMPTY_MAPPING = _sha(b"mapping", _sha())  # what _describe gives an empty one


class _Walk:
    """One walk over an object graph: ``of(value)`` is the 32-byte digest of ``value``."""

    def __init__(self, norm: Any):
        self.norm = norm
        self.norm_hits = 0
        self.before_norm: list[Any] | None = None
        self.gaps: list[str] = []
        self._budget = _BUDGET
        self._path: set[int] = set()  # ids of the containers being described (cycles)
        self._done: dict[int, tuple[bytes, int]] = {}  # id -> (digest, norm hits inside), for shared objects
        self._alive: list[Any] = []
        self.files = FileStates()  # the files the walk's strings name; its roots: the datasets' folders

    def of(self, value: Any, where: str, data: bool = False) -> bytes:
        if value is self.norm and value is not None:
            if self.norm_hits == 0:
                self.before_norm = []
            self.norm_hits += 1
            return _sha(b"the FitNormalize being fitted")
        self._budget -= 1
        if self._budget < 0:
            if self._budget == -1:
                self.gaps.append(f"{where}: the walk stopped after {_BUDGET:,} values")
            return _sha(b"truncated")
        try:
            return self._of(value, where, data)
        except RecursionError:
            self.gaps.append(f"{where}: nested too deeply")
            return _sha(b"too deep")
        except Exception as error:  # a value whose description failed is a gap, never a crash
            self.gaps.append(f"{where}: {type(value).__qualname__} ({type(error).__name__}: {error})")
            return _sha(b"undescribed", _text(type(value).__qualname__))

    def _of(self, value: Any, where: str, data: bool) -> bytes:
        kind = type(value)
        if kind in _DICTS and not value:  # most of a module's state (its hooks): described at once
            return _EMPTY_MAPPING
        if isinstance(value, enum.Enum):
            return _sha(b"enum", _text(kind.__qualname__), _text(value.name))
        if type(value) is str:
            return self._string(value)
        if isinstance(value, _PRIMITIVES):
            return _primitive(value)
        if isinstance(value, np.generic):
            return _sha(b"np scalar", _array_bytes_np(np.asarray(value)))
        if isinstance(value, torch.Tensor):
            whole = not data and value.numel() * value.element_size() <= _WHOLE_BYTES
            return _sha(b"tensor", _text(str(value.dtype)), _text(str(tuple(value.shape))), _tensor_bytes(value, whole))
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject or value.dtype.kind == "U":  # file lists among them
                items = self._sequence(value.ravel().tolist(), where, data)
                return _sha(b"object array", _text(str(value.shape)), items)
            whole = not data and value.nbytes <= _WHOLE_BYTES
            return _sha(b"ndarray", _text(str(value.shape)), _array_bytes_np(value, whole))
        if isinstance(value, os.PathLike):
            path = os.fspath(value)
            return self._string(path) if isinstance(path, str) else _primitive(path)
        if isinstance(value, range):
            return _sha(b"range", _text(repr(value)))
        if isinstance(value, type):
            return _sha(b"class", _text(f"{value.__module__}.{value.__qualname__}"))
        if isinstance(value, types.ModuleType):
            return _sha(b"module", _text(value.__name__))
        return self._container(value, where, data)

    def _container(self, value: Any, where: str, data: bool) -> bytes:
        """Values that hold other values: guarded against cycles, shared ones described once."""
        ident = id(value)
        if ident in self._path:
            return _sha(b"cycle", _text(type(value).__qualname__))
        if ident in self._done:
            digest, hits = self._done[ident]
            self.norm_hits += hits
            return digest
        self._path.add(ident)
        hits = self.norm_hits
        try:
            digest = self._describe(value, where, data)
        finally:
            self._path.discard(ident)
        self._done[ident] = (digest, self.norm_hits - hits)
        self._alive.append(value)  # a temporary's id must not be reused while the walk remembers it
        return digest

    def _string(self, text: str, attribute: bool = False) -> bytes:
        """Text; a path to an existing file or folder as its absolute spelling and its state (a dataset's own
        ``attribute``: see :meth:`~torchnormfit.key.describe.FileStates.path`)."""
        named = self.files.path(text, attribute=attribute)
        if named is None:
            return _sha(b"str", _text(text))
        return _sha(b"path", _text(named[0]), _text(named[1]))

    def _describe(self, value: Any, where: str, data: bool) -> bytes:
        if isinstance(value, Multiset):
            return _sha(b"multiset", self._multiset(value, where, data))
        if isinstance(value, Whole):
            return _sha(b"whole", *(self.of(item, f"{where}[{i}]", data) for i, item in enumerate(value)))
        describer = describer_for(type(value))
        if describer is not None:  # a special type, by its state (a generator's state in order, whatever holds it)
            state = self.of(describer(value), where, isinstance(value, Dataset))
            return _sha(b"special", self._class(type(value), where), state)
        if isinstance(value, (list, tuple, deque)):
            return _sha(_text(type(value).__qualname__), self._sequence(value, where, data))
        if isinstance(value, (set, frozenset)):
            return _sha(b"set", self._multiset(value, where))
        if isinstance(value, Mapping):
            return _sha(b"mapping", self._mapping(value, where, data))
        if isinstance(value, Subset):
            return _sha(b"Subset", self.of(value.dataset, f"{where}.dataset", data=True), _indices(value.indices))
        if isinstance(value, functools.partial):
            parts = (value.func, value.args, value.keywords)
            return _sha(b"partial", *(self.of(p, f"{where}.partial") for p in parts))
        if isinstance(value, types.FunctionType):
            return self._function(value, where)
        if isinstance(value, types.MethodType):
            return _sha(b"method", self.of(value.__func__, where), self.of(value.__self__, f"{where}.__self__"))
        if isinstance(value, types.CodeType):
            return self._code(value, where)
        if isinstance(value, (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodWrapperType,
                              types.MethodDescriptorType)):
            owner = getattr(value, "__self__", None)
            bound = b"" if owner is None or isinstance(owner, types.ModuleType) else self.of(owner, where)
            return _sha(b"builtin", _text(f"{getattr(value, '__module__', '')}.{value.__qualname__}"), bound)
        if isinstance(value, (operator.itemgetter, operator.attrgetter, operator.methodcaller)):
            return _sha(b"operator", _text(type(value).__name__), self.of(value.__reduce__()[1:], where))
        return self._object(value, where, data)

    def _sequence(self, items: Any, where: str, data: bool) -> bytes:
        """Item by item in order, up to the one holding the FitNormalize; a dataset's long list as a multiset."""
        if data and len(items) > _MULTISET_OVER:
            return _sha(b"multiset", self._multiset(items, where, data))
        fast = self.files.lines(items)
        if fast is not None:
            self._budget -= len(items)
            return _sha(b"items", _text("\n".join(fast)))
        digests = []
        for position, item in enumerate(items):
            hits = self.norm_hits
            digests.append(self.of(item, f"{where}[{position}]", data))
            if self.norm_hits > hits and not isinstance(item, Dataset):
                # the pipeline up to the FitNormalize: what follows does not matter (every dataset of a list does)
                if hits == 0:
                    self.before_norm = list(items[:position]) + (self.before_norm or [])
                break
        return _sha(b"items", *digests)

    def _multiset(self, items: Any, where: str, data: bool = False) -> bytes:
        fast = self.files.lines(items)
        if fast is not None:
            self._budget -= len(items)
            return _sha(b"multiset", _text("\n".join(sorted(fast))))
        return _sha(b"multiset", *sorted(self.of(item, f"{where}[*]", data) for item in items))

    def _mapping(self, mapping: Mapping[Any, Any], where: str, data: bool) -> bytes:
        pairs = [(self.of(k, f"{where} key"), self.of(v, f"{where}[{k!r}]", data)) for k, v in list(mapping.items())]
        return _sha(*(k + v for k, v in sorted(pairs)))

    def _function(self, function: types.FunctionType, where: str) -> bytes:
        """Code, defaults, closure values and the plain values of the globals the code names; installed code
        (a library's, the standard library's) by its name, closure and defaults."""
        code = function.__code__
        library = is_library_module(function.__module__) if isinstance(function.__module__, str) else False
        cells = []
        for cell in function.__closure__ or ():
            try:
                cells.append(self.of(cell.cell_contents, f"{where}.<closure>"))
            except ValueError:  # an empty cell
                cells.append(_sha(b"empty cell"))
        if library:
            return _sha(b"library function", _text(f"{function.__module__}.{function.__qualname__}"),
                        self.of(function.__defaults__, where), self.of(function.__kwdefaults__, where), *cells)
        named = sorted(_global_names(code) & set(function.__globals__))
        globals_ = [
            _text(name) + self.of(function.__globals__[name], f"{where}.<global {name}>")
            for name in named if _is_plain_global(function.__globals__[name])
        ]
        return _sha(
            b"function", _text(function.__qualname__), self._code(code, where),
            self.of(function.__defaults__, where), self.of(function.__kwdefaults__, where), *cells, *globals_,
        )

    def _code(self, code: types.CodeType, where: str) -> bytes:
        consts = [self._code(c, where) if isinstance(c, types.CodeType) else self.of(c, where) for c in code.co_consts]
        return _sha(b"code", code.co_code, _text(" ".join(code.co_names)), *consts)

    def _object(self, value: Any, where: str, data: bool) -> bytes:
        """A class instance: its class (with the code of user-defined methods) and every attribute it holds."""
        kind = type(value)
        state_of = getattr(kind, "_fingerprint_state", None)
        if callable(state_of):
            return _sha(b"object", _text(kind.__qualname__), self.of(state_of(value), where))
        attributes = dict(getattr(value, "__dict__", None) or {})
        for cls in kind.__mro__:
            for name in _slot_names(cls):
                if name not in attributes and hasattr(value, name):
                    attributes[name] = getattr(value, name)
        if not attributes and not hasattr(value, "__dict__") and not _slot_names(kind):
            self.gaps.append(f"{where}: a {kind.__module__}.{kind.__qualname__} (no attributes to describe)")
            return _sha(b"opaque", _text(f"{kind.__module__}.{kind.__qualname__}"))
        data = isinstance(value, Dataset)  # its own lists are data (file lists); deeper ones are not
        roots = folders(attributes) if data else []
        self.files.roots.extend(roots)
        try:
            parts = [_text(name) + self._attribute(attributes[name], f"{where}.{name}", data)
                     for name in sorted(attributes)]
        finally:
            del self.files.roots[len(self.files.roots) - len(roots):]
        return _sha(b"object", self._class(kind, where), *parts)

    def _attribute(self, value: Any, where: str, data: bool) -> bytes:
        """One attribute of an object; a dataset's path (its root, a store folder) with the folder's listing."""
        if data and isinstance(value, (str, PurePath)) and value is not self.norm:
            text = os.fspath(value)
            return self._string(text, attribute=True) if isinstance(text, str) else self.of(value, where, data)
        return self.of(value, where, data)

    def _class(self, kind: type, where: str) -> bytes:
        """Class name, and the code of the methods of its classes that are not installed code (a changed
        __getitem__ in your own module, whatever its name)."""
        parts = [_text(f"{kind.__module__}.{kind.__qualname__}")]
        for cls in kind.__mro__:
            if is_library_module(cls.__module__):
                continue
            for name, member in sorted(vars(cls).items()):
                if isinstance(member, (types.FunctionType, staticmethod, classmethod, property)):
                    function = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
                    if isinstance(function, types.FunctionType):
                        parts.append(_text(name) + self._code(function.__code__, f"{where}.{name}"))
        return _sha(b"class", *parts)


def _primitive(value: Any) -> bytes:
    if isinstance(value, str):
        return _sha(b"str", _text(value))
    if isinstance(value, bytes):
        return _sha(b"bytes", value)
    return _sha(_text(type(value).__name__), _text(repr(value)))


def _indices(indices: Any) -> bytes:
    """A subset's indices as a sorted multiset, all of them (numpy, tensor, list or range)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    array = np.sort(np.asarray(indices, dtype=np.int64).ravel())
    return _sha(b"indices", array.astype("<i8").tobytes())


def _slot_names(cls: type) -> tuple[str, ...]:
    slots = vars(cls).get("__slots__", ())
    names = (slots,) if isinstance(slots, str) else tuple(slots)
    return tuple(name for name in names if name not in ("__dict__", "__weakref__"))


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _is_plain_global(value: Any) -> bool:
    return isinstance(value, (*_PRIMITIVES, np.generic, np.ndarray, torch.Tensor, list, tuple, dict, set, frozenset,
                              types.FunctionType, functools.partial))


def _tensor_bytes(tensor: torch.Tensor, whole: bool = False) -> bytes:
    """The bytes a tensor's digest reads: all of a small one, 4096 evenly spaced 256-byte runs of a large one.

    Runs, not single elements at a stride: a stride touches every cache line of a large tensor. A
    non-contiguous tensor is read in its memory order when it is a permutation of a contiguous one
    (``permute``), else through the runs' element indices, never copied whole.
    """
    tensor = tensor.detach()
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise TypeError(f"{tensor.layout} tensors are not digested")
    layout = b""
    if not tensor.is_contiguous():
        order = sorted(range(tensor.ndim), key=lambda d: (-tensor.stride()[d], -int(tensor.shape[d])))
        permuted = tensor.permute(order)
        if permuted.is_contiguous():
            tensor, layout = permuted, _text(f"memory order {order}")
        elif whole or tensor.numel() * tensor.element_size() <= _PIECES * _PIECE_BYTES:
            tensor = tensor.contiguous()
        else:
            run = max(1, _PIECE_BYTES // tensor.element_size())
            starts = torch.linspace(0, tensor.numel() - run, _PIECES, dtype=torch.float64).long()
            tensor = torch.take(tensor, (starts[:, None] + torch.arange(run)).reshape(-1).to(tensor.device))
    raw = tensor.reshape(-1).view(torch.uint8)
    if raw.numel() > _PIECES * _PIECE_BYTES and not whole:
        stride = (raw.numel() - _PIECE_BYTES) // (_PIECES - 1)
        runs = raw.as_strided((_PIECES - 1, _PIECE_BYTES), (stride, 1), raw.storage_offset())
        raw = torch.cat([runs.reshape(-1), raw[-_PIECE_BYTES:]])  # the last run ends at the last byte
    return layout + raw.cpu().numpy().tobytes()


def _array_bytes_np(array: np.ndarray, whole: bool = False) -> bytes:
    """A numpy array of any dtype, strides and byte order as little-endian bytes: all, or runs of a large one."""
    if array.dtype == np.longdouble:
        array = array.astype(np.float64)  # its padding bytes are not data
    elif array.dtype == np.clongdouble:
        array = array.astype(np.complex128)
    if array.nbytes > _PIECES * _PIECE_BYTES and array.size > _PIECES and not whole:
        run = max(1, _PIECE_BYTES // max(1, array.dtype.itemsize))
        starts = np.linspace(0, array.size - run, _PIECES).astype(np.int64)
        array = array.flat[(starts[:, None] + np.arange(run)).ravel()]
    canonical = array.dtype.newbyteorder("<")
    return _text(array.dtype.str) + np.ascontiguousarray(array).astype(canonical, copy=False).tobytes()
