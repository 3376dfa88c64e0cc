"""What the cache key knows about special kinds of values: one registry, type -> describer.

The walk (:mod:`torchnormfit.key.fingerprint`) describes plain values, containers,
functions and objects by itself. A value of a type registered here is described by
its describer instead: it returns the value's *state*, plain values the walk then
walks (a torch ``Generator`` by ``get_state()``, an open ``h5py`` file by its
file's size and modification time, a ``ConcatDataset`` by the multiset of its
parts). A describer may return :class:`Multiset` (items whose order cannot change
the statistics) or :class:`Whole` (every item in order, none skipped).

Types of optional libraries (pandas, PIL, h5py, webdataset, Hugging Face
``datasets``) are registered once their module has been imported by someone
else: nothing here imports them, and values are matched by their type, never by
the name of their class or module. The same goes for code: a class or function
counts as a library's when the file of its module lies in the standard library
or in a ``site-packages``/``dist-packages`` folder (:func:`is_library_module`),
whatever the module is called.

Files: :class:`FileStates` gives each string that names an existing file its size
and modification time (``st_mtime_ns``), a folder given as a single value its
listing, and spells each path absolute, so ``"data"`` and ``"/home/me/data"``
describe the same folder.

:func:`describe_dataset` turns the same states into the readable summary a cache
entry keeps as provenance.
"""

from __future__ import annotations

import functools
import io
import itertools
import operator
import os
import posixpath
import random
import stat
import sys
import sysconfig
import types
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch.utils.data import ChainDataset, ConcatDataset, Dataset, Subset

__all__ = ["FileStates", "Multiset", "Whole", "describe_dataset", "describer_for", "is_library_module", "register"]

PATH_MAX = 4096  # longer text names no file
_PLAIN = frozenset({str, int, float, bool})  # the items of a file list or labels, described as text lines


class Multiset(list[Any]):
    """Items described as a multiset: their order cannot change the statistics."""


class Whole(list[Any]):
    """Items described in order, every one (a stream's stages: none is skipped after the FitNormalize)."""


Describer = Callable[[Any], Any]
_TABLE: dict[type, Describer] = {}
_FOUND: dict[type, Describer | None] = {}  # type -> its describer through the MRO (None: not special)
_PENDING: dict[str, Callable[[], None]] = {}  # module -> what registers its types once it is imported
_MODULES_SEEN = 0  # len(sys.modules) when _PENDING was last looked at


def register(*kinds: type) -> Callable[[Describer], Describer]:
    """Register ``describer(value) -> state`` for values of ``kinds`` (and their subclasses)."""

    def add(describer: Describer) -> Describer:
        for kind in kinds:
            _TABLE[kind] = describer
        _FOUND.clear()
        return describer

    return add


