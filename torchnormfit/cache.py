"""The HDF5 statistics cache: a documented schema, validated reads, atomic locked writes.

Layout (schema version 1; README "Cache file format")::

    /                      attrs: format="torchnormfit.cache", schema_version=1
    /<key>/                attrs: format="torchnormfit.channel_stats", schema_version=1, key,
                                  created_utc, torch_version, torchvision_version,
                                  torchnormfit_version, dataset, pipeline, num_samples, ddof
    /<key>/count|mean|m2|std|min|max   float64, shape (C,)

Entries written by this version also carry ``sha256``: the hex SHA-256 of the
six datasets' values as little-endian float64 bytes, concatenated in the order
count, mean, m2, std, min, max. It is checked when present, so values damaged
on disk are refused instead of used.

Writers never modify the file in place: under a lock (``<file>.lock``, an
flock the OS releases when its holder dies) they read every valid entry of the
old file, build the new file in memory with the other entries and theirs, write
it to a temporary file in the same folder, fsync it and ``os.replace`` it over
the old one. A crash at any moment leaves the old file or the new one, never a
torn one; the temporary file of a writer that died is removed by the next
writer. Entries that fail validation are not carried over, and the old file is
then kept (``<file>.corrupt-<time>-<pid>``); a corrupt file is moved aside, never
deleted; a foreign or newer file is never written. Readers take no lock.
Nothing is pickled in or out. ``$TORCHNORMFIT_CACHE_LOCK_TIMEOUT`` (seconds,
default 60) bounds the wait for the lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np
import torch

from .stats import ChannelStats

__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheWarning",
    "default_cache_path",
    "read_entry",
    "write_entry",
    "list_entries",
    "delete_entry",
    "check_key",
]

FILE_FORMAT = "torchnormfit.cache"
ENTRY_FORMAT = "torchnormfit.channel_stats"
SCHEMA_VERSION = 1
LOCK_TIMEOUT_S = 60.0
_STORED = ("count", "mean", "m2", "std", "min", "max")
_MAX_CHANNELS = 65536
_RESERVED_ATTRS = ("format", "schema_version", "key", "sha256")
_TMP_TAG = "tnf-"


class CacheError(ValueError):
    """A cache file or entry that cannot be used: corrupt, foreign, newer or invalid."""


class _UnreadableCache(CacheError):
    """The file cannot be opened as HDF5 at all: corrupt, truncated or not HDF5."""


class _NewerEntry(CacheError):
    """An entry written by a newer torchnormfit: the file must not be rewritten by this one."""


class CacheWarning(UserWarning):
    """A cache problem that torchnormfit worked around (refit, or stats not saved)."""


@dataclass(frozen=True)
class CacheEntry:
    """One validated cache entry: its key, statistics and provenance attributes."""

    key: str
    stats: ChannelStats
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


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


# --- reading -----------------------------------------------------------------------------------


def _check_cache_file(path: Path) -> None:
    """Refuse a cache path that is not a regular file (a directory, a FIFO, a device) before opening it."""
    if path.is_dir():
        raise CacheError(f"The cache path {path} is a directory; give a file path such as {path / 'stats.h5'}.")
    if not path.is_file():
        raise CacheError(f"The cache path {path} is not a regular file; give the path of an HDF5 file.")
    if not os.access(path, os.R_OK):  # not a damaged file: never to be moved aside as one
        raise CacheError(f"The cache file {path} is not readable (permission denied); fix its permissions or "
                         "use another cache path.")


def _check_global_heaps(path: Path) -> None:
    """Refuse a file whose global heaps HDF5 could not walk to their end.

    Variable-length strings (every string attribute h5py writes) live in global heap
    collections, and HDF5 2.0 loops forever on a damaged one (an object of size 0 never
    advances its parser). Walk each collection the way HDF5 does, with the HDF5 file format
    specification's layout, before HDF5 does: "GCOL", version 1, 3 reserved bytes, the
    collection size; then objects of index (2 bytes), reference count (2), reserved (4), size,
    data padded to 8 bytes, index 0 being the free space that ends the collection.
    """
    with open(path, "rb") as file:
        data = file.read()
    lengths = None
    for base in (0, 512, 1024, 2048, 4096):  # the superblock may follow a user block
        if data[base : base + 8] == b"\x89HDF\r\n\x1a\n" and len(data) > base + 14:
            lengths = data[base + 14] if data[base + 8] in (0, 1) else data[base + 10]
            break
    if lengths not in (2, 4, 8):
        return  # not HDF5 or unusual: HDF5 itself refuses it, or it has nothing we know to walk
    header = 8 + lengths
    at = data.find(b"GCOL")
    while at >= 0:
        if data[at + 4 : at + 5] == b"\x01":  # a collection header (anything else HDF5 rejects by version)
            size = int.from_bytes(data[at + 8 : at + 8 + lengths], "little")
            end = at + size
            if size < header or end > len(data):
                raise _UnreadableCache(
                    f"{path} is damaged or truncated: the global heap at byte {at} claims {size} bytes, "
                    f"the file has {len(data)}."
                )
            position = at + header
            while position + header <= end:  # a smaller rest is free space
                index = int.from_bytes(data[position : position + 2], "little")
                object_size = int.from_bytes(data[position + 8 : position + header], "little")
                step = header + -(-object_size // 8) * 8 if index else object_size
                if step <= 0 or position + step > end:
                    raise _UnreadableCache(
                        f"{path} is damaged: the global heap at byte {at} has an object of size {object_size} "
                        f"at byte {position} that {'does not fit' if step > 0 else 'HDF5 would loop on'}."
                    )
                position += step
        at = data.find(b"GCOL", at + 4)


@contextlib.contextmanager
def _open_cache(path: Path) -> Iterator[h5py.File]:
    """Open an existing cache file read-only and check that it is ours and not newer."""
    _check_cache_file(path)
    _check_global_heaps(path)
    try:
        handle = h5py.File(path, "r", locking=False)
    except Exception as error:  # h5py raises OSError, but a damaged superblock can surface as anything
        raise _UnreadableCache(f"{path} is not a readable HDF5 file (corrupt or truncated?): {error}") from error
    with handle:
        try:
            fmt = _attr_str(handle.attrs, "format")
            version = handle.attrs.get("schema_version")
        except Exception as error:
            raise _UnreadableCache(f"{path} is damaged: its root attributes cannot be read ({error}).") from error
        if fmt != FILE_FORMAT:
            raise CacheError(
                f"{path} is an HDF5 file but not a torchnormfit cache (format attribute {fmt!r}, "
                f"expected {FILE_FORMAT!r}). Choose another cache path."
            )
        _check_version(version, f"{path}")
        yield handle


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
        raise CacheError(
            f"{where} uses schema version {int(version)}, newer than this torchnormfit reads "
            f"({SCHEMA_VERSION}). Upgrade torchnormfit or use another cache path."
        )
    if int(version) < 1:
        raise CacheError(f"{where} has schema version {int(version)}; versions start at 1.")


def _link(group: h5py.Group, name: str, where: str) -> h5py.HardLink | h5py.SoftLink | h5py.ExternalLink | None:
    """The link ``name`` in ``group`` without following it (an external link may name any file, even a FIFO)."""
    try:
        return group.get(name, getlink=True)
    except Exception as error:
        raise CacheError(f"{where} cannot be looked up (damaged file?): {error}") from error


def read_entry(path: str | os.PathLike, key: str) -> CacheEntry | None:
    """The validated entry ``key`` of the cache file, or None if the file or key does not exist.

    Raises
    ------
    CacheError
        The file is corrupt, foreign or newer, or the entry fails validation.
    ValueError
        ``key`` cannot name an entry (see :func:`check_key`).
    """
    path = Path(path)
    check_key(key)
    if not os.path.lexists(path):
        return None
    with _open_cache(path) as handle:
        if _link(handle, key, f"cache entry {key!r} in {path}") is None:
            return None
        return _read_group(handle, key, path)


def list_entries(path: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every valid entry of a cache file (default: :func:`default_cache_path`), sorted by key.

    Invalid entries are skipped with a :class:`CacheWarning`.
    """
    path = Path(path) if path is not None else default_cache_path()
    if not os.path.lexists(path):
        return []
    entries = []
    with _open_cache(path) as handle:
        try:
            keys = sorted(handle.keys())
        except Exception as error:
            raise _UnreadableCache(f"{path} is damaged: its entries cannot be listed ({error}).") from error
        for key in keys:
            try:
                entries.append(_read_group(handle, key, path))
            except CacheError as error:
                warnings.warn(str(error), CacheWarning, stacklevel=2)
    return entries


