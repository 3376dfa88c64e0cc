"""The HDF5 statistics cache: a documented schema, validated reads, atomic writes that touch one entry.

A cache is named by a file path ``P`` (default ``~/.cache/torchnormfit/stats.h5``) and lives in two places:

- ``P.d/``, the entry folder: one small HDF5 file per entry, named ``<sha256 of the key, UTF-8, hex>.h5``.
  Every save writes there, and only its own entry's file.
- ``P`` itself, if it exists: one HDF5 file of many entries, the single-file format (what torchnormfit
  0.1 wrote, and the way to hand a cache to someone as one file). It is read and never rewritten by a
  save; removing an entry it holds rewrites it without that entry.

A key in ``P.d/`` wins over the same key in ``P``. Why one file per entry: a save must not cost more as
the cache grows. Rewriting one file on each save costs every entry (a 1,000-entry file: 754x a save into
a 1-entry cache, ``benchmarks/bench_cache.py``); changing an HDF5 file in place is not atomic (and HDF5
2.0 crashes the process when a write fails halfway); a log compacted now and then makes some saves pay
for all. A small file built in memory, written next to ``P`` and renamed onto its name keeps the
all-or-nothing guarantee, per entry, at a cost that does not depend on the other entries (1.02-1.13x at
100 to 10,000 entries); a hit opens one small file (1.00-1.09x).

Every file, ``P`` and each entry file (which holds exactly one entry), has this layout, schema version 2::

    /                        attrs: format="torchnormfit.cache", schema_version=2
    /<key>/                  attrs: format="torchnormfit.channel_stats", schema_version=2, key, sha256,
                                    created_utc, torch_version, torchvision_version, torchnormfit_version,
                                    dataset, pipeline, num_samples, ddof
    /<key>/count|mean|m2|std|min|max   float64, shape (C,)
    /<key>/samples/<name>    optional per-sample arrays: float32, float64 or int64, 1-D or 2-D, at most
                             2**24 elements; <name> a lowercase identifier ([a-z][a-z0-9_]*, <= 64 chars)

Version 1 (no ``samples``) is read as it is, with no arrays. ``sha256`` is the hex SHA-256 of the six
vectors as little-endian float64 bytes in the order count, mean, m2, std, min, max, followed, for each
array in sorted name order, by the ASCII line ``<name> <dtype> <shape>\\n`` (dtype ``<f4``, ``<f8`` or
``<i8``; shape the dimensions joined by ``x``, as ``1024x3``) and the array's little-endian bytes in C
order. Without arrays it is version 1's checksum. It is checked when present, so values damaged on disk
are refused instead of used.

Writers hold ``P.lock`` (an flock the OS releases when its holder dies; ``$TORCHNORMFIT_CACHE_LOCK_TIMEOUT``
seconds, default 60, bound the wait). A save writes its entry file to a temporary file next to ``P``,
fsyncs it and ``os.replace``-s it onto its name: a crash leaves the old entry or the new one, never a torn
one, and under the lock every temporary file is a dead writer's, removed by the next writer. A corrupt
file is moved aside (``<file>.corrupt-<time>-<pid>``), never deleted; a foreign or newer file is never
written. Readers take no lock. Every global heap collection is walked before HDF5 parses it (HDF5 2.0
loops forever on a damaged one), and one over 64 MiB is refused: a file of at most 1 MiB (an entry file)
is read whole and its heaps walked in memory; a bigger one is read through a file object that walks
each collection HDF5 reads, so it is read only as far as needed: a foreign 1.5 GiB file is refused after
9 KB. Nothing is pickled in or out.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np
from h5py import h5a, h5d, h5f, h5g, h5l, h5o, h5s, h5t
import torch

from .stats import ChannelStats

__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheWarning",
    "default_cache_path",
    "entry_folder",
    "read_entry",
    "write_entry",
    "list_entries",
    "delete_entry",
    "delete_entries",
    "prune_entries",
    "check_key",
]

FILE_FORMAT = "torchnormfit.cache"
ENTRY_FORMAT = "torchnormfit.channel_stats"
SCHEMA_VERSION = 2
LOCK_TIMEOUT_S = 60.0
_STORED = ("count", "mean", "m2", "std", "min", "max")
_MAX_CHANNELS = 65536
_RESERVED_ATTRS = ("format", "schema_version", "key", "sha256")
_TMP_TAG = "tnf-"
_FOLDER_SUFFIX = ".d"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.h5")
_SAMPLES = "samples"
_ARRAY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ARRAY_DTYPES = ("float32", "float64", "int64")
_MAX_ARRAYS = 64
_MAX_ARRAY_ELEMENTS = 2**24
_MAX_HEAP_BYTES = 64 * 2**20
_HEAP_SIGNATURE = b"GCOL\x01"  # a global heap collection header, version 1
_LINK_NAMES = {h5l.TYPE_SOFT: "SoftLink", h5l.TYPE_EXTERNAL: "ExternalLink"}  # h5py's classes for them
_PY_OBJECT = h5t.py_create(h5py.string_dtype())  # h5py's memory type for a variable-length string (bytes)
_IMAGE_BYTES = 2**20  # a file this small is read whole (an entry file is; a foreign one is read only as needed)


class CacheError(ValueError):
    """A cache file or entry that cannot be used: corrupt, foreign, newer or invalid."""


class _UnreadableCache(CacheError):
    """The file cannot be opened as HDF5 at all: corrupt, truncated or not HDF5."""


class _NewerEntry(CacheError):
    """A file or entry written by a newer torchnormfit: never rewritten or replaced by this one."""


class _NoPermission(CacheError):
    """The file exists but this process may not read it: not damage, never moved aside."""


class CacheWarning(UserWarning):
    """A cache problem that torchnormfit worked around (refit, or stats not saved)."""


@dataclass(frozen=True)
class CacheEntry:
    """One validated cache entry: its key, statistics, provenance attributes and per-sample arrays."""

    key: str
    stats: ChannelStats
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict, compare=False)


def default_cache_path() -> Path:
    """``$TORCHNORMFIT_CACHE``, else ``$XDG_CACHE_HOME/torchnormfit/stats.h5`` (XDG default ``~/.cache``)."""
    explicit = os.environ.get("TORCHNORMFIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative (or empty) value is invalid and ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchnormfit" / "stats.h5"


def check_key(key: str) -> str:
    """Reject keys that cannot name one HDF5 group."""
    if not isinstance(key, str) or not key or key in {".", ".."} or "/" in key or "\x00" in key:
        raise ValueError(
            f"A cache key must be a non-empty string without '/' and not '.' or '..'. Got {key!r}."
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"A cache key must be valid Unicode text (no lone surrogates). Got {key!r}.") from None
    return key


def entry_folder(path: str | os.PathLike) -> Path:
    """The folder holding the entry files of cache ``path``: ``<path>.d`` beside the file a link names.

    Examples
    --------
    >>> entry_folder("/tmp/stats.h5")
    PosixPath('/tmp/stats.h5.d')
    """
    return _folder(_resolve(Path(path)))


def _folder(real: Path) -> Path:
    return real.with_name(real.name + _FOLDER_SUFFIX)


def _resolve(path: Path) -> Path:
    """A link is followed to the file it names, so its folder and lock are the target's."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _entry_name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest() + ".h5"


