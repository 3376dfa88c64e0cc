"""The HDF5 statistics cache: a documented schema, validated reads, atomic locked writes.

Layout (schema version 1; README "Cache file format")::

    /                      attrs: format="torchnormfit.cache", schema_version=1
    /<key>/                attrs: format="torchnormfit.channel_stats", schema_version=1, key,
                                  created_utc, torch_version, torchvision_version,
                                  torchnormfit_version, dataset, pipeline, num_samples, ddof
    /<key>/count|mean|m2|std|min|max   float64, shape (C,)

Writers never modify the file in place: under a lock (``<file>.lock``) they
copy the other entries into a temporary file in the same folder, add theirs,
fsync and ``os.replace`` it over the old one. A crash at any moment leaves the
old file or the new one, never a torn one. Readers take no lock. Nothing is
pickled in or out.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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


class CacheError(ValueError):
    """A cache file or entry that cannot be used: corrupt, foreign, newer or invalid."""


class _UnreadableCache(CacheError):
    """The file cannot be opened as HDF5 at all: corrupt, truncated or not HDF5."""


class CacheWarning(UserWarning):
    """A cache problem that torchnormfit worked around (refit, or stats not saved)."""


@dataclass(frozen=True)
class CacheEntry:
    """One validated cache entry: its key, statistics and provenance attributes."""

    key: str
    stats: ChannelStats
    attrs: dict[str, Any]


def default_cache_path() -> Path:
    """``$TORCHNORMFIT_CACHE``, else ``$XDG_CACHE_HOME/torchnormfit/stats.h5`` (XDG default ``~/.cache``)."""
    explicit = os.environ.get("TORCHNORMFIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchnormfit" / "stats.h5"


def check_key(key: str) -> str:
    """Reject keys that cannot name one HDF5 group."""
    if not isinstance(key, str) or not key or key in {".", ".."} or "/" in key or "\x00" in key:
        raise ValueError(
            f"A cache key must be a non-empty string without '/' and not '.' or '..'. Got {key!r}."
        )
    return key


# --- reading -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_cache(path: Path) -> Iterator[h5py.File]:
    """Open an existing cache file read-only and check that it is ours and not newer."""
    try:
        handle = h5py.File(path, "r", locking=False)
    except OSError as error:
        raise _UnreadableCache(f"{path} is not a readable HDF5 file (corrupt or truncated?): {error}") from error
    with handle:
        fmt = _attr_str(handle.attrs, "format")
        if fmt != FILE_FORMAT:
            raise CacheError(
                f"{path} is an HDF5 file but not a torchnormfit cache (format attribute {fmt!r}, "
                f"expected {FILE_FORMAT!r}). Choose another cache path."
            )
        _check_version(handle.attrs, f"{path}")
        yield handle


def _attr_str(attrs: Mapping[str, Any], name: str) -> str | None:
    value = attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _check_version(attrs: Mapping[str, Any], where: str) -> None:
    version = attrs.get("schema_version")
    if not isinstance(version, (int, np.integer)):
        raise CacheError(f"{where} has no integer schema_version attribute.")
    if int(version) > SCHEMA_VERSION:
        raise CacheError(
            f"{where} uses schema version {int(version)}, newer than this torchnormfit reads "
            f"({SCHEMA_VERSION}). Upgrade torchnormfit or use another cache path."
        )


def read_entry(path: str | os.PathLike, key: str) -> CacheEntry | None:
    """The validated entry ``key`` of the cache file, or None if the file or key does not exist.

    Raises
    ------
    CacheError
        The file is corrupt, foreign or newer, or the entry fails validation.
    """
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        raise CacheError(f"The cache path {path} is a directory; give a file path such as {path / 'stats.h5'}.")
    with _open_cache(path) as handle:
        if key not in handle:
            return None
        return _read_group(handle, key, path)


def list_entries(path: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every valid entry of a cache file (default: :func:`default_cache_path`), sorted by key.

    Invalid entries are skipped with a :class:`CacheWarning`.
    """
    path = Path(path) if path is not None else default_cache_path()
    if not path.exists():
        return []
    entries = []
    with _open_cache(path) as handle:
        for key in sorted(handle.keys()):
            try:
                entries.append(_read_group(handle, key, path))
            except CacheError as error:
                warnings.warn(str(error), CacheWarning, stacklevel=2)
    return entries


def _read_group(handle: h5py.File, key: str, path: Path) -> CacheEntry:
    where = f"cache entry {key!r} in {path}"
    if not isinstance(handle.get(key, getlink=True), h5py.HardLink) or not isinstance(handle[key], h5py.Group):
        raise CacheError(f"{where} is not a group stored in the file (link or dataset).")
    group = handle[key]
    if _attr_str(group.attrs, "format") != ENTRY_FORMAT:
        raise CacheError(f"{where} has format {_attr_str(group.attrs, 'format')!r}, expected {ENTRY_FORMAT!r}.")
    _check_version(group.attrs, where)
    values = {name: _read_vector(group, name, where) for name in _STORED}
    channels = {v.shape for v in values.values()}
    if len(channels) != 1:
        raise CacheError(f"{where} has datasets of different lengths: { {n: v.shape for n, v in values.items()} }.")
    stats = ChannelStats(*(torch.from_numpy(values[name]) for name in ("count", "mean", "m2", "min", "max")))
    _validate(stats, torch.from_numpy(values["std"]), where)
    attrs = {name: _plain(value) for name, value in group.attrs.items()}
    return CacheEntry(key=key, stats=stats, attrs=attrs)