def _read_group(handle: h5py.File, key: str, path: Path) -> CacheEntry:
    where = f"cache entry {key!r} in {path}"
    try:
        return _read_group_unchecked(handle, key, where)
    except CacheError:
        raise
    except Exception as error:  # HDF5 reports damage as OSError, KeyError, RuntimeError, ValueError, ...
        raise CacheError(f"{where} cannot be read (damaged file?): {type(error).__name__}: {error}") from error


def _read_group_unchecked(handle: h5py.File, key: str, where: str) -> CacheEntry:
    link = _link(handle, key, where)
    if not isinstance(link, h5py.HardLink):
        raise CacheError(f"{where} is a {type(link).__name__}, not a group stored in the file.")
    group = handle[key]
    if not isinstance(group, h5py.Group):
        raise CacheError(f"{where} is a {type(group).__name__}, not a group.")
    if _attr_str(group.attrs, "format") != ENTRY_FORMAT:
        raise CacheError(f"{where} has format {_attr_str(group.attrs, 'format')!r}, expected {ENTRY_FORMAT!r}.")
    _check_version(group.attrs.get("schema_version"), where)
    values = {name: _read_vector(group, name, where) for name in _STORED}
    shapes = {v.shape for v in values.values()}
    if len(shapes) != 1:
        raise CacheError(f"{where} has datasets of different lengths: { {n: v.shape for n, v in values.items()} }.")
    stats = ChannelStats(*(torch.from_numpy(values[name]) for name in ("count", "mean", "m2", "min", "max")))
    _validate(stats, torch.from_numpy(values["std"]), where)
    checksum = group.attrs.get("sha256")  # last: it catches damage that still looks like valid statistics
    if checksum is not None:
        if isinstance(checksum, bytes):
            checksum = checksum.decode("ascii", "replace")
        if checksum != _checksum(values):
            raise CacheError(f"{where}: the values do not match their sha256 checksum (damaged on disk?).")
    attrs = {name: _plain(value) for name, value in group.attrs.items()}
    arrays = {}
    if isinstance(group.get("samples"), h5py.Group):
        arrays = {name: np.asarray(data[()]) for name, data in group["samples"].items()}
    return CacheEntry(key=key, stats=stats, attrs=attrs, arrays=arrays)