def _entry_file(real: Path, key: str) -> Path:
    """Where entry ``key`` of the cache at ``real`` (a path :func:`_resolve` gave) is kept."""
    return _folder(real) / _entry_name(key)


def _entry_files(real: Path) -> list[Path]:
    folder = entry_folder(real)
    if not folder.is_dir():
        return []
    return sorted(folder / item.name for item in os.scandir(folder) if _ENTRY_NAME.fullmatch(item.name))


def _check_not_directory(real: Path) -> None:
    if real.is_dir():
        raise CacheError(f"The cache path {real} is a directory; give a file path such as {real / 'stats.h5'}.")


# --- reading -----------------------------------------------------------------------------------


def _check_cache_file(path: Path) -> None:
    """Refuse a cache path that is not a regular file (a directory, a FIFO, a device) before opening it."""
    try:
        mode = os.stat(path).st_mode  # one look: a writer may remove and re-add an entry file meanwhile
    except FileNotFoundError:  # removed since it was seen (an entry file a writer removed)
        raise FileNotFoundError(errno.ENOENT, "No such cache file", str(path)) from None
    if stat.S_ISDIR(mode):
        _check_not_directory(path)
    if not stat.S_ISREG(mode):
        raise CacheError(f"The cache path {path} is not a regular file; give the path of an HDF5 file.")


