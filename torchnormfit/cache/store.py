"""The cache folder: entry files named for their keys, a lock for writers, atomic writes, removal, export.

Writers hold ``<folder>/.torchnormfit.lock`` (an flock the OS releases when its holder dies). A save writes
its file into ``<folder>/.torchnormfit-tmp/``, fsyncs it and ``os.replace``-s it onto its name: a crash
leaves the old entry or the new one, and under the lock every temporary file is a dead writer's. Only files
that begin with the entry header (the library's) are ever replaced, moved aside or removed. Readers take
no lock. See docs/cache-format.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import stat
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import filelock
import numpy as np

from .format import (
    MAX_BYTES,
    USER_BLOCK,
    CacheEntry,
    CacheError,
    CacheWarning,
    NotAnEntryError,
    check_arrays,
    check_attrs,
    check_head,
    decode,
    encode,
    validate,
    vectors_of,
)

__all__ = ["check_key", "default_cache_dir", "delete_entries", "entry_name", "export_entry", "is_entry_file",
           "list_entries", "prune_entries", "read_entry", "write_entry"]

LOCK_NAME, TMP_DIR, LOCK_TIMEOUT_S = ".torchnormfit.lock", ".torchnormfit-tmp", 60.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_NOATIME = getattr(os, "O_NOATIME", 0)


def default_cache_dir() -> Path:
    """``$TORCHNORMFIT_CACHE``, else ``$XDG_CACHE_HOME/torchnormfit``, else ``~/.cache/torchnormfit`` (as torch.hub)."""
    explicit = os.environ.get("TORCHNORMFIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative or empty value is ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchnormfit"


def check_key(key: str) -> str:
    """Return ``key`` if it can name an entry: a non-empty text without ``/`` or NUL, not ``.`` or ``..``."""
    if not isinstance(key, str) or not key or key in {".", ".."} or "/" in key or "\x00" in key:
        raise ValueError(f"A cache key must be a non-empty string without '/' and not '.' or '..'. Got {key!r}.")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"A cache key must be valid Unicode text (no lone surrogates). Got {key!r}.") from None
    return key


def entry_name(key: str) -> str:
    """The file name of entry ``key``: ``<key>.h5`` for a plain key (ASCII letters, digits, ``._-``), else the
    key with other characters as ``_`` and 12 hex digits of its SHA-256, so that names stay distinct.

    >>> entry_name("ImageFolder-3f2a9c1b0d4e5f60718a"), entry_name("my data")
    ('ImageFolder-3f2a9c1b0d4e5f60718a.h5', 'my_data-b2167b0aa7ef.h5')
    """
    safe = _UNSAFE.sub("_", check_key(key))
    if safe == key and len(key) <= 120 and not key.startswith("."):
        return f"{key}.h5"
    return f"{safe.lstrip('.')[:80]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.h5"


def _where(cache: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The cache path and whether it is one entry file (an existing file) rather than a folder."""
    path = Path(cache).expanduser() if cache is not None else default_cache_dir()
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return path, False
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise NotAnEntryError(f"The cache path {path} is neither a folder nor a file; give a folder.")
    return path, stat.S_ISREG(mode)


def is_entry_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an existing file (which a fit only reads) rather than a cache folder."""
    return Path(path).expanduser().is_file()


@contextlib.contextmanager
def _opened(file: Path) -> Iterator[tuple[BinaryIO, bytes, os.stat_result]]:
    """``file`` open for reading, its header checked: it must be a regular file that begins like an entry
    file. A FIFO or device is refused before it is opened (and opening never blocks, should one replace the file
    meanwhile); where the owner may, the file is opened without changing its access time."""
    not_regular = NotAnEntryError(f"The cache path {file} is not a regular file; it is left untouched.")
    if not stat.S_ISREG(os.stat(file).st_mode):
        raise not_regular
    for extra in dict.fromkeys((_NOATIME, 0)):
        with contextlib.suppress(PermissionError):
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | extra)
            break
    else:
        raise NotAnEntryError(f"The cache file {file} is not readable (permission denied); it is left as it is.")
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise not_regular
        head = handle.read(USER_BLOCK)
        check_head(head, str(file))
        if info.st_size > MAX_BYTES:
            raise CacheError(f"{file} has {info.st_size} bytes; an entry file has at most {MAX_BYTES}.")
        yield handle, head, info


def _read(file: Path, touch: bool = False) -> CacheEntry:
    """The validated entry of an entry file; ``touch`` records the read in the file's access time."""
    with _opened(file) as (handle, head, info):
        entry = decode(head + handle.read(MAX_BYTES), str(file))
        if touch:
            with contextlib.suppress(OSError, NotImplementedError):
                os.utime(handle.fileno(), ns=(time.time_ns(), info.st_mtime_ns))
    last_read = info.st_atime if info.st_atime > info.st_mtime else None  # else never read since written
    return dataclasses.replace(entry, path=file, size=info.st_size, last_read=last_read)


