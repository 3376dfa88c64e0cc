"""The entry file: one cache entry in one small HDF5 file that plain ``h5py`` opens (layout: docs/cache-format.md).

Its 512-byte HDF5 user block holds ``torchnormfit entry``, ``schema_version 1`` and ``sha256 <hex>`` (of every
byte after the block). A file is read whole, its digest checked, and only then parsed by HDF5, from those
bytes in memory: damage on disk never reaches HDF5's parser (HDF5 2.0 loops forever on some damaged files).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = ["SCHEMA_VERSION", "CacheEntry", "CacheError", "CacheWarning", "NewerEntryError", "NotAnEntryError",
           "check_arrays", "check_attrs", "check_head", "decode", "encode", "validate", "vectors_of"]

MAGIC = b"torchnormfit entry\n"
USER_BLOCK = 512
FORMAT = "torchnormfit.entry"
SCHEMA_VERSION = 1
VECTORS = ("count", "mean", "m2", "std", "min", "max")
RESERVED = ("format", "schema_version", "key", "json_attrs")
ARRAYS = "arrays"
MAX_BYTES = 256 * 2**20
MAX_CHANNELS = 65536
MAX_ARRAY_ELEMENTS = 2**24
_HEAD = re.compile(rb"torchnormfit entry\nschema_version (\d{1,6})\n")
_DIGEST = re.compile(rb"sha256 ([0-9a-f]{64})\n\x00*")
_ARRAY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


class CacheError(ValueError):
    """A cache file or entry that cannot be used: damaged, foreign, newer or invalid."""


class NotAnEntryError(CacheError):
    """A file the library did not write (or may not read): refused, and never moved, replaced or removed."""


class NewerEntryError(NotAnEntryError):
    """An entry file of a newer schema version: read by a newer torchnormfit only, never replaced by this one."""


class CacheWarning(UserWarning):
    """A cache problem that torchnormfit worked around (fitted again, or the statistics were not saved)."""


@dataclass(frozen=True)
class CacheEntry:
    """One validated entry: key, statistics (:attr:`stats`), provenance ``attrs``, numeric ``arrays``.

    ``path`` is the file it was read from, ``size`` its bytes and ``last_read`` the time a fit or
    ``from_cache`` last read it (POSIX seconds; listing does not count).
    """

    key: str
    vectors: dict[str, np.ndarray] = field(repr=False, compare=False)
    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    path: Path | None = None
    size: int = 0
    last_read: float | None = None

    @functools.cached_property
    def stats(self) -> Any:
        """The statistics as a :class:`~torchnormfit.ChannelStats` (imports torch on first use)."""
        import torch

        from ..stats import ChannelStats

        return ChannelStats(*(torch.from_numpy(self.vectors[name]) for name in ("count", "mean", "m2", "min", "max")))


def vectors_of(stats: Any) -> dict[str, np.ndarray]:
    """The six stored float64 vectors of a ChannelStats (``std`` included, as a reader wants it)."""
    values = {**stats.to_dict(), "std": stats.std}
    return {name: np.ascontiguousarray(values[name].detach().cpu().numpy(), dtype=np.float64) for name in VECTORS}


def check_head(head: bytes, where: str) -> None:
    """Refuse a file that is not an entry file (:class:`NotAnEntryError`) or is newer (:class:`NewerEntryError`)."""
    if not head.startswith(MAGIC):
        raise NotAnEntryError(f"{where} is not a torchnormfit entry file (it does not begin with {MAGIC!r}); it is "
                              "left untouched. A cache is a folder of entry files: give a folder, or move the file.")
    match = _HEAD.match(head)
    if match and int(match[1]) > SCHEMA_VERSION:
        raise NewerEntryError(f"{where} has schema version {int(match[1])}, newer than this torchnormfit reads "
                              f"({SCHEMA_VERSION}); it is left as it is. Upgrade torchnormfit or use another cache.")


def _digest_ok(data: bytes) -> bool:
    match = _HEAD.match(data)
    digest = _DIGEST.fullmatch(data, match.end(), USER_BLOCK) if match and len(data) > USER_BLOCK else None
    return digest is not None and digest[1] == hashlib.sha256(memoryview(data)[USER_BLOCK:]).hexdigest().encode()


def encode(key: str, vectors: Mapping[str, np.ndarray], attrs: Mapping[str, Any],
           arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an entry file, built in memory (HDF5 never writes to the disk: HDF5 2.0 crashes the process
    when a write fails halfway, where ``os.write`` fails cleanly)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=USER_BLOCK) as handle:
        handle.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION, "key": key})
        as_json = []
        for name, value in attrs.items():
            stored = _storable(value)
            if stored is None:
                as_json.append(name)
                stored = json.dumps(value)
            handle.attrs[name] = stored
        if as_json:
            handle.attrs["json_attrs"] = json.dumps(as_json)
        for name in VECTORS:
            handle.create_dataset(name, data=vectors[name])
        if arrays:
            group = handle.create_group(ARRAYS)
            for name, array in arrays.items():
                group.create_dataset(name, data=array)
    data = bytearray(buffer.getvalue())
    digest = hashlib.sha256(memoryview(data)[USER_BLOCK:]).hexdigest()
    head = MAGIC + f"schema_version {SCHEMA_VERSION}\nsha256 {digest}\n".encode("ascii")
    data[: len(head)] = head
    return bytes(data)


def _storable(value: Any) -> Any:
    """``value`` as an HDF5 attribute (str, bool, int64, float64, numeric array), or None: store it as JSON."""
    if isinstance(value, str):
        return str(value) if "\x00" not in value else None  # str() of a subclass (torch's TorchVersion)
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, np.integer)):
        return np.int64(value) if -(2**63) <= value < 2**63 else None
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        with contextlib.suppress(ValueError):  # a ragged list
            array = np.asarray(value)
            return array if array.dtype.kind in "iuf" and array.ndim <= 4 else None
    return None


def check_attrs(key: str, attrs: Mapping[str, Any]) -> None:
    """Refuse attributes an entry cannot hold: reserved or non-string names, values that are not JSON."""
    for name, value in attrs.items():
        if not isinstance(name, str) or name in RESERVED or not name or "\x00" in name or "/" in name:
            raise ValueError(f"Entry {key!r}: attribute name {name!r} is reserved or not a plain name "
                             f"({', '.join(RESERVED)} are the schema's); rename it.")
        if _storable(value) is None:
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError) as error:
                raise ValueError(f"Entry {key!r}: attribute {name!r} = {value!r:.80} is neither a number, a "
                                 f"string, a list of numbers nor JSON ({error}); convert it.") from None


def _array_ok(name: Any, dtype: np.dtype, shape: tuple[int, ...] | None) -> bool:
    """An array an entry holds: a lowercase name, numeric, 1 to 4 dimensions, at most 2**24 elements."""
    return isinstance(name, str) and _ARRAY_NAME.fullmatch(name) is not None and dtype.kind in "iuf" \
        and shape is not None and 1 <= len(shape) <= 4 and math.prod(shape) <= MAX_ARRAY_ELEMENTS


def check_arrays(key: str, arrays: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The arrays as little-endian C-ordered numpy arrays, or a ValueError saying what cannot be stored."""
    checked = {}
    for name, value in (arrays or {}).items():
        array = np.asarray(value)
        if not _array_ok(name, array.dtype, array.shape):
            raise ValueError(f"Array {name!r} of entry {key!r} has dtype {array.dtype} and shape {array.shape}; the "
                             "cache stores numeric arrays of 1 to 4 dimensions, at most 2**24 elements, named by "
                             "lowercase identifiers ([a-z][a-z0-9_]*, at most 64 characters).")
        checked[name] = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return checked