class _CheckedReader:
    """The file object HDF5 reads a cache file through (h5py's ``fileobj`` driver hands each read to it).

    Variable-length strings (every string attribute h5py writes) live in global heap collections, and
    HDF5 2.0 loops forever on a damaged one (an object of size 0 never advances its parser). HDF5 reads
    a collection starting at its address, so each read that starts with a collection header is walked
    here first, with the HDF5 file format specification's layout: "GCOL", version 1, 3 reserved bytes,
    the collection size; then objects of index (2 bytes), reference count (2), reserved (4), size, data
    padded to 8 bytes, index 0 being the free space that ends the collection. Only what HDF5 asks for
    is read, so time and memory do not grow with the file.

    A file of at most ``_IMAGE_BYTES`` (every entry file) is read whole instead, in one read: when every
    collection header in its bytes (every place HDF5 could read one from) walks cleanly, :meth:`open`
    hands HDF5 the bytes as a file image, which it reads without a Python call per read; otherwise HDF5
    reads through this object, which raises the error for the collection HDF5 reads.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        size = os.fstat(self._file.fileno()).st_size
        self._image = _read_whole(self._file.fileno(), size) if size <= _IMAGE_BYTES else None
        self._size = size if self._image is None else len(self._image)  # a shorter read: the bytes HDF5 gets
        self._lengths = self._size_of_lengths(self._image or os.pread(self._file.fileno(), 4096 + 16, 0))

    @staticmethod
    def _size_of_lengths(head: bytes) -> int:
        for base in (0, 512, 1024, 2048, 4096):  # the superblock may follow a user block
            if head[base : base + 8] == b"\x89HDF\r\n\x1a\n" and len(head) > base + 14:
                lengths = head[base + 14] if head[base + 8] in (0, 1) else head[base + 10]
                return lengths if lengths in (2, 4, 8) else 8
        return 8  # HDF5 refuses the file itself

    def open(self) -> h5py.File:
        """The file opened read-only by HDF5: from its image when it has one whose heaps all walk, else via reads."""
        if self._image is not None and self._heaps_walk(self._image):
            try:
                return h5py.File(h5f.open_file_image(self._image))
            except ValueError:  # "Not a file id": HDF5 says why when it reads the file through this object
                pass
        return h5py.File(self, "r")

    def _heaps_walk(self, image: bytes) -> bool:
        """Whether every collection header in ``image`` walks cleanly (a false match in data only costs the image)."""
        view = memoryview(image)
        at = image.find(_HEAP_SIGNATURE)
        while at >= 0:
            try:
                self._check_heap(at, view[at:])
            except _UnreadableCache:
                return False
            at = image.find(_HEAP_SIGNATURE, at + 1)
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int = -1) -> bytes:
        at = self._file.tell()
        data = self._file.read(size)
        if data[:5] == _HEAP_SIGNATURE:  # a collection header (anything else HDF5 rejects by version)
            self._check_heap(at, data)
        return data

    def close(self) -> None:
        self._file.close()

    def _check_heap(self, at: int, data: bytes | memoryview) -> None:
        lengths = self._lengths
        header = 8 + lengths
        size = int.from_bytes(data[8 : 8 + lengths], "little")
        if size < header or at + size > self._size:
            raise _UnreadableCache(
                f"{self.path} is damaged or truncated: the global heap at byte {at} claims {size} bytes, "
                f"the file has {self._size}."
            )
        if size > _MAX_HEAP_BYTES:
            raise _UnreadableCache(
                f"{self.path} is damaged or not a cache: its global heap at byte {at} has {size} bytes; a "
                f"torchnormfit cache never needs more than {_MAX_HEAP_BYTES}."
            )
        if len(data) < size:
            return  # HDF5 reads the first 4 KiB, then the whole collection, which is walked then
        position = header
        while position + header <= size:  # a smaller rest is free space
            index = int.from_bytes(data[position : position + 2], "little")
            object_size = int.from_bytes(data[position + 8 : position + header], "little")
            step = header + -(-object_size // 8) * 8 if index else object_size
            if step <= 0 or position + step > size:
                raise _UnreadableCache(
                    f"{self.path} is damaged: the global heap at byte {at} has an object of size {object_size} "
                    f"at byte {at + position} that {'does not fit' if step > 0 else 'HDF5 would loop on'}."
                )
            position += step


def _read_whole(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the file (fewer if it is shorter), however many reads it takes."""
    parts, have = [], 0
    while have < size:
        part = os.pread(fd, size - have, have)
        if not part:
            break
        parts.append(part)
        have += len(part)
    return b"".join(parts)


@contextlib.contextmanager
def _open_cache(path: Path) -> Iterator[h5py.File]:
    """Open an existing cache file read-only and check that it is ours and not newer."""
    _check_cache_file(path)
    try:
        reader = _CheckedReader(path)
    except PermissionError:  # not a damaged file: never to be moved aside as one
        raise _NoPermission(f"The cache file {path} is not readable (permission denied); fix its permissions or "
                            "use another cache path.") from None
    try:
        try:
            handle = reader.open()
        except CacheError:
            raise
        except Exception as error:  # h5py raises OSError, but a damaged superblock can surface as anything
            raise _UnreadableCache(f"{path} is not a readable HDF5 file (corrupt or truncated?): {error}") from error
        with handle:
            _check_root(handle, path)
            yield handle
    finally:
        reader.close()


def _check_root(handle: h5py.File, path: Path) -> None:
    try:
        root = {name: _named_attr(handle.id, name) for name in ("format", "schema_version")}
        fmt = _attr_str(root, "format")
        version = root["schema_version"]
    except CacheError:
        raise
    except Exception as error:
        raise _UnreadableCache(f"{path} is damaged: its root attributes cannot be read ({error}).") from error
    if fmt != FILE_FORMAT:
        raise CacheError(
            f"{path} is an HDF5 file but not a torchnormfit cache (format attribute {fmt!r}, "
            f"expected {FILE_FORMAT!r}). Choose another cache path."
        )
    _check_version(version, f"{path}")


def _named_attr(obj: h5g.GroupID, name: str) -> Any:
    """Attribute ``name`` of ``obj`` as h5py's ``attrs`` reads it, or None if there is none."""
    encoded = name.encode("ascii")
    return _read_attr(obj, h5a.open(obj, encoded))[1] if h5a.exists(obj, encoded) else None


def _read_attrs(obj: h5g.GroupID) -> dict[str | bytes, Any]:
    """Every attribute of ``obj`` as h5py's ``attrs`` reads them (read once: a read costs HDF5 a lookup)."""
    return dict(_read_attr(obj, h5a.open(obj, index=index)) for index in range(h5a.get_num_attrs(obj)))


def _read_attr(obj: h5g.GroupID, attr: h5a.AttrID) -> tuple[str | bytes, Any]:
    """An attribute's name and value, as h5py's ``attrs`` reads them; scalar strings and numbers (all a fit
    writes) by a shorter path: h5py's costs one and a half times as much."""
    name = attr.name
    try:
        name = name.decode("utf-8")
    except UnicodeDecodeError:  # h5py's name for it too
        pass
    kind = attr.get_type()
    if attr.get_space().get_simple_extent_type() == h5s.SCALAR:
        if isinstance(kind, h5t.TypeStringID) and kind.is_variable_str():
            value = np.zeros((), object)
            attr.read(value, mtype=_PY_OBJECT)
            return name, value[()].decode("utf-8", "surrogateescape")
        if isinstance(kind, (h5t.TypeIntegerID, h5t.TypeFloatID)):
            value = np.zeros((), kind.dtype)
            attr.read(value)
            return name, value[()]
    return name, h5py.Group(obj).attrs[name]