def _when_imported(module: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Run the decorated registration once ``module`` is in ``sys.modules`` (never import it here)."""

    def add(registration: Callable[[], None]) -> Callable[[], None]:
        _PENDING[module] = registration
        return registration

    return add


def describer_for(kind: type) -> Describer | None:
    """The describer of ``kind`` (through its MRO), or None when the walk describes it by itself."""
    global _MODULES_SEEN
    if _PENDING and len(sys.modules) != _MODULES_SEEN:  # something was imported since the last look
        _MODULES_SEEN = len(sys.modules)
        for module in [m for m in _PENDING if m in sys.modules]:
            _PENDING.pop(module)()
    try:
        return _FOUND[kind]
    except KeyError:
        pass
    found = next((_TABLE[cls] for cls in kind.__mro__ if cls in _TABLE), None)
    _FOUND[kind] = found
    return found


# --- whose code: the user's or a library's -------------------------------------------------------


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[name]) + os.sep for name in ("stdlib", "platstdlib", "purelib", "platlib")})


_LIBRARY_ROOTS = _library_roots()
_INSTALLED = frozenset({"site-packages", "dist-packages"})
_LIBRARY: dict[str, tuple[Any, bool]] = {}  # module name -> (module, whether it is a library's)


def is_library_module(name: str) -> bool:
    """Whether the module ``name`` is installed code: its file lies in the standard library or in a
    ``site-packages``/``dist-packages`` folder, or it is built in. Decided by where the file is, never by the
    name: a ``datasets.py`` next to your script is yours. A module that is not loaded counts as yours.
    """
    module = sys.modules.get(name)
    if module is None:
        return False
    known = _LIBRARY.get(name)
    if known is not None and known[0] is module:
        return known[1]
    path = getattr(module, "__file__", None)
    if isinstance(path, str):
        real = os.path.realpath(path)
        library = real.startswith(_LIBRARY_ROOTS) or not _INSTALLED.isdisjoint(Path(real).parts)
    else:
        spec = getattr(module, "__spec__", None)
        library = getattr(spec, "origin", None) in ("built-in", "frozen")
    _LIBRARY[name] = (module, library)
    return library


# --- files and folders ---------------------------------------------------------------------------


def _state(info: os.stat_result) -> str:
    """A file's size and modification time; a folder's kind only (its time moves whenever anything is written
    there, logs and checkpoints included: only a dataset's own folders are described, by their listing)."""
    if stat.S_ISDIR(info.st_mode):
        return " folder"
    return f" file {info.st_size} {info.st_mtime_ns}"


def _entry_state(info: os.stat_result) -> str:
    """An entry of a listed folder: a subfolder with its time (an image added to a class folder)."""
    return f" folder {info.st_mtime_ns}" if stat.S_ISDIR(info.st_mode) else _state(info)


class FileStates:
    """The state of the files and folders a walk's strings name.

    ``roots``: the folders of the datasets being described (any attribute whose value is
    a folder); a relative name is looked up there too. Each file is stat'ed once per walk.
    """

    def __init__(self) -> None:
        self.roots: list[str] = []
        self._stated: dict[str, str] = {}  # absolute path -> state, from file lists (for a listing after them)
        self._listed: dict[str, str] = {}  # absolute path -> state, from listings (for a file list after them)
        self._left_out: dict[str, tuple[str, ...]] = {}  # folder -> prefixes of the names its listing leaves out

    def leave_out(self, path: str) -> None:
        """Leave the file ``path`` (a cache file) and its companions (``path.lock``, ``path.d``, ``.path.*``) out
        of the listing of its folder."""
        folder, name = os.path.split(os.path.realpath(path))
        self._left_out[folder] = (*self._left_out.get(folder, ()), name, f".{name}.")

    def path(self, text: str, attribute: bool = False, item: bool = False) -> tuple[str, str] | None:
        """``(absolute path, state)`` if ``text`` names an existing file or folder, else None.

        ``attribute``: a dataset's own attribute, tried whatever the text (``"data"``), and a folder there is
        described by its listing: the name and state of each entry (not deeper). Elsewhere a text is tried when
        it looks like a path (a separator or a dot), and a folder is only spelled absolute. ``item``:
        a list's item, spelled absolute without resolving links (one call less per file).
        """
        for candidate in self._candidates(text, attribute):
            try:
                info = os.stat(candidate)
            except (OSError, ValueError):
                continue
            absolute = os.path.abspath(candidate) if item else os.path.realpath(candidate)
            if stat.S_ISDIR(info.st_mode) and attribute:
                return absolute, self._listing(absolute)
            return absolute, _state(info)
        return None

    def _candidates(self, text: str, lenient: bool) -> list[str]:
        if not text or len(text) > PATH_MAX or "\x00" in text or text in (".", ".."):
            return []
        if os.path.isabs(text):
            return [text]
        candidates = [text] if lenient or os.sep in text or "." in text else []
        return candidates + [os.path.join(root, text) for root in self.roots]

    def _listing(self, folder: str) -> str:
        """Each entry's name and state, one level deep (a store with one file per record edited in place)."""
        lines = []
        left_out = self._left_out.get(folder, ())
        with os.scandir(folder) as entries:
            for entry in entries:
                if left_out and entry.name.startswith(left_out):
                    continue
                path = os.path.join(folder, entry.name)
                state = self._stated.get(path)
                if state is None:
                    try:
                        state = _entry_state(entry.stat())
                    except OSError:
                        state = " unreadable"
                    self._listed[path] = state
                lines.append(entry.name + state)
        return " folder\n" + "\n".join(sorted(lines))

    def lines(self, items: Sequence[Any]) -> list[str] | None:
        """One line of text per item, for items that are plain values or tuples of them (file lists, labels):
        its repr, each string that names a file spelled absolute, then the state of each such file.
        None for other items.

        Built column by column (the paths of a file list, then its labels), each checked and stat'ed in one go.
        """
        kinds = set(map(type, items))
        single = kinds <= _PLAIN
        if single:
            rows: Sequence[Any] = items
            columns: list[Sequence[Any]] = [items]
        elif kinds <= _PLAIN | {tuple}:
            rows = items if kinds == {tuple} else [item if type(item) is tuple else (item,) for item in items]
            columns = list(itertools.zip_longest(*rows, fillvalue=None))
        else:
            return None
        texts, states = [], []
        for column in columns:
            found = set(map(type, column))
            if not found <= _PLAIN | {type(None)}:
                return None
            spelled, state = self._column(column) if str in found else (column, None)
            texts.append(spelled)
            states.append(state)
        if any(spelled is not column for spelled, column in zip(texts, columns)):  # paths spelled anew
            rows = texts[0] if single else [row[: len(old)] for row, old in zip(zip(*texts), rows)]
        described = map(repr, rows)
        for state in states:
            if state is not None:
                described = map(operator.add, described, state)
        return list(described)

    def _column(self, column: Sequence[Any]) -> tuple[Sequence[Any], list[str]]:
        """Each value's spelling (a path to a file absolute) and the state of the file it names ("" if none)."""
        paths = _absolute(column)
        if paths is not None:
            try:  # the usual file list: paths that all exist, stat'ed without a Python call each
                if self._listed:
                    listed = self._listed
                    states = [listed.get(path) or _state(os.stat(path)) for path in paths]
                else:
                    states = list(map(_state, map(os.stat, paths)))
            except (OSError, ValueError):  # a missing file, a NUL: path by path
                pass
            else:
                self._stated.update(zip(paths, states))
                return paths, states
        cells = [self._cell(value) for value in column]
        return [text for text, _ in cells], [state for _, state in cells]

    def _cell(self, value: Any) -> tuple[Any, str]:
        if type(value) is not str:
            return value, ""
        named = self.path(value, item=True)
        return (value, "") if named is None else named


def _absolute(paths: Sequence[Any]) -> Sequence[str] | None:
    """The absolute spelling of each path of a column of paths (each with a separator); None for other columns.

    Absolute paths as they are; relative ones joined to the working folder, through ``os.path.abspath`` only
    when they hold a ``.`` or ``//`` component (a Python call per path costs more than the stat).
    """
    if set(map(type, paths)) != {str} or max(map(len, paths)) > PATH_MAX:
        return None
    if os.path is not posixpath:
        return [os.path.abspath(p) for p in paths] if all(os.sep in p for p in paths) else None
    if all(map(str.startswith, paths, itertools.repeat("/"))):  # os.path.isabs, without a Python call per path
        return paths
    if not all(map(str.__contains__, paths, itertools.repeat("/"))):  # bare names: through the dataset's folders
        return None
    cwd = os.getcwd() + "/"
    return [p if p[0] == "/" else os.path.abspath(p) if p[0] == "." or "/." in p or "//" in p or p[-1] == "/"
            else cwd + p for p in paths]


def folders(attributes: dict[str, Any]) -> list[str]:
    """The values of ``attributes`` that are existing folders (what relative names beside them resolve against)."""
    found = []
    for value in attributes.values():
        if isinstance(value, (str, PurePath)):
            folder = os.fspath(value)
            if folder and len(folder) <= PATH_MAX and "\x00" not in folder and os.path.isdir(folder):
                found.append(folder)
    return found


def _file_of(name: Any) -> str | None:
    """The state of the file a handle was opened from (``name`` or ``filename``), as text."""
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not isinstance(name, str):
        return None
    try:
        info = os.stat(name)
    except (OSError, ValueError):
        return None
    return os.path.realpath(name) + _state(info)


# --- the registry: torch, numpy, the standard library ----------------------------------------------


@register(torch.dtype, torch.device, torch.layout, torch.memory_format)
def _torch_constant(value: Any) -> Any:
    return repr(value)


@register(torch.Generator)
def _torch_generator(generator: torch.Generator) -> Any:
    return {"device": str(generator.device), "state": generator.get_state()}


@register(np.random.Generator)
def _numpy_generator(generator: np.random.Generator) -> Any:
    return {"state": generator.bit_generator.state}


@register(np.random.RandomState)
def _numpy_random_state(generator: np.random.RandomState) -> Any:
    return {"state": generator.get_state()}


@register(random.Random)
def _python_random(generator: random.Random) -> Any:
    if isinstance(generator, random.SystemRandom):
        return "system randomness"  # no state: every run differs, the key cannot tell
    return {"state": generator.getstate()}


@register(zipfile.ZipFile)
def _zip_file(archive: zipfile.ZipFile) -> Any:
    """The archive's file state and, for each member, its name, CRC-32 and size (read from its directory)."""
    members = [(info.filename, info.CRC, info.file_size) for info in archive.infolist()]
    return {"zip": _file_of(archive.filename) or "not a file", "members": Multiset(members)}


_IO_BASES = tuple(set(io.FileIO.__mro__) & set(io.BufferedReader.__mro__) & set(io.TextIOWrapper.__mro__) - {object})


@register(io.IOBase, *_IO_BASES)  # io.IOBase is an ABC: the built-in files derive from its C base
def _open_file(handle: io.IOBase) -> Any:
    described = _file_of(getattr(handle, "name", None))
    if described is None:
        raise ValueError("an open handle on no file the key can see")  # a gap: a hit is verified
    return {"file": described}


@register(ConcatDataset)
def _concat(dataset: ConcatDataset) -> Any:
    """Every part, as a multiset (the order of the parts cannot change the statistics)."""
    rest = {k: v for k, v in vars(dataset).items() if k not in ("datasets", "cumulative_sizes")}
    return {**rest, "datasets": Multiset(dataset.datasets)}


@register(ChainDataset)
def _chain(dataset: ChainDataset) -> Any:
    rest = {k: v for k, v in vars(dataset).items() if k != "datasets"}
    parts = dataset.datasets
    return {**rest, "datasets": Multiset(parts) if isinstance(parts, (list, tuple)) else parts}


# --- optional libraries, registered once imported ----------------------------------------------


@_when_imported("pandas")
def _register_pandas() -> None:
    import pandas

    @register(pandas.DataFrame, pandas.Series, pandas.Index)
    def _pandas(value: Any) -> Any:
        """By content (``hash_pandas_object``), with the files its text cells name."""
        hashed = pandas.util.hash_pandas_object(value, index=not isinstance(value, pandas.Index))
        cells = [cell for cell in (value.to_numpy().ravel() if value.ndim else []) if isinstance(cell, str)]
        return {"pandas": type(value).__name__, "columns": [str(c) for c in getattr(value, "columns", [])],
                "hash": hashed.to_numpy().tobytes(), "cells": cells}


@_when_imported("PIL.Image")
def _register_pil() -> None:
    from PIL import Image

    @register(Image.Image)
    def _pil(image: Any) -> Any:
        import hashlib

        return {"image": f"{image.mode} {image.size}", "pixels": hashlib.sha256(image.tobytes()).digest()}


@_when_imported("h5py")
def _register_h5py() -> None:
    import h5py

    @register(h5py.File, h5py.Group, h5py.Dataset)
    def _h5py(value: Any) -> Any:
        """An open file, group or dataset: its file's state and its name in the file (a closed one: a gap)."""
        if not value.id.valid:
            raise ValueError("a closed h5py object")
        file = _file_of(value.file.filename)
        if file is None:
            raise ValueError(f"an h5py object in no file the key can see ({value.file.filename!r})")
        described = {"h5py": file, "name": value.name}
        if isinstance(value, h5py.Dataset):
            described.update(shape=list(value.shape), dtype=str(value.dtype))
        return described


@_when_imported("pyarrow")
def _register_pyarrow() -> None:
    import pyarrow

    @register(pyarrow.DataType)
    def _arrow_type(value: Any) -> Any:
        return str(value)


@_when_imported("webdataset")
def _register_webdataset() -> None:
    from webdataset import filters, pipeline, shardlists

    @register(pipeline.DataPipeline)
    def _pipeline(stream: Any) -> Any:
        """Its stages in order, all of them (its random ``seed`` is left out: order does not change statistics)."""
        return {"webdataset": Whole(stream.pipeline)}

    @register(filters.FilterFunction)
    def _stage(stage: Any) -> Any:
        keywords = dict(stage.kw)
        if stage.f is getattr(filters, "_shuffle", None):  # an unseeded shuffle draws its seed per process
            keywords = {k: v for k, v in keywords.items() if k not in ("seed", "rng")}
        return {"stage": stage.f, "args": stage.args, "keywords": keywords}

    @register(filters.detshuffle)
    def _detshuffle(stage: Any) -> Any:
        return {"shuffle": stage.bufsize, "initial": stage.initial}

    @register(shardlists.SimpleShardList)
    def _shards(shards: Any) -> Any:
        return {"urls": shards.urls}


@_when_imported("datasets")
def _register_huggingface() -> None:
    """Hugging Face ``datasets``, found by type: the module named ``datasets`` must be that library."""
    module = sys.modules["datasets"]
    table, iterable = getattr(module, "Dataset", None), getattr(module, "IterableDataset", None)
    if not (isinstance(table, type) and isinstance(iterable, type) and is_library_module("datasets")):
        _PENDING["datasets"] = _register_huggingface  # a user's own datasets.py: the library may come later
        return

    @register(table)
    def _hf_dataset(dataset: Any) -> Any:
        """Its ``_fingerprint``, or after ``set_transform``/``with_transform`` (whose fingerprint hashes the
        transform closure, a FitNormalize's fitted state and cache path included) the fingerprint of the same
        data without the transform, plus the transform."""
        transform = dataset._format_kwargs.get("transform")
        if transform is None:
            data = dataset._fingerprint
        else:
            import copy

            from datasets.fingerprint import generate_fingerprint

            plain = copy.copy(dataset)
            plain._format_kwargs = {k: v for k, v in dataset._format_kwargs.items() if k != "transform"}
            data = generate_fingerprint(plain)
        return {"huggingface": data, "format": dataset._format_type, "columns": dataset._format_columns,
                "output_all_columns": dataset._output_all_columns, "transform": transform}

    @register(iterable)
    def _hf_iterable(dataset: Any) -> Any:
        """Its chain of examples iterables (shards, data files, ``.map()`` functions), features, format, and
        ``split_dataset_by_node`` settings."""
        formatting = getattr(dataset, "_formatting", None)
        distributed = getattr(dataset, "_distributed", None)
        return {"huggingface_iterable": dataset._ex_iterable,
                "features": str(getattr(dataset._info, "features", None)),
                "format": getattr(formatting, "format_type", None),
                "distributed": None if distributed is None else vars(distributed)}


# --- the readable summary --------------------------------------------------------------------------

_SHOWN = 8  # items of a list shown in a summary


def describe_dataset(dataset: Any) -> dict[str, Any]:
    """A readable summary for a cache entry's provenance: class, length, folders and simple settings.

    Built from what the key sees: the states of special types (a stream's stages, a Hugging Face
    fingerprint, the parts of a ``ConcatDataset``), a dataset's folders and files as absolute paths,
    its plain settings. Lists are cut after a few items.
    """
    described: dict[str, Any] = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    try:
        described["length"] = len(dataset)
    except Exception:
        pass
    if isinstance(dataset, Subset):
        return {**described, "dataset": describe_dataset(dataset.dataset)}
    describer = describer_for(type(dataset))
    if describer is not None:
        state = describer(dataset)
        return {**described, **(_readable(state, 0) if isinstance(state, dict) else {"state": _readable(state, 0)})}
    for name, value in sorted(getattr(dataset, "__dict__", {}).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, (str, PurePath)):
            text = os.fspath(value)
            described[name] = os.path.realpath(text) if text and os.path.exists(text) else text
        elif isinstance(value, Dataset):
            described[name] = describe_dataset(value)
        elif isinstance(value, (bool, int, float)):
            described[name] = value
        elif isinstance(value, (list, tuple)) and len(value) <= _SHOWN and all(
                isinstance(v, (int, float)) for v in value):
            described[name] = list(value)
    return described


def _readable(value: Any, depth: int) -> Any:
    """A JSON-able rendering of a state, a few levels deep."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.hex()[:16]
    if isinstance(value, PurePath):
        return os.fspath(value)
    if isinstance(value, Dataset):
        return describe_dataset(value) if depth < 4 else type(value).__qualname__
    if depth > 6:
        return type(value).__qualname__
    if isinstance(value, (list, tuple)):
        shown = [_readable(item, depth + 1) for item in value[:_SHOWN]]
        return shown if len(value) <= _SHOWN else {"length": len(value), "first": shown}
    if isinstance(value, dict):
        return {str(k): _readable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, functools.partial):
        return {"partial": _readable(value.func, depth + 1), "args": _readable(value.args, depth + 1)}
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype)}
    describer = describer_for(type(value))
    if describer is not None:
        return _readable(describer(value), depth + 1)
    attributes = {k: v for k, v in getattr(value, "__dict__", {}).items() if not k.startswith("_") and k != "training"}
    return {"class": f"{type(value).__module__}.{type(value).__qualname__}", **_readable(attributes, depth + 1)}