def decode(data: bytes, where: str) -> CacheEntry:
    """The entry in ``data`` (a whole entry file), checked: header, digest, then schema and values."""
    check_head(data[:USER_BLOCK], where)
    if not _digest_ok(data):
        raise CacheError(f"{where} is damaged or truncated: its bytes do not match the SHA-256 in its header. "
                         "It is not used.")
    try:
        with h5py.File(io.BytesIO(data), "r") as handle:
            return _read(handle, where)
    except CacheError:
        raise
    except Exception as error:  # a file whose digest matches but which HDF5 refuses: written by hand
        raise CacheError(f"{where} cannot be read: {type(error).__name__}: {error}") from error


def _read(handle: h5py.File, where: str) -> CacheEntry:
    attrs = {name: _plain(value) for name, value in handle.attrs.items()}
    if attrs.get("format") != FORMAT or attrs.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{where} has format {attrs.get('format')!r} version {attrs.get('schema_version')!r}, "
                         f"expected {FORMAT!r} version {SCHEMA_VERSION}.")
    key = attrs.get("key")
    if not isinstance(key, str):
        raise CacheError(f"{where} has no key attribute.")
    for name in json.loads(attrs.get("json_attrs", "[]")):
        attrs[name] = json.loads(attrs[name])
    vectors = {}
    for name in VECTORS:  # each checked by its metadata before its data is read
        dataset = _member(handle, name, h5py.Dataset, where)
        if dataset.dtype != np.float64 or dataset.shape is None or not 1 <= len(dataset) <= MAX_CHANNELS \
                or dataset.ndim != 1:
            raise CacheError(f"{where}: {name!r} is {dataset.dtype} of shape {dataset.shape}, expected float64 "
                             f"(C,), 1 <= C <= {MAX_CHANNELS}.")
        vectors[name] = np.asarray(dataset[()], dtype=np.float64)
    validate(vectors, where)
    arrays = {}
    if handle.get(ARRAYS, getlink=True) is not None:
        group = _member(handle, ARRAYS, h5py.Group, where)
        for name in sorted(group):
            dataset = _member(group, name, h5py.Dataset, where)
            if not _array_ok(name, dataset.dtype, dataset.shape):
                raise CacheError(f"{where}: array {name!r} ({dataset.dtype}, shape {dataset.shape}) is not a "
                                 "lowercase-named numeric array of 1 to 4 dimensions.")
            arrays[name] = dataset[()]
    return CacheEntry(key, vectors, {k: v for k, v in attrs.items() if k != "json_attrs"}, arrays)