def read_entry(cache: str | os.PathLike[str] | None, key: str | None) -> CacheEntry | None:
    """The validated entry ``key`` of cache folder ``cache`` (None: the default), None if there is none.

    ``cache`` may also be one entry file (an existing file): its entry is returned whatever ``key`` is, for
    a file handed over holds the fingerprint of other paths. The read is recorded (``last_read``).

    Raises
    ------
    CacheError
        The file is damaged, newer, not an entry file, or holds another key than its name says.
    """
    path, is_file = _where(cache)
    if is_file:
        return _read(path, touch=True)
    if key is None:
        raise ValueError(f"{path} is a cache folder: give the key of the entry to read (see 'torchnormfit ls').")
    file = path / entry_name(key)
    try:
        entry = _read(file, touch=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if entry.key != key:
        raise CacheError(f"{file} holds the entry {entry.key!r}, not {key!r}. Remove the file to save {key!r}.")
    return entry


def list_entries(cache: str | os.PathLike[str] | None = None) -> list[CacheEntry]:
    """Every valid entry of a cache folder (default: :func:`default_cache_dir`) or entry file, by key.

    A file that cannot be used is skipped with a :class:`CacheWarning`. Listing does not change ``last_read``.
    """
    path, is_file = _where(cache)
    if is_file:
        return [_read(path)]
    found = []
    for name in sorted(os.listdir(path)) if path.is_dir() else []:
        if name.endswith(".h5") and not name.startswith("."):
            try:
                found.append(_read(path / name))
            except FileNotFoundError:  # removed since the folder was listed
                continue
            except CacheError as error:
                warnings.warn(str(error), CacheWarning, stacklevel=2)
    return sorted(found, key=lambda entry: entry.key)


def write_entry(cache: str | os.PathLike[str] | None, key: str, stats: Any, attrs: Mapping[str, Any],
                arrays: Mapping[str, np.ndarray] | None = None) -> Path:
    """Add or replace entry ``key`` atomically in its own file of folder ``cache``; returns the file.

    ``attrs``: provenance, any JSON-able values (numbers, strings and lists of numbers stay HDF5 attributes
    of their own type). ``arrays``: lowercase-named numeric arrays of 1 to 4 dimensions.

    Raises
    ------
    OSError
        The folder cannot be created or written (the operating system's reason, at once); nothing changed.
    CacheError
        ``cache`` is a file (an entry file is only read), or the key's file is not the library's or newer.
    ValueError
        ``key``, ``attrs``, ``arrays`` or ``stats`` cannot be stored.

    >>> write_entry("/tmp/stats", "demo", stats, {"dataset": "demo"})  # doctest: +SKIP
    PosixPath('/tmp/stats/demo.h5')
    """
    name = entry_name(key)
    check_attrs(key, attrs)
    vectors = vectors_of(stats)
    validate(vectors, f"statistics for {key!r}")
    data = encode(key, vectors, attrs, check_arrays(key, arrays))  # built before the lock is taken
    folder, is_file = _where(cache)
    if is_file:
        raise CacheError(f"The cache path {folder} is a file; an entry file is only read, never written. To save, "
                         f"give a folder (for example {folder.parent / 'torchnormfit-cache'}).")
    with _locked(folder):
        target = folder / name
        try:
            _read(target)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except NotAnEntryError as error:  # another program's file, or a newer torchnormfit's
            raise type(error)(f"{error} The entry {key!r} was not saved.") from None
        except CacheError as error:  # the library's own file, damaged
            aside = _keep_aside(target)
            warnings.warn(f"{error} It was moved to {aside}; the new entry replaces it.", CacheWarning, stacklevel=2)
        _atomic_write(folder / TMP_DIR, target, data, stat.S_IMODE(folder.stat().st_mode) & 0o666)
    return target


def _keep_aside(path: Path) -> Path:
    """Rename a damaged entry file to a free ``<name>.corrupt-<time>-<pid>[-n]`` (under the lock)."""
    stem = f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside, number = path.with_name(stem), 1
    while os.path.lexists(aside):
        aside, number = path.with_name(f"{stem}-{number}"), number + 1
    os.rename(path, aside)
    return aside


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the folder's write lock, the folder created first: a place that cannot be written fails at once
    with the operating system's reason; only a live writer holding the lock is waited for."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666))
        (folder / TMP_DIR).mkdir(exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"Cannot write the cache folder {folder}: {error.strerror}") from error
    value = os.environ.get("TORCHNORMFIT_CACHE_LOCK_TIMEOUT") or LOCK_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        raise ValueError(f"TORCHNORMFIT_CACHE_LOCK_TIMEOUT must be a number of seconds. Got {value!r}.") from None
    try:
        lock = filelock.FileLock(folder / LOCK_NAME, timeout=timeout).acquire()
    except filelock.Timeout as error:
        raise OSError(errno.ETIMEDOUT, f"Could not lock {folder / LOCK_NAME} within {timeout:g} s: another live "
                      "process is writing this cache. Wait for it, or raise $TORCHNORMFIT_CACHE_LOCK_TIMEOUT.") \
            from error
    with lock:
        for item in os.scandir(folder / TMP_DIR):  # under the lock, every temporary file is a dead writer's
            if item.name.startswith("entry-") and item.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
        yield


def _atomic_write(temp_dir: Path, target: Path, data: bytes, mode: int, prefix: str = "entry-") -> None:
    """Write ``data`` to a temporary file in ``temp_dir``, fsync it and move it onto ``target``."""
    fd, temp = tempfile.mkstemp(dir=temp_dir, prefix=prefix, suffix=".tmp")
    try:
        with open(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(fd)
        os.chmod(temp, mode)
        os.replace(temp, target)
        with contextlib.suppress(OSError):  # not every platform or file system syncs a folder
            folder = os.open(target.parent, os.O_RDONLY)
            os.fsync(folder)
            os.close(folder)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"Could not write {target}; the previous file is unchanged: {error}") from error
        raise


def delete_entries(cache: str | os.PathLike[str] | None, keys: Iterable[str]) -> list[str]:
    """Remove the entry files of ``keys`` from a cache folder; returns the keys that were there, in order.

    A file at an entry's name that is not the library's is refused (:class:`NotAnEntryError`), not removed.
    """
    keys = list(dict.fromkeys(map(check_key, keys)))
    folder, is_file = _where(cache)
    if is_file:
        raise CacheError(f"The cache path {folder} is an entry file; remove it as any file, or give a folder.")
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    with _locked(folder):
        for key in keys:
            with contextlib.suppress(FileNotFoundError), _opened(folder / entry_name(key)):
                os.unlink(folder / entry_name(key))
                removed.append(key)
    return removed


def prune_entries(cache: str | os.PathLike[str] | None, *, older_than: float | None = None,
                  keep_last: int | None = None, now: float | None = None) -> list[str]:
    """Remove every entry no rule keeps: ``older_than`` keeps those created at most that many seconds before
    ``now``, ``keep_last`` the newest N. An entry's time is its ``created_utc``, else its file's. Returns the
    keys removed.

    >>> prune_entries("~/.cache/torchnormfit", older_than=30 * 86400, keep_last=10)  # doctest: +SKIP
    """
    if older_than is None and keep_last is None:
        raise ValueError("prune_entries needs older_than (seconds) or keep_last (a count), or both.")
    if (older_than is not None and not older_than >= 0) or (keep_last is not None and keep_last < 0):
        raise ValueError(f"older_than and keep_last must not be negative. Got {older_than!r} and {keep_last!r}.")
    newest = sorted(((_created(entry), entry.key) for entry in list_entries(cache)), reverse=True)
    now = time.time() if now is None else now
    kept = {key for _, key in newest[: keep_last or 0]}
    kept |= {key for created, key in newest if older_than is not None and now - created <= older_than}
    return delete_entries(cache, [key for _, key in newest if key not in kept])


def _created(entry: CacheEntry) -> float:
    with contextlib.suppress(TypeError, ValueError):
        moment = datetime.fromisoformat(entry.attrs.get("created_utc"))  # type: ignore[arg-type]
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return os.stat(entry.path).st_mtime if entry.path else 0.0


def export_entry(
    cache: str | os.PathLike[str] | None, key: str | None, destination: str | os.PathLike[str]
) -> Path:
    """Copy entry ``key`` of ``cache`` (any key of an entry file) to ``destination``, a file or a folder to put
    it in, as one self-contained entry file, atomically; a file already there is replaced only if it is an
    entry file.

    >>> export_entry(None, "ImageFolder-3f2a9c1b0d4e5f60718a", "stats.h5")  # doctest: +SKIP
    PosixPath('stats.h5')
    """
    source, is_file = _where(cache)
    if not is_file:
        source = source / entry_name(check_key(key or ""))
    try:
        with _opened(source) as (handle, head, _):
            data = head + handle.read(MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise CacheError(f"No entry {key!r} in {cache or default_cache_dir()} (see 'torchnormfit ls').") from None
    entry = decode(data, str(source))  # the bytes written are the bytes checked
    target = Path(destination).expanduser()
    target = target / entry_name(entry.key) if target.is_dir() else target
    with contextlib.suppress(FileNotFoundError), _opened(target):
        pass
    _atomic_write(target.parent, target, data, 0o644, prefix=f".{target.name}.")
    return target