def _attr_str(attrs: Mapping[str, Any], name: str) -> str | None:
    value = attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _check_version(version: Any, where: str) -> None:
    if isinstance(version, np.ndarray) and version.shape == ():
        version = version[()]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        raise CacheError(f"{where} has no integer schema_version attribute (got {version!r}).")
    if int(version) > SCHEMA_VERSION:
        raise _NewerEntry(
            f"{where} uses schema version {int(version)}, newer than this torchnormfit reads "
            f"({SCHEMA_VERSION}). Upgrade torchnormfit or use another cache path."
        )
    if int(version) < 1:
        raise CacheError(f"{where} has schema version {int(version)}; versions start at 1.")


def _link(group: h5py.Group, name: str, where: str) -> h5py.HardLink | h5py.SoftLink | h5py.ExternalLink | None:
    """The link ``name`` in ``group`` without following it (an external link may name any file, even a FIFO)."""
    try:
        return group.get(name, getlink=True)
    except CacheError:
        raise
    except Exception as error:
        raise CacheError(f"{where} cannot be looked up (damaged file?): {error}") from error


def read_entry(path: str | os.PathLike, key: str) -> CacheEntry | None:
    """The validated entry ``key`` of the cache ``path``, or None if the cache or the key does not exist.

    The entry file in ``<path>.d/`` is read if there is one, else the single file ``path``.

    Raises
    ------
    CacheError
        The file is corrupt, foreign or newer, or the entry fails validation.
    ValueError
        ``key`` cannot name an entry (see :func:`check_key`).
    """
    check_key(key)
    real = _resolve(Path(path))
    _check_not_directory(real)
    file = _entry_file(real, key)
    if os.path.lexists(file):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: as if it had not been there
            return _read_entry_file(file, key)
    if not os.path.lexists(real):
        return None
    with _open_cache(real) as handle:
        if _link(handle, key, f"cache entry {key!r} in {real}") is None:
            return None
        return _read_group(handle, key, real)