def _read_vector(group: h5py.Group, name: str, where: str) -> np.ndarray:
    link = group.get(name, getlink=True)
    if link is None:
        raise CacheError(f"{where} has no dataset {name!r}.")
    if not isinstance(link, h5py.HardLink):
        raise CacheError(f"{where}: {name!r} is a {type(link).__name__}, not a dataset stored in the group.")
    dataset = group[name]
    if not isinstance(dataset, h5py.Dataset):
        raise CacheError(f"{where}: {name!r} is not a dataset.")
    if dataset.dtype != np.float64:
        raise CacheError(f"{where}: {name!r} has dtype {dataset.dtype}, expected float64.")
    if dataset.ndim != 1 or not 1 <= dataset.shape[0] <= _MAX_CHANNELS:
        raise CacheError(f"{where}: {name!r} has shape {dataset.shape}, expected (C,) with 1 <= C <= {_MAX_CHANNELS}.")
    if dataset.is_virtual or dataset.external:
        raise CacheError(f"{where}: {name!r} keeps its data outside the file (virtual or external storage).")
    return np.asarray(dataset[()], dtype=np.float64)


def _validate(stats: ChannelStats, std: torch.Tensor, where: str) -> None:
    problems = []
    for name, value in {**stats.to_dict(), "std": std}.items():
        if not bool(torch.isfinite(value).all()):
            problems.append(f"{name} is not finite")
    if not bool((stats.count > 0).all()):
        problems.append("count is not positive")
    if not bool((stats.m2 >= 0).all()):
        problems.append("m2 is negative")
    if bool((std < 0).any()):
        problems.append("std is negative")
    elif bool(((std == 0) & ~stats.constant_channels()).any()):
        problems.append("std is zero for a channel whose m2 is not")
    if not problems and not torch.allclose(std, stats.std, rtol=1e-9, atol=0.0):
        problems.append("std does not equal sqrt(m2 / count)")
    if not problems and not bool(((stats.min <= stats.mean) & (stats.mean <= stats.max)).all()):
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


def write_entry(path: str | os.PathLike, key: str, stats: ChannelStats, attrs: Mapping[str, Any]) -> None:
    """Add or replace entry ``key`` atomically, keeping every other entry.

    Raises
    ------
    OSError
        The file could not be written (permissions, disk full, ...); the old file is intact.
    CacheError
        The existing file is foreign or newer and is left as it is.
    """
    path = Path(path)
    check_key(key)
    _validate(stats, stats.std, f"statistics for {key!r}")
    with _locked(path):
        _rewrite(path, drop=key, add=(key, stats, attrs))


def delete_entry(path: str | os.PathLike, key: str) -> bool:
    """Remove entry ``key``; True if it was there."""
    path = Path(path)
    with _locked(path):
        if not path.exists():
            return False
        with _open_cache(path) as handle:
            present = key in handle
        if present:
            _rewrite(path, drop=key, add=None)
        return present


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if path.is_dir():
        raise CacheError(f"The cache path {path} is a directory; give a file path such as {path / 'stats.h5'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            yield
    except filelock.Timeout as error:
        raise OSError(
            f"Could not lock {path}.lock within {LOCK_TIMEOUT_S:.0f} s: another process is writing the cache. "
            "A lock held by a process that died is released by the operating system, so a live process holds it."
        ) from error


def _rewrite(path: Path, drop: str, add: tuple[str, ChannelStats, Mapping[str, Any]] | None) -> None:
    """Write a new file with the old entries except ``drop`` (plus ``add``), then swap it in."""
    old = _usable_old_file(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w", locking=False) as new:
            new.attrs["format"] = FILE_FORMAT
            new.attrs["schema_version"] = SCHEMA_VERSION
            if old is not None:
                with h5py.File(old, "r", locking=False) as source:
                    for name in source:
                        if name != drop:
                            source.copy(source[name], new, name=name)
            if add is not None:
                _write_group(new, *add)
        _fsync(tmp)
        os.chmod(tmp, path.stat().st_mode & 0o777 if old is not None else 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _usable_old_file(path: Path) -> Path | None:
    """The current file if its entries can be carried over; a corrupt one is moved aside, never deleted."""
    if not path.exists():
        return None
    try:
        with _open_cache(path):
            return path
    except _UnreadableCache as error:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.replace(path, aside)
        warnings.warn(f"{error} It was moved to {aside} and a new cache file is started.", CacheWarning, stacklevel=4)
        return None


def _write_group(handle: h5py.File, key: str, stats: ChannelStats, attrs: Mapping[str, Any]) -> None:
    group = handle.create_group(key)
    values = {**stats.to_dict(), "std": stats.std}
    for name in _STORED:
        group.create_dataset(name, data=values[name].detach().cpu().numpy().astype(np.float64))
    group.attrs["format"] = ENTRY_FORMAT
    group.attrs["schema_version"] = SCHEMA_VERSION
    group.attrs["key"] = key
    for name, value in attrs.items():
        group.attrs[name] = str(value) if isinstance(value, str) else value  # str subclasses (TorchVersion)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem allows it
        _fsync(folder)