def _member(group: h5py.Group, name: str, kind: type, where: str) -> Any:
    """``group[name]``, which must be a ``kind`` stored in this file (a link is never followed)."""
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise CacheError(f"{where}: {name!r} is {'missing' if link is None else type(link).__name__}, "
                         f"expected a {kind.__name__.lower()} stored in the file.")
    item = group[name]
    if not isinstance(item, kind) or (isinstance(item, h5py.Dataset) and (item.is_virtual or item.external)):
        raise CacheError(f"{where}: {name!r} is not a {kind.__name__.lower()} stored in the file.")
    return item


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def validate(vectors: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse statistics no fit gives: one length, whole positive counts, finite values, ``m2 >= 0``,
    ``std == sqrt(m2 / count)``, the mean within ``[min, max]`` (up to rounding). Pure Python floats."""
    if len({vectors[name].shape for name in VECTORS}) != 1:
        raise CacheError(f"{where} has vectors of different lengths: { {n: vectors[n].shape for n in VECTORS} }.")
    count, mean, m2, std, low, high = (vectors[name].tolist() for name in VECTORS)
    problems = [f"{name} is not finite" for name, values in zip(VECTORS, (count, mean, m2, std, low, high))
                if name != "std" and not all(map(math.isfinite, values))]
    if not problems:
        if not all(n > 0 and n == round(n) for n in count):
            problems.append("count is not a positive whole number")
        elif min(m2) < 0:
            problems.append("m2 is negative")
        elif not all(abs(s - math.sqrt(m / n)) <= 1e-9 * math.sqrt(m / n) for s, m, n in zip(std, m2, count)):
            problems.append("std does not equal sqrt(m2 / count)")  # a NaN or infinite std included
        slack = [64 * sys.float_info.epsilon * max(abs(lo), abs(hi)) for lo, hi in zip(low, high)]  # rounding
        if not all(lo - e <= m <= hi + e for m, lo, hi, e in zip(mean, low, high, slack)):
            problems.append("mean is outside [min, max]")
    if problems:
        raise CacheError(f"{where} failed validation: {', '.join(problems)}.")