def list_entries(path: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every valid entry of a cache (default: :func:`default_cache_path`), sorted by key.

    Invalid entries are skipped with a :class:`CacheWarning`.
    """
    real = _resolve(Path(path) if path is not None else default_cache_path())
    _check_not_directory(real)
    return [entry for _, (entry, _) in sorted(_scan(real).items())]


def _scan(real: Path) -> dict[str, tuple[CacheEntry, Path]]:
    """Every valid entry with the file it is in: the single file's, then the entry files' over them."""
    found: dict[str, tuple[CacheEntry, Path]] = {}
    if os.path.lexists(real):
        with _open_cache(real) as handle:
            for key in _keys(handle, real):
                try:
                    found[key] = (_read_group(handle, key, real), real)
                except CacheError as error:
                    warnings.warn(str(error), CacheWarning, stacklevel=3)
    for file in _entry_files(real):
        try:
            entry = _read_entry_file(file)
        except FileNotFoundError:  # removed since the folder was listed
            continue
        except CacheError as error:
            warnings.warn(str(error), CacheWarning, stacklevel=3)
            continue
        found[entry.key] = (entry, file)
    return found


def _keys(handle: h5py.File, path: Path) -> list[str]:
    """The entry names of an open cache file, sorted; a damaged list of names is an unreadable file."""
    try:
        return sorted(handle.keys())
    except CacheError:
        raise
    except Exception as error:
        raise _UnreadableCache(f"{path} is damaged: its entries cannot be listed ({error}).") from error


def _read_entry_file(file: Path, key: str | None = None) -> CacheEntry:
    """The one entry of an entry file, which must be the key its name is made from (and ``key`` if given)."""
    with _open_cache(file) as handle:
        names = _keys(handle, file)
        if len(names) != 1 or _entry_name(names[0]) != file.name or key not in (None, names[0]):
            raise CacheError(
                f"The entry file {file} holds {names[:5]}, not the one entry its name stands for "
                f"(the SHA-256 of the key){f' ({key!r})' if key is not None else ''}. Remove the file."
            )
        return _read_group(handle, names[0], file)


def _read_group(handle: h5py.File, key: str, path: Path) -> CacheEntry:
    where = f"cache entry {key!r} in {path}"
    try:
        return _read_group_unchecked(handle, key, where)
    except CacheError:
        raise
    except Exception as error:  # HDF5 reports damage as OSError, KeyError, RuntimeError, ValueError, ...
        raise CacheError(f"{where} cannot be read (damaged file?): {type(error).__name__}: {error}") from error


def _read_group_unchecked(handle: h5py.File, key: str, where: str) -> CacheEntry:
    group = _stored(handle.id, key, where, h5g.GroupID, "a group stored in the file")
    attrs = _read_attrs(group)
    if _attr_str(attrs, "format") != ENTRY_FORMAT:
        raise CacheError(f"{where} has format {_attr_str(attrs, 'format')!r}, expected {ENTRY_FORMAT!r}.")
    _check_version(attrs.get("schema_version"), where)
    values = {name: _read_vector(group, name, where) for name in _STORED}
    shapes = {v.shape for v in values.values()}
    if len(shapes) != 1:
        raise CacheError(f"{where} has datasets of different lengths: { {n: v.shape for n, v in values.items()} }.")
    stats = ChannelStats._owned(*(torch.from_numpy(values[name]) for name in ("count", "mean", "m2", "min", "max")))
    _validate(stats, values, where)
    arrays = _read_arrays(group, where)
    checksum = attrs.get("sha256")  # last: it catches damage that still looks like valid statistics
    if checksum is not None:
        if isinstance(checksum, bytes):
            checksum = checksum.decode("ascii", "replace")
        if checksum != _checksum(values, arrays):
            raise CacheError(f"{where}: the values do not match their sha256 checksum (damaged on disk?).")
    plain = {name: _plain(value) for name, value in attrs.items()}
    return CacheEntry(key=key, stats=stats, attrs=plain, arrays=arrays)


def _stored(parent: h5g.GroupID, name: str, where: str, kind: type, what: str) -> Any:
    """The object ``name`` of ``parent``, which must be a hard link to a ``kind`` (a link is never followed).

    h5py's low-level calls: its high-level objects cost several HDF5 calls per property.
    """
    label = f"{where} is" if isinstance(parent, h5f.FileID) else f"{where}: {name!r} is"
    encoded = name.encode("utf-8")
    if not parent.links.exists(encoded):
        raise CacheError(f"{where} has no {'dataset' if kind is h5d.DatasetID else 'group'} {name!r}.")
    link = parent.links.get_info(encoded).type
    if link != h5l.TYPE_HARD:
        raise CacheError(f"{label} a {_LINK_NAMES.get(link, 'user-defined link')}, not {what}.")
    item = h5o.open(parent, encoded)
    if not isinstance(item, kind):
        other = "Dataset" if isinstance(item, h5d.DatasetID) else "Datatype"  # h5py's names
        raise CacheError(f"{label} {'not a dataset' if kind is h5d.DatasetID else f'a {other}, not a group'}.")
    if kind is h5d.DatasetID and _stored_outside(item):
        raise CacheError(f"{where}: {name!r} keeps its data outside the file (virtual or external storage).")
    return item


def _stored_outside(dataset: h5d.DatasetID) -> bool:
    """Whether the dataset's data is in other files (virtual or external storage)."""
    plist = dataset.get_create_plist()
    return plist.get_layout() == h5d.VIRTUAL or plist.get_external_count() > 0


def _read_data(dataset: h5d.DatasetID, dtype: np.dtype) -> np.ndarray:
    """All of a dataset's values, converted by HDF5 to ``dtype``."""
    array = np.empty(dataset.shape, dtype)
    if array.size:
        dataset.read(h5s.ALL, h5s.ALL, array)
    return array


def _read_vector(group: h5g.GroupID, name: str, where: str) -> np.ndarray:
    """One (C,) float64 dataset, checked by its metadata before a byte of data is read."""
    dataset = _stored(group, name, where, h5d.DatasetID, "a dataset stored in the group")
    dtype, shape = dataset.dtype, dataset.shape
    if dtype.kind != "f" or dtype.itemsize != 8 or dtype.fields is not None:
        raise CacheError(f"{where}: {name!r} has dtype {dtype}, expected float64.")
    if shape is None or len(shape) != 1 or not 1 <= shape[0] <= _MAX_CHANNELS:  # None: an empty dataspace
        raise CacheError(f"{where}: {name!r} has shape {shape}, expected (C,) with 1 <= C <= {_MAX_CHANNELS}.")
    return _read_data(dataset, np.dtype(np.float64))


def _read_arrays(group: h5g.GroupID, where: str) -> dict[str, np.ndarray]:
    """The per-sample arrays under ``samples/`` (schema 2), each checked by its metadata before it is read."""
    if not group.links.exists(_SAMPLES.encode("ascii")):
        return {}
    samples = _stored(group, _SAMPLES, where, h5g.GroupID, "a group stored in the entry")
    if samples.get_num_objs() > _MAX_ARRAYS:
        raise CacheError(f"{where}: '{_SAMPLES}' holds {samples.get_num_objs()} arrays, at most {_MAX_ARRAYS} are "
                         "allowed.")
    arrays = {}
    for name in sorted(name.decode("utf-8", "surrogateescape") for name in samples):
        label = f"{_SAMPLES}/{name}"
        if not _ARRAY_NAME.fullmatch(name):
            raise CacheError(f"{where}: {label!r} is not named by a lowercase identifier ([a-z][a-z0-9_]*).")
        dataset = _stored(samples, name, where, h5d.DatasetID, "a dataset stored in the group")
        dtype, shape = dataset.dtype, dataset.shape
        if dtype.fields is not None or dtype.name not in _ARRAY_DTYPES:
            raise CacheError(f"{where}: {label!r} has dtype {dtype}, expected {', '.join(_ARRAY_DTYPES)}.")
        if shape is None or len(shape) not in (1, 2) or math.prod(shape) > _MAX_ARRAY_ELEMENTS:
            raise CacheError(f"{where}: {label!r} has shape {shape}, expected 1-D or 2-D with at most "
                             f"{_MAX_ARRAY_ELEMENTS} elements.")
        arrays[name] = _read_data(dataset, dtype.newbyteorder("="))
    return arrays


def _checksum(values: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> str:
    """The documented sha256 of an entry: the six vectors, then each array with a line naming it."""
    digest = hashlib.sha256()
    for name in _STORED:
        digest.update(np.ascontiguousarray(values[name], dtype="<f8").tobytes())
    for name in sorted(arrays):
        array = arrays[name]
        little = array.dtype.newbyteorder("<")
        digest.update(f"{name} {little.str} {'x'.join(map(str, array.shape))}\n".encode("ascii"))
        digest.update(np.ascontiguousarray(array, dtype=little).tobytes())
    return digest.hexdigest()


def _validate(stats: ChannelStats, values: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse statistics no fit gives; ``values`` are their six vectors (``_STORED``) as float64 numpy arrays.

    Checked on Python floats: a cache hit would pay more for the first calls of torch or numpy functions.
    """
    count, mean, m2, std, low, high = (values[name].tolist() for name in _STORED)
    if not 1 <= len(mean) <= _MAX_CHANNELS:
        raise CacheError(f"{where} has {len(mean)} channels, expected 1 to {_MAX_CHANNELS}.")
    problems = []
    if not all(map(math.isfinite, count)):
        problems.append("count is not finite")
    elif not all(n > 0 for n in count):
        problems.append("count is not positive")
    elif not all(n == round(n) for n in count):
        problems.append("count is not a whole number of pixels")
    for name, vector in (("mean", mean), ("m2", m2), ("min", low), ("max", high)):
        if not all(map(math.isfinite, vector)):
            problems.append(f"{name} is not finite")
    if problems:  # what follows would only repeat these
        raise CacheError(f"{where} failed validation: {', '.join(problems)}.")
    exact = (math.sqrt(m / n) for m, n in zip(m2, count))  # lazy: read only once m2 >= 0 is known
    if min(m2) < 0:
        problems.append("m2 is negative")
    elif not all(map(math.isfinite, std)):
        problems.append("std is not finite")
    elif min(std) < 0:
        problems.append("std is negative")
    elif 0 in std and any(s == 0 and not c for s, c in zip(std, stats.constant_channels().tolist())):
        problems.append("std is zero for a channel whose m2 is not")
    elif not all(abs(s - e) <= 1e-9 * e for s, e in zip(std, exact)):  # torch.allclose(rtol=1e-9, atol=0)
        problems.append("std does not equal sqrt(m2 / count)")
    # The float64 mean of n equal values may land a few ulps outside them, so allow for rounding.
    slack = [64 * sys.float_info.epsilon * max(abs(lo), abs(hi)) for lo, hi in zip(low, high)]
    if not all(lo - e <= m <= hi + e for m, lo, hi, e in zip(mean, low, high, slack)):
        problems.append("mean is outside [min, max]")
    if problems:
        raise CacheError(f"{where} failed validation: {', '.join(problems)}.")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# --- writing -----------------------------------------------------------------------------------


def write_entry(
    path: str | os.PathLike,
    key: str,
    stats: ChannelStats,
    attrs: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Add or replace entry ``key`` atomically in its own file under ``<path>.d/``; no other entry is touched.

    ``arrays`` (optional) are per-sample arrays stored with the entry: names are lowercase identifiers,
    values float32, float64 or int64 arrays of 1 or 2 dimensions (at most 2**24 elements each).

    Raises
    ------
    OSError
        The entry could not be written (permissions, disk full, ...); the previous state is intact.
    CacheError
        The single file ``path`` or the key's entry file is foreign or newer (left as it is), or ``stats``
        fail validation.
    ValueError
        ``key`` cannot name an entry, ``attrs`` uses a reserved name, or ``arrays`` is not storable.

    Examples
    --------
    >>> write_entry("/tmp/stats.h5", "demo", stats, {"dataset": "demo"},  # doctest: +SKIP
    ...             arrays={"index": np.arange(4)})
    """
    check_key(key)
    reserved = sorted(set(attrs) & set(_RESERVED_ATTRS))
    if reserved:
        raise ValueError(f"The attribute names {reserved} are reserved for the cache schema; rename them.")
    _validate(stats, _vectors(stats), f"statistics for {key!r}")
    data = _entry_file_bytes(key, stats, attrs, _check_arrays(key, arrays))  # built before taking the lock
    with _locked(Path(path)) as real:
        _remove_dead_writers_files(real)
        _check_single_file(real)
        target = _entry_file(real, key)
        created = not target.parent.is_dir()
        target.parent.mkdir(exist_ok=True)
        if os.path.lexists(target):
            _check_replaced(target, key)
        _atomic_write(real, target, data, stat.S_IMODE(target.parent.stat().st_mode) & 0o666)
        if created:
            _fsync_dir(real.parent)


def _check_arrays(key: str, arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The arrays as little-endian C-contiguous numpy arrays, or a ValueError saying what cannot be stored."""
    if not arrays:
        return {}
    if len(arrays) > _MAX_ARRAYS:
        raise ValueError(f"An entry stores at most {_MAX_ARRAYS} arrays; {key!r} was given {len(arrays)}.")
    checked = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name):
            raise ValueError(f"Array names must be lowercase identifiers ([a-z][a-z0-9_]*, at most 64 characters). "
                             f"Got {name!r} for entry {key!r}.")
        array = np.asarray(value)
        if array.dtype.name not in _ARRAY_DTYPES:
            raise ValueError(f"Array {name!r} of entry {key!r} has dtype {array.dtype}; the cache stores "
                             f"{', '.join(_ARRAY_DTYPES)}: convert it (for example .astype(np.float32)).")
        if array.ndim not in (1, 2) or array.size > _MAX_ARRAY_ELEMENTS:
            raise ValueError(f"Array {name!r} of entry {key!r} has shape {array.shape}; the cache stores 1-D or 2-D "
                             f"arrays of at most {_MAX_ARRAY_ELEMENTS} elements.")
        checked[name] = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return checked


def _entry_file_bytes(
    key: str, stats: ChannelStats, attrs: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> bytes:
    """An entry file, built in memory: HDF5 itself never writes to the disk, because HDF5 2.0 crashes the
    process (SIGSEGV) when a write fails halfway (disk full, EFBIG); plain ``os.write`` fails cleanly."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as new:
        _write_root(new)
        _write_group(new, key, stats, attrs, arrays)
    return buffer.getvalue()


def _write_root(handle: h5py.File) -> None:
    handle.attrs["format"] = FILE_FORMAT
    handle.attrs["schema_version"] = SCHEMA_VERSION


def _check_single_file(real: Path) -> None:
    """A foreign or newer single file refuses the write; a corrupt one is moved aside, never deleted."""
    if not os.path.lexists(real):
        return
    try:
        with _open_cache(real):
            pass
    except _UnreadableCache as error:
        aside = _keep_aside(real, copy=False)
        warnings.warn(f"{error} It was moved to {aside}; the cache goes on in {entry_folder(real)}.",
                      CacheWarning, stacklevel=4)


def _check_replaced(target: Path, key: str) -> None:
    """The entry file about to be replaced: a newer or unreadable one stays; a damaged one is moved aside."""
    try:
        _read_entry_file(target, key)
    except (_NewerEntry, _NoPermission) as error:
        raise type(error)(f"{error} The entry file is left as it is and {key!r} was not saved.") from error
    except CacheError as error:
        aside = _keep_aside(target, copy=False)
        warnings.warn(f"{error} It was moved to {aside}; the new entry replaces it.", CacheWarning, stacklevel=4)


def _atomic_write(real: Path, target: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file next to ``real``, fsync it and move it onto ``target``."""
    fd, tmp_name = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.{_TMP_TAG}", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError):
            raise OSError(
                error.errno,
                f"Could not write the cache {real} ({target.name}); the previous file is unchanged: {error}",
            ) from error
        raise


def delete_entry(path: str | os.PathLike, key: str) -> bool:
    """Remove entry ``key``; True if it was there."""
    return bool(delete_entries(path, [key]))


def delete_entries(path: str | os.PathLike, keys: Iterable[str]) -> list[str]:
    """Remove the entries ``keys`` in one operation (one lock, the single file rewritten at most once).

    Returns the keys that were there, in the order given.
    """
    keys = list(dict.fromkeys(check_key(key) for key in keys))
    with _removing(path) as real:
        return [] if real is None else _delete_locked(real, keys)


def prune_entries(
    path: str | os.PathLike,
    *,
    older_than: float | None = None,
    keep_last: int | None = None,
    now: float | None = None,
) -> list[str]:
    """Remove every entry that no rule keeps: ``older_than`` keeps those created less than that many seconds
    before ``now`` (default: the current time), ``keep_last`` keeps the newest N. Returns the keys removed.

    An entry's time is its ``created_utc`` attribute (ISO 8601), else the time its file was written.
    Entries that fail validation are left alone (listed with a :class:`CacheWarning`).

    Examples
    --------
    >>> prune_entries("/tmp/stats.h5", older_than=30 * 86400, keep_last=10)  # doctest: +SKIP
    ['ImageFiles-0f3c...']
    """
    if older_than is None and keep_last is None:
        raise ValueError("prune_entries needs older_than (seconds) or keep_last (a count), or both.")
    if (older_than is not None and not older_than >= 0) or (keep_last is not None and keep_last < 0):
        raise ValueError(f"older_than and keep_last must not be negative. Got {older_than!r} and {keep_last!r}.")
    with _removing(path) as real:
        if real is None:
            return []
        newest_first = sorted(((_created(entry, file), key) for key, (entry, file) in _scan(real).items()),
                              reverse=True)
        now = time.time() if now is None else now
        kept = {key for _, key in newest_first[: keep_last or 0]}
        if older_than is not None:
            kept |= {key for created, key in newest_first if now - created <= older_than}
        return _delete_locked(real, [key for _, key in newest_first if key not in kept])


@contextlib.contextmanager
def _removing(path: str | os.PathLike) -> Iterator[Path | None]:
    """The cache's real path, under its lock, dead writers' files gone; None (and no lock) if there is no cache."""
    real = _resolve(Path(path))
    _check_not_directory(real)
    if not os.path.lexists(real) and not entry_folder(real).is_dir():
        yield None
        return
    with _locked(real) as real:
        _remove_dead_writers_files(real)
        yield real


def _created(entry: CacheEntry, file: Path) -> float:
    """The entry's ``created_utc`` as a POSIX time, else its file's modification time."""
    text = entry.attrs.get("created_utc")
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(text)
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return file.stat().st_mtime


def _delete_locked(real: Path, keys: list[str]) -> list[str]:
    """Remove ``keys`` from the single file (one rewrite) and the entry folder. Call under the lock."""
    in_file: set[str] = set()
    if os.path.lexists(real):
        with _open_cache(real) as handle:
            in_file = {key for key in keys if _link(handle, key, f"cache entry {key!r} in {real}") is not None}
    if in_file:
        _rewrite(real, drop=in_file)
    in_folder = {key for key in keys if os.path.lexists(_entry_file(real, key))}
    for key in in_folder:
        os.unlink(_entry_file(real, key))
    if in_folder:
        _fsync_dir(entry_folder(real))
    return [key for key in keys if key in in_file or key in in_folder]


def _lock_timeout() -> float:
    value = os.environ.get("TORCHNORMFIT_CACHE_LOCK_TIMEOUT")
    if not value:
        return LOCK_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"TORCHNORMFIT_CACHE_LOCK_TIMEOUT must be a number of seconds. Got {value!r}."
        ) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Path]:
    """Hold ``<file>.lock`` (flock: the OS releases it when its holder dies); yields the file's real path."""
    path = _resolve(path)  # write through a link to the file it names, not over the link
    _check_not_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = _lock_timeout()
    lock = filelock.FileLock(f"{path}.lock", timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout as error:
        raise OSError(
            errno.ETIMEDOUT,
            f"Could not lock {path}.lock within {timeout:g} s: another process is writing the cache. "
            "A lock held by a process that died is released by the operating system, so a live process holds "
            "it; wait for it, or raise $TORCHNORMFIT_CACHE_LOCK_TIMEOUT.",
        ) from error
    except OSError as error:
        raise OSError(
            error.errno,
            f"Could not create or lock {path}.lock, so the cache {path} was not written (is its folder "
            f"writable?): {error}",
        ) from error
    try:
        yield path
    finally:
        lock.release()


def _rewrite(path: Path, drop: set[str]) -> None:
    """Write the single file anew without the entries ``drop``, then swap it in. Call under the lock."""
    if not os.access(path, os.W_OK):
        raise PermissionError(
            errno.EACCES,
            f"The cache file {path} is read-only; it was left as it is. Make it writable or use another cache path.",
            str(path),
        )
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as new:
        _write_root(new)
        skipped = _copy_entries(path, new, drop)
    if skipped:
        aside = _keep_aside(path, copy=True)
        warnings.warn(
            f"Entries of {path} that cannot be used were not carried over ({'; '.join(skipped)}). The old "
            f"file is kept, unchanged, at {aside}; every valid entry is in the new file.",
            CacheWarning,
            stacklevel=4,
        )
    _atomic_write(path, path, buffer.getvalue(), stat.S_IMODE(path.stat().st_mode))


def _copy_entries(old: Path, new: h5py.File, drop: set[str]) -> list[str]:
    """Carry every valid entry of ``old`` except ``drop`` over into ``new``; the entries left behind, described.

    Entries are read through the validating reader and written afresh, never copied object by object:
    HDF5's object copy crashes the process on some damaged objects, and an entry that fails validation
    would never be used anyway (the caller keeps a copy of the old file when anything is left behind).
    """
    skipped = []
    try:
        with _open_cache(old) as source:
            for name in sorted(source.keys()):
                if name in drop:
                    continue
                try:
                    entry = _read_group(source, name, old)
                except _NewerEntry as error:
                    raise _NewerEntry(
                        f"{old} holds entry {name!r} of a schema version newer than this torchnormfit writes "
                        f"({SCHEMA_VERSION}); the file is left as it is. Upgrade torchnormfit or use another "
                        "cache path."
                    ) from error
                except CacheError as error:
                    skipped.append(str(error))
                    continue
                provenance = {k: v for k, v in entry.attrs.items() if k not in _RESERVED_ATTRS}
                _write_group(new, name, entry.stats, provenance, entry.arrays, lenient=True)
    except _NewerEntry:
        raise
    except Exception as error:  # the list of entries itself is damaged
        skipped.append(f"the entries of {old} cannot be listed ({type(error).__name__}: {error})")
    return skipped


def _keep_aside(path: Path, copy: bool) -> Path:
    """Move (or hard-link, with ``copy``) the current file to a new ``<file>.corrupt-<time>-<pid>[-n]`` name."""
    stem = f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside = path.with_name(stem)
    number = 1
    while os.path.lexists(aside):  # under the lock no other writer picks names; never replace an earlier one
        aside = path.with_name(f"{stem}-{number}")
        number += 1
    if not copy:
        os.rename(path, aside)
        return aside
    try:
        os.link(path, aside)
    except OSError:  # a file system without hard links
        shutil.copy2(path, aside)
    return aside


def _remove_dead_writers_files(path: Path) -> None:
    """Delete temporary files left by writers killed mid-write. Only a lock holder writes them, so under the
    lock every one that exists belongs to a process that died."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TMP_TAG}[A-Za-z0-9_]{{8}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _write_group(
    handle: h5py.File,
    key: str,
    stats: ChannelStats,
    attrs: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    lenient: bool = False,
) -> None:
    """Write one entry; ``lenient`` (carrying an old entry over) drops an attribute HDF5 cannot store."""
    group = handle.create_group(key)
    vectors = _vectors(stats)
    for name in _STORED:
        group.create_dataset(name, data=vectors[name])
    if arrays:
        samples = group.create_group(_SAMPLES)
        for name, array in arrays.items():
            samples.create_dataset(name, data=array)
    for name, value in attrs.items():
        try:
            group.attrs[name] = str(value) if isinstance(value, str) else value  # str subclasses (TorchVersion)
        except (TypeError, ValueError):
            if not lenient:
                raise
    group.attrs["format"] = ENTRY_FORMAT
    group.attrs["schema_version"] = SCHEMA_VERSION
    group.attrs["key"] = key
    group.attrs["sha256"] = _checksum(vectors, arrays)


def _vectors(stats: ChannelStats) -> dict[str, np.ndarray]:
    """The six stored vectors (``_STORED``) of ``stats`` as float64 numpy arrays."""
    values = {**stats.to_dict(), "std": stats.std}
    return {name: np.ascontiguousarray(values[name].detach().cpu().numpy(), dtype=np.float64) for name in _STORED}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem allows it
        _fsync(folder)