def _read_vector(group: h5py.Group, name: str, where: str) -> np.ndarray:
    """One (C,) float64 dataset, checked by its metadata before a byte of data is read."""
    link = _link(group, name, where)
    if link is None:
        raise CacheError(f"{where} has no dataset {name!r}.")
    if not isinstance(link, h5py.HardLink):
        raise CacheError(f"{where}: {name!r} is a {type(link).__name__}, not a dataset stored in the group.")
    dataset = group[name]
    if not isinstance(dataset, h5py.Dataset):
        raise CacheError(f"{where}: {name!r} is not a dataset.")
    dtype = dataset.dtype
    if dtype.kind != "f" or dtype.itemsize != 8 or dtype.fields is not None:
        raise CacheError(f"{where}: {name!r} has dtype {dtype}, expected float64.")
    if dataset.ndim != 1 or not 1 <= dataset.shape[0] <= _MAX_CHANNELS:
        raise CacheError(f"{where}: {name!r} has shape {dataset.shape}, expected (C,) with 1 <= C <= {_MAX_CHANNELS}.")
    if dataset.is_virtual or dataset.external:
        raise CacheError(f"{where}: {name!r} keeps its data outside the file (virtual or external storage).")
    return np.ascontiguousarray(dataset[()], dtype=np.float64)


def _checksum(values: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in _STORED:
        digest.update(np.ascontiguousarray(values[name], dtype="<f8").tobytes())
    return digest.hexdigest()


def _validate(stats: ChannelStats, std: torch.Tensor, where: str) -> None:
    if not 1 <= stats.num_channels <= _MAX_CHANNELS:
        raise CacheError(f"{where} has {stats.num_channels} channels, expected 1 to {_MAX_CHANNELS}.")
    problems = []
    count = stats.count
    if not bool(torch.isfinite(count).all()):
        problems.append("count is not finite")
    elif not bool((count > 0).all()):
        problems.append("count is not positive")
    elif not bool((count == count.round()).all()):
        problems.append("count is not a whole number of pixels")
    for name in ("mean", "m2", "min", "max"):
        if not bool(torch.isfinite(getattr(stats, name)).all()):
            problems.append(f"{name} is not finite")
    if problems:  # what follows would only repeat these
        raise CacheError(f"{where} failed validation: {', '.join(problems)}.")
    if not bool((stats.m2 >= 0).all()):
        problems.append("m2 is negative")
    elif not bool(torch.isfinite(std).all()):
        problems.append("std is not finite")
    elif bool((std < 0).any()):
        problems.append("std is negative")
    elif bool(((std == 0) & ~stats.constant_channels()).any()):
        problems.append("std is zero for a channel whose m2 is not")
    elif not torch.allclose(std, stats.std, rtol=1e-9, atol=0.0):
        problems.append("std does not equal sqrt(m2 / count)")
    # The float64 mean of n equal values may land a few ulps outside them, so allow for rounding.
    slack = 64 * torch.finfo(torch.float64).eps * torch.maximum(stats.min.abs(), stats.max.abs())
    if not bool(((stats.min - slack <= stats.mean) & (stats.mean <= stats.max + slack)).all()):
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
    path: str | os.PathLike, key: str, stats: ChannelStats, attrs: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Add or replace entry ``key`` atomically, keeping every other entry.

    Raises
    ------
    OSError
        The file could not be written (permissions, a read-only file, disk full, ...); the old file is intact.
    CacheError
        The existing file is foreign or newer and is left as it is, or ``stats`` fail validation.
    ValueError
        ``key`` cannot name an entry, or ``attrs`` uses a reserved name.
    """
    path = Path(path)
    check_key(key)
    reserved = sorted(set(attrs) & set(_RESERVED_ATTRS))
    if reserved:
        raise ValueError(f"The attribute names {reserved} are reserved for the cache schema; rename them.")
    _validate(stats, stats.std, f"statistics for {key!r}")
    with _locked(path) as real:
        _rewrite(real, drop=key, add=(key, stats, attrs, dict(arrays or {})))


def delete_entry(path: str | os.PathLike, key: str) -> bool:
    """Remove entry ``key``; True if it was there."""
    path = Path(path)
    check_key(key)
    if not os.path.lexists(path):
        return False
    with _locked(path) as real:
        if not real.exists():
            return False
        with _open_cache(real) as handle:
            present = _link(handle, key, f"cache entry {key!r} in {real}") is not None
        if present:
            _rewrite(real, drop=key, add=None)
        return present


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
    if path.is_symlink():  # write through a link to the file it names, not over the link
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise CacheError(f"The cache path {path} is a directory; give a file path such as {path / 'stats.h5'}.")
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


def _rewrite(path: Path, drop: str, add: tuple[str, ChannelStats, Mapping[str, Any], dict] | None) -> None:
    """Write a new file with the old entries except ``drop`` (plus ``add``), then swap it in. Call under the lock.

    The new file is built in memory and written with plain ``os.write``: HDF5 itself never writes to the
    disk, because HDF5 2.0 crashes the process (SIGSEGV) when a write fails halfway (disk full, EFBIG).
    """
    _remove_dead_writers_files(path)
    old = _usable_old_file(path)
    if old is not None and not os.access(path, os.W_OK):
        raise PermissionError(
            errno.EACCES,
            f"The cache file {path} is read-only; it was left as it is. Make it writable or use another cache path.",
            str(path),
        )
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as new:
        new.attrs["format"] = FILE_FORMAT
        new.attrs["schema_version"] = SCHEMA_VERSION
        skipped = _copy_entries(old, new, drop) if old is not None else []
        if add is not None:
            _write_group(new, *add)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_TMP_TAG}", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(buffer.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if old is not None else 0o644)
        if skipped:
            aside = _keep_aside(path, copy=True)
            warnings.warn(
                f"Entries of {path} that cannot be used were not carried over ({'; '.join(skipped)}). The old "
                f"file is kept, unchanged, at {aside}; every valid entry is in the new file.",
                CacheWarning,
                stacklevel=3,
            )
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError):
            raise OSError(
                error.errno,
                f"Could not write the cache {path}; the previous file is unchanged: {error}",
            ) from error
        raise


def _copy_entries(old: Path, new: h5py.File, drop: str) -> list[str]:
    """Carry every valid entry of ``old`` except ``drop`` over into ``new``; the entries left behind, described.

    Entries are read through the validating reader and written afresh, never copied object by object:
    HDF5's object copy crashes the process on some damaged objects, and an entry that fails validation
    would never be used anyway (the caller keeps a copy of the old file when anything is left behind).
    """
    skipped = []
    try:
        with _open_cache(old) as source:
            names = sorted(source.keys())
            for name in names:
                if name == drop:
                    continue
                try:
                    entry = _read_group(source, name, old)
                except CacheError as error:
                    version = _entry_version(source, name)
                    if version is not None and version > SCHEMA_VERSION:
                        raise _NewerEntry(
                            f"{old} holds entry {name!r} of schema version {version}, newer than this torchnormfit "
                            f"writes ({SCHEMA_VERSION}); the file is left as it is. Upgrade torchnormfit or use "
                            "another cache path."
                        ) from error
                    skipped.append(str(error))
                    continue
                provenance = {k: v for k, v in entry.attrs.items() if k not in _RESERVED_ATTRS}
                _write_group(new, name, entry.stats, provenance, entry.arrays, lenient=True)
    except _NewerEntry:
        raise
    except Exception as error:  # the list of entries itself is damaged
        skipped.append(f"the entries of {old} cannot be listed ({type(error).__name__}: {error})")
    return skipped


def _entry_version(source: h5py.File, name: str) -> int | None:
    try:
        if isinstance(source.get(name, getlink=True), h5py.HardLink):
            version = source[name].attrs.get("schema_version")
            if isinstance(version, (int, np.integer)) and not isinstance(version, (bool, np.bool_)):
                return int(version)
    except Exception:
        pass
    return None


def _usable_old_file(path: Path) -> Path | None:
    """The current file if its entries can be carried over; a corrupt one is moved aside, never deleted."""
    if not os.path.lexists(path):
        return None
    try:
        with _open_cache(path):
            return path
    except _UnreadableCache as error:
        aside = _keep_aside(path, copy=False)
        warnings.warn(f"{error} It was moved to {aside} and a new cache file is started.", CacheWarning, stacklevel=4)
        return None


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
    handle: h5py.File, key: str, stats: ChannelStats, attrs: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None, lenient: bool = False,
) -> None:
    """Write one entry; ``lenient`` (carrying an old entry over) drops an attribute HDF5 cannot store."""
    samples = arrays
    group = handle.create_group(key)
    values = {**stats.to_dict(), "std": stats.std}
    arrays = {name: np.ascontiguousarray(values[name].detach().cpu().numpy(), dtype=np.float64) for name in _STORED}
    for name in _STORED:
        group.create_dataset(name, data=arrays[name])
    if samples:
        for name, data in samples.items():
            group.require_group("samples").create_dataset(name, data=data)
    for name, value in attrs.items():
        try:
            group.attrs[name] = str(value) if isinstance(value, str) else value  # str subclasses (TorchVersion)
        except (TypeError, ValueError):
            if not lenient:
                raise
    group.attrs["format"] = ENTRY_FORMAT
    group.attrs["schema_version"] = SCHEMA_VERSION
    group.attrs["key"] = key
    group.attrs["sha256"] = _checksum(arrays)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem allows it
        _fsync(folder)
