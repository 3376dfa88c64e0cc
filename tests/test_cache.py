"""The cache folder (torchnormfit/cache, docs/cache-format.md): entry files, hostile files, crashes and concurrency.

Everything here uses real files on disk and real processes; nothing is mocked. Processes come in two
kinds: children forked from this test process (they start in milliseconds, so the default run can afford
dozens of kills and writers) and fresh interpreters started with ``sys.executable tests/_cache_worker.py``
(each pays for its imports, so the default run starts only a few and the ``slow`` rounds the rest).
The figures docs/cache-format.md quotes are printed by the tests (run with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import torchnormfit
from torchnormfit import CacheError, CacheWarning, ChannelStats, FitNormalize, cache
from torchnormfit.cache import (
    check_key,
    default_cache_dir,
    delete_entries,
    entry_name,
    export_entry,
    list_entries,
    read_entry,
    write_entry,
)

sys.path.insert(0, str(Path(__file__).parent))
import _cache_worker  # noqa: E402
from _cache_worker import entry_attrs, make_stats, temp_names  # noqa: E402
from datasets_for_tests import CountingDataset  # noqa: E402

WORKER = Path(__file__).with_name("_cache_worker.py")
REPO = Path(torchnormfit.__file__).resolve().parents[1]
FORK = multiprocessing.get_context("fork")
FIELDS = ("count", "mean", "m2", "min", "max")
STORED = ("count", "mean", "m2", "std", "min", "max")


# --- helpers ------------------------------------------------------------------------------------


def same_stats(a: ChannelStats, b: ChannelStats) -> bool:
    """Bit-for-bit equal float64 statistics."""
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def valid_entries(path: Path) -> dict[str, cache.CacheEntry]:
    """Every entry of the folder; any file that cannot be used (a CacheWarning) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        return {entry.key: entry for entry in list_entries(path)}


def folder_state(path: Path) -> dict[str, bytes]:
    """The bytes of every file in cache folder ``path`` (the lock file excepted), by relative path."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*"))
            if f.is_file() and f.name != ".torchnormfit.lock"}


def aside_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def seal(path: Path) -> None:
    """Give a file written by hand with ``h5py.File(path, "w", userblock_size=512)`` the documented header."""
    data = bytearray(path.read_bytes())
    digest = hashlib.sha256(data[512:]).hexdigest()
    head = f"torchnormfit entry\nschema_version 1\nsha256 {digest}\n".encode()
    data[: len(head)] = head
    path.write_bytes(bytes(data))


def write_by_hand(path: Path, key: str, stats: ChannelStats, change=None, **attrs) -> Path:
    """An entry file written with plain h5py following docs/cache-format.md, ``change(handle)`` applied, then sealed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.attrs.update({"format": "torchnormfit.entry", "schema_version": 1, "key": key, **attrs})
        values = {**stats.to_dict(), "std": stats.std}
        for name in STORED:
            f.create_dataset(name, data=values[name].numpy())
        if change is not None:
            change(f)
    seal(path)
    return path


def run_worker(mode: str, timeout: float = 180, **options) -> dict:
    """Run tests/_cache_worker.py in a fresh interpreter; its last stdout line is its JSON result."""
    try:
        proc = subprocess.run([sys.executable, str(WORKER), mode, json.dumps(options)], capture_output=True,
                              text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"worker {mode} did not finish within {timeout} s (hang?): {(error.stderr or b'')[-2000:]!r}")
    assert proc.returncode == 0, f"worker {mode} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_worker(mode: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), mode, json.dumps(options)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def fork_run(target, *args, timeout: float = 120) -> int:
    """Run ``target(*args)`` in a forked child; its exit code (0 on success, 1 on an exception, -N on signal N)."""
    process = FORK.Process(target=target, args=args)
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        pytest.fail(f"a forked child did not finish within {timeout} s (hung)")
    return process.exitcode


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@pytest.fixture
def store(tmp_path) -> Path:
    """A cache folder with three valid entries e0, e1, e2 written by write_entry."""
    path = tmp_path / "cache"
    for i in range(3):
        write_entry(path, f"e{i}", make_stats(i), entry_attrs(i))
    return path


# --- 1. round trip and the documented layout ------------------------------------------------------


def test_round_trip_keeps_values_bit_for_bit_and_provenance(tmp_path):
    path = tmp_path / "cache"
    stats = ChannelStats.from_pixels(torch.rand(3, 1000, dtype=torch.float64))
    attrs = {
        "created_utc": "2026-05-01T12:00:00+00:00",
        "torch_version": torch.__version__,  # a str subclass (TorchVersion)
        "dataset": json.dumps({"class": "CIFAR10", "root": "/data"}),
        "pipeline": "Compose(\n    ToTensor()\n)",
        "num_samples": 50000,
        "ddof": 0,
    }
    assert write_entry(path, "cifar", stats, attrs) == path / "cifar.h5"
    entry = read_entry(path, "cifar")
    assert entry.key == "cifar" and entry.path == path / "cifar.h5" and entry.size == entry.path.stat().st_size
    assert same_stats(entry.stats, stats) and torch.equal(entry.stats.std, stats.std)
    assert entry.stats.mean.dtype == torch.float64
    for name, value in attrs.items():
        assert entry.attrs[name] == value and type(entry.attrs[name]) in (str, int)
    assert entry.attrs["format"] == "torchnormfit.entry" and entry.attrs["schema_version"] == 1
    assert entry.attrs["key"] == "cifar" and entry.arrays == {}


def test_entry_file_is_plain_hdf5_with_the_documented_header(tmp_path):
    """What docs/cache-format.md promises a person with plain h5py, and a reader without torchnormfit."""
    path = tmp_path / "cache"
    stats = make_stats(7, channels=4)
    arrays = {"index": np.arange(5), "mean": np.random.default_rng(0).random((5, 4))}
    file = write_entry(path, "ImageFolder-3f2a9c1b0d4e5f60718a", stats, entry_attrs(7), arrays=arrays)
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        "ImageFolder-3f2a9c1b0d4e5f60718a.h5"]
    data = file.read_bytes()
    head, _, _ = data[:512].partition(b"\x00")
    lines = head.decode("ascii").splitlines()
    assert lines[:2] == ["torchnormfit entry", "schema_version 1"] and data[len(head):512] == bytes(512 - len(head))
    assert lines[2] == f"sha256 {hashlib.sha256(data[512:]).hexdigest()}"
    with h5py.File(file, "r") as f:
        assert f.userblock_size == 512
        assert f.attrs["format"] == "torchnormfit.entry" and f.attrs["schema_version"] == 1
        assert f.attrs["key"] == "ImageFolder-3f2a9c1b0d4e5f60718a" and f.attrs["num_samples"] == 107
        assert sorted(f) == sorted([*STORED, "arrays"]) and sorted(f["arrays"]) == ["index", "mean"]
        expected = {**{n: getattr(stats, n).numpy() for n in FIELDS}, "std": stats.std.numpy()}
        for name in STORED:
            assert f[name].dtype == np.float64 and f[name].shape == (4,)
            np.testing.assert_array_equal(f[name][()], expected[name])
        np.testing.assert_array_equal(f["arrays/mean"][()], arrays["mean"])


def test_entry_written_by_hand_following_the_documented_layout_is_read(tmp_path):
    """Another tool (plain h5py and hashlib) can write entry files torchnormfit reads."""
    file = write_by_hand(tmp_path / "by-hand.h5", "by-hand", make_stats(3), dataset="elsewhere")
    entry = read_entry(file, None)
    assert same_stats(entry.stats, make_stats(3)) and entry.attrs["dataset"] == "elsewhere"
    folder = tmp_path / "cache"
    folder.mkdir()
    shutil.copy(file, folder / "by-hand.h5")
    assert read_entry(folder, "by-hand").key == "by-hand"


def test_any_json_attribute_and_any_numeric_array_round_trip(tmp_path):
    """Other parts of the library add fields through attrs and arrays only: stored generically."""
    attrs = {"deterministic": True, "gaps": ["a", "b"], "nothing": None, "settings": {"clip": [0.5, 99.5]},
             "mean_se": [0.1, 0.2, float("nan")], "levels": [[1, 2], [3, 4]], "empty": [], "text": "a\x00b",
             "big": 2**70, "ratio": 0.25, "unicode": "ключ ✓", "ragged": [[1, 2], [3]], "flags": [True, False]}
    arrays = {"counts": np.arange(12, dtype=np.uint16).reshape(3, 4), "clip_low": np.float32([1.5, 2.5]),
              "cube": np.zeros((2, 2, 2), np.int8), "value_counts": np.arange(256 * 3, dtype=np.int64)}
    write_entry(tmp_path, "k", make_stats(1), attrs, arrays=arrays)
    entry = read_entry(tmp_path, "k")
    for name, value in attrs.items():
        if name == "mean_se":
            assert entry.attrs[name][:2] == value[:2] and np.isnan(entry.attrs[name][2])
        else:
            assert entry.attrs[name] == value and type(entry.attrs[name]) is type(value), name
    for name, value in arrays.items():
        assert entry.arrays[name].dtype == value.dtype and np.array_equal(entry.arrays[name], value)
    with h5py.File(entry.path, "r") as f:  # numbers stay numbers a person can read; only the rest is JSON
        assert f.attrs["deterministic"] and f.attrs["ratio"] == 0.25 and list(f.attrs["mean_se"][:2]) == [0.1, 0.2]
        assert json.loads(f.attrs["settings"]) == {"clip": [0.5, 99.5]}


@pytest.mark.parametrize("attrs, message", [
    ({"format": "x"}, "reserved"), ({"key": "x"}, "reserved"), ({"json_attrs": "[]"}, "reserved"),
    ({"a/b": 1}, "not a plain name"), ({"obj": object()}, "neither a number"), ({"s": {1, 2}}, "neither a number"),
])
def test_write_refuses_attributes_it_cannot_store(store, attrs, message):
    before = folder_state(store)
    with pytest.raises(ValueError, match=message):
        write_entry(store, "x", make_stats(1), attrs)
    assert folder_state(store) == before


@pytest.mark.parametrize("arrays, message", [
    ({"Index": np.arange(3)}, "lowercase identifiers"), ({"1st": np.arange(3)}, "lowercase identifiers"),
    ({"mask": np.ones(3, bool)}, "dtype bool"), ({"s": np.array(["a"])}, "dtype <U1"),
    ({"one": np.float32(1.0)}, r"shape \(\)"), ({"five": np.zeros((1,) * 5)}, r"shape \(1, 1, 1, 1, 1\)"),
])
def test_write_refuses_arrays_it_cannot_store(store, arrays, message):
    before = folder_state(store)
    with pytest.raises(ValueError, match=message):
        write_entry(store, "x", make_stats(1), {}, arrays=arrays)
    assert folder_state(store) == before


@pytest.mark.parametrize("key", ["ImageFolder-3f2a9c1b0d4e5f60718a", "my data", "my_data", "ünïcode-ключ", "a.b",
                                 "...", ".hidden", "'quoted' \"key\"", "x" * 500, "-", "a.h5", "CON"])
def test_entry_names_are_readable_and_every_key_round_trips(tmp_path, key):
    file = write_entry(tmp_path, key, make_stats(1), {})
    assert file.parent == tmp_path and file.name.endswith(".h5") and not file.name.startswith(".")
    assert len(file.name.encode()) <= 255 and all(c.isalnum() or c in "._-" for c in file.name)
    plain = all(c.isascii() and (c.isalnum() or c in "._-") for c in key) and len(key) <= 120
    assert (file.name == f"{key}.h5") == (plain and not key.startswith("."))
    assert read_entry(tmp_path, key).key == key and [e.key for e in list_entries(tmp_path)] == [key]


def test_keys_that_look_alike_get_files_of_their_own(tmp_path):
    keys = ["my data", "my_data", "my-data", "my?data", "x" * 200, "x" * 201]
    for i, key in enumerate(keys):
        write_entry(tmp_path, key, make_stats(i), {"seed": i})
    assert len({entry_name(key) for key in keys}) == len(keys)
    assert {k: e.attrs["seed"] for k, e in valid_entries(tmp_path).items()} == {k: i for i, k in enumerate(keys)}


@pytest.mark.parametrize("key", ["", "/", ".", "..", "a/b", "/abs", "trailing/", "nul\x00byte", None, 3, "\udc80"])
def test_check_key_rejects_what_cannot_name_an_entry(tmp_path, key):
    with pytest.raises(ValueError, match="cache key must be"):
        check_key(key)
    with pytest.raises(ValueError, match="cache key must be"):
        write_entry(tmp_path, key, make_stats(0), {})
    assert check_key("ok") == "ok"


def test_default_cache_dir_follows_torch_hub(tmp_path, monkeypatch):
    """$TORCHNORMFIT_CACHE, else $XDG_CACHE_HOME/torchnormfit, else ~/.cache/torchnormfit."""
    monkeypatch.setenv("TORCHNORMFIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("TORCHNORMFIT_CACHE", "~/mine")
    assert default_cache_dir() == Path.home() / "mine"
    monkeypatch.delenv("TORCHNORMFIT_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "torchnormfit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == Path.home() / ".cache" / "torchnormfit"
    monkeypatch.setenv("TORCHNORMFIT_CACHE", str(tmp_path / "d"))
    write_entry(None, "k", make_stats(0), {})
    assert [e.key for e in list_entries()] == ["k"] and (tmp_path / "d" / "k.h5").is_file()


def test_many_entries_replace_and_delete(tmp_path):
    keys = [f"key-{i:02d}" for i in range(20)]
    for key in random.Random(0).sample(keys, len(keys)):
        write_entry(tmp_path, key, make_stats(keys.index(key)), entry_attrs(keys.index(key)))
    assert [e.key for e in list_entries(tmp_path)] == keys
    write_entry(tmp_path, "key-05", make_stats(999), entry_attrs(999))
    after = valid_entries(tmp_path)
    assert same_stats(after["key-05"].stats, make_stats(999)) and len(after) == 20
    assert delete_entries(tmp_path, ["key-07", "missing", "key-07", "key-08"]) == ["key-07", "key-08"]
    assert sorted(valid_entries(tmp_path)) == sorted(set(keys) - {"key-07", "key-08"})


def test_missing_folder_reads_as_empty(tmp_path):
    assert read_entry(tmp_path / "nothing", "k") is None and list_entries(tmp_path / "nothing") == []
    assert delete_entries(tmp_path / "nothing", ["k"]) == [] and not (tmp_path / "nothing").exists()


def test_mean_a_few_ulps_outside_min_max_is_rounding_not_damage(tmp_path):
    """The float64 mean of 9 equal values can land an ulp above them; the entry stays valid."""
    value = 0.1
    mean = sum([value] * 9) / 9
    assert mean != value
    one = torch.tensor([1.0], dtype=torch.float64)
    stats = ChannelStats(one * 9, one * mean, one * 0, one * value, one * value)
    write_entry(tmp_path, "k", stats, {})
    assert read_entry(tmp_path, "k").stats.mean.item() == mean


def _stats_with(**changes) -> ChannelStats:
    values = {**make_stats(0).to_dict(), **{k: torch.tensor(v, dtype=torch.float64) for k, v in changes.items()}}
    return ChannelStats.from_dict(values)


@pytest.mark.parametrize("stats, message", [
    (_stats_with(mean=[float("nan"), 0.5, 0.5]), "mean is not finite"),
    (_stats_with(count=[0.0, 1000.0, 1000.0]), "count is not a positive whole number"),
    (_stats_with(count=[999.5, 1000.0, 1000.0]), "count is not a positive whole number"),
    (_stats_with(m2=[-1.0, 1.0, 1.0]), "m2 is negative"),
    (_stats_with(mean=[100.0, 0.5, 0.5]), r"mean is outside \[min, max\]"),
])
def test_write_refuses_invalid_statistics(store, stats, message):
    before = folder_state(store)
    with pytest.raises(CacheError, match=message):
        write_entry(store, "bad", stats, {})
    assert folder_state(store) == before


def test_last_read_is_recorded_by_reads_not_by_listing(store):
    assert all(e.last_read is None for e in list_entries(store))  # never read since written
    read_entry(store, "e1")
    listed = {e.key: e.last_read for e in list_entries(store)}
    assert listed["e0"] is None and listed["e2"] is None and abs(listed["e1"] - time.time()) < 60
    again = {e.key: e.last_read for e in list_entries(store)}
    assert again == listed


# --- 2. files the library did not write, damaged files, hostile files -----------------------------


FOREIGN = {
    "csv": lambda p: p.write_text("key,mean,std\ncifar,0.49,0.25\n"),
    "empty": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, np.uint8).tobytes()),
    "HDF5 of another library": lambda p: h5py.File(p, "w").close(),
    "first line damaged": lambda p: p.write_bytes(b"torchnormfit entrx" + bytes(600)),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_a_foreign_file_given_as_the_cache_is_refused_and_left_byte_for_byte(tmp_path, kind):
    path = tmp_path / "labels.csv"
    FOREIGN[kind](path)
    before, listing = path.read_bytes(), sorted(os.listdir(tmp_path))
    for call in (lambda: read_entry(path, "k"), lambda: read_entry(path, None), lambda: list_entries(path),
                 lambda: write_entry(path, "k", make_stats(0), {}), lambda: delete_entries(path, ["k"])):
        with pytest.raises(CacheError, match=r"labels\.csv"):
            call()
    with pytest.raises(CacheError, match="not a torchnormfit entry file"):
        export_entry(path, None, tmp_path / "out.h5")
    with pytest.warns(CacheWarning, match="not a torchnormfit entry file.*left untouched"):
        norm = FitNormalize(cache=path).fit(CountingDataset(n=6), num_workers=0, progress=False)
    assert norm.fit_record.source == "pass" and not norm.fit_record.written
    assert "not saved" in norm.fit_record.note
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_a_foreign_file_at_an_entry_name_is_never_replaced_moved_or_removed(store, kind):
    path = store / "e1.h5"
    FOREIGN[kind](path)
    before = folder_state(store)
    with pytest.raises(cache.NotAnEntryError, match=r"e1\.h5.*left untouched"):
        write_entry(store, "e1", make_stats(5), {})
    with pytest.raises(cache.NotAnEntryError):
        delete_entries(store, ["e1"])
    with pytest.raises(CacheError):
        read_entry(store, "e1")
    with pytest.warns(CacheWarning, match=r"e1\.h5"):
        assert [e.key for e in list_entries(store)] == ["e0", "e2"]
    assert folder_state(store) == before and aside_files(path) == []


def _damage_bit(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0x10
    return bytes(data)


DAMAGE = {
    "one bit in the middle": _damage_bit,
    "truncated": lambda d: d[: len(d) // 2],
    "header only": lambda d: d[:512],
    "digest altered": lambda d: d[:50] + (b"0" if d[50:51] != b"0" else b"1") + d[51:],
    "schema line damaged": lambda d: d[:19] + b"schema_versiox 1" + d[35:],
    "zeroed tail": lambda d: d[:-64] + bytes(64),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_entry_file_is_refused_and_a_write_moves_it_aside(store, kind):
    file = store / "e1.h5"
    damaged = DAMAGE[kind](file.read_bytes())
    file.write_bytes(damaged)
    with pytest.raises(CacheError, match=r"e1\.h5 is damaged or truncated"):
        read_entry(store, "e1")
    with pytest.warns(CacheWarning, match=r"e1\.h5"):
        assert sorted(e.key for e in list_entries(store)) == ["e0", "e2"]
    with pytest.warns(CacheWarning, match="damaged or truncated.*moved to"):
        write_entry(store, "e1", make_stats(9), {})
    assert [p.read_bytes() for p in aside_files(file)] == [damaged]
    assert same_stats(valid_entries(store)["e1"].stats, make_stats(9))


def test_two_damaged_files_moved_aside_in_the_same_second_are_both_kept(store):
    file = store / "e0.h5"
    for seed in (1, 2):
        file.write_bytes(b"torchnormfit entry\n" + bytes(600 + seed))
        with pytest.warns(CacheWarning, match="moved to"):
            write_entry(store, "e0", make_stats(seed), {})
    assert sorted(p.read_bytes() for p in aside_files(file)) == [b"torchnormfit entry\n" + bytes(601 + i)
                                                                  for i in range(2)]


def test_an_entry_file_of_a_newer_schema_is_never_replaced_or_removed(store):
    file = store / "e1.h5"
    newer = b"torchnormfit entry\nschema_version 2\nsomething new\n" + bytes(1000)
    file.write_bytes(newer)
    for call in (lambda: read_entry(store, "e1"), lambda: write_entry(store, "e1", make_stats(1), {}),
                 lambda: delete_entries(store, ["e1"])):
        with pytest.raises(cache.NewerEntryError, match="schema version 2, newer than this torchnormfit reads"):
            call()
    assert file.read_bytes() == newer and aside_files(file) == []


def test_an_entry_file_holding_another_key_is_refused(store):
    shutil.copy(store / "e0.h5", store / "e1.h5")
    with pytest.raises(CacheError, match=r"holds the entry 'e0', not 'e1'"):
        read_entry(store, "e1")


def _set(name, index, value):
    def change(f):
        f[name][index] = value
    return change


def _replace(name, data=None, **create):
    def change(f):
        del f[name]
        f.create_dataset(name, data=data, **create)
    return change


def _attr(name, value):
    def change(f):
        if value is None:
            del f.attrs[name]
        else:
            f.attrs[name] = value
    return change


def _external_link(f):
    outside = Path(f.filename).parent.parent / "outside.h5"  # not in the cache folder
    with h5py.File(outside, "w") as o:
        o.create_dataset("std", data=f["std"][()])
    del f["std"]
    f["std"] = h5py.ExternalLink(str(outside), "/std")


def _external_storage(f):
    raw = Path(f.filename).parent.parent / "raw.bin"
    raw.write_bytes(f["mean"][()].astype("<f8").tobytes())
    del f["mean"]
    f.create_dataset("mean", shape=(3,), dtype="<f8", external=[(str(raw), 0, h5py.h5f.UNLIMITED)])


def _virtual(f):
    source = Path(f.filename).parent.parent / "vsource.h5"
    with h5py.File(source, "w") as o:
        o.create_dataset("mean", data=f["mean"][()])
    layout = h5py.VirtualLayout(shape=(3,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(source), "mean", shape=(3,))
    del f["mean"]
    f.create_virtual_dataset("mean", layout)


def _array(name, **create):
    return lambda f: f.require_group("arrays").create_dataset(name, **create)


BAD_ENTRIES = {  # a sealed file (its digest matches) whose content no torchnormfit writes
    "NaN mean": (_set("mean", 1, np.nan), "mean is not finite"),
    "inf max": (_set("max", 0, np.inf), "max is not finite"),
    "zero std with nonzero m2": (_set("std", 0, 0.0), r"std does not equal sqrt\(m2 / count\)"),
    "negative std": (_set("std", 0, -0.25), r"std does not equal sqrt"),
    "negative m2": (_set("m2", 2, -5.0), "m2 is negative"),
    "count of zero": (_set("count", 0, 0.0), "count is not a positive whole number"),
    "mean outside [min, max]": (_set("mean", 0, 100.0), r"mean is outside \[min, max\]"),
    "float32": (_replace("mean", np.zeros(3, np.float32)), "'mean' is float32 of shape"),
    "int64": (_replace("count", np.full(3, 1000, np.int64)), "'count' is int64"),
    "strings": (_replace("mean", ["0.1", "0.2", "0.3"], dtype=h5py.string_dtype()), "'mean' is object"),
    "opaque pickle": (_replace("mean", np.array([np.void(pickle.dumps(1))] * 3)), r"'mean' is \|V"),
    "compound": (_replace("mean", np.zeros(3, dtype=[("v", "<f8")])), r"'mean' is \[\('v', '<f8'\)\]"),
    "2-D": (_replace("mean", np.zeros((1, 3))), r"shape \(1, 3\), expected float64 \(C,\)"),
    "no channels": (_replace("mean", np.zeros(0)), r"shape \(0,\)"),
    "channel counts differ": (_replace("max", np.ones(4)), "vectors of different lengths"),
    "claims 10^9 elements": (_replace("mean", shape=(10**9,), chunks=(4096,), dtype="f8"), r"shape \(1000000000,\)"),
    "empty dataspace": (_replace("mean", h5py.Empty("f8")), "shape None"),
    "missing m2": (lambda f: f.__delitem__("m2"), "'m2' is missing"),
    "group for a dataset": (lambda f: (f.__delitem__("min"), f.create_group("min")), "'min' is not a dataset"),
    "other format": (_attr("format", "mylib.stats"), "has format 'mylib.stats'"),
    "no schema_version": (_attr("schema_version", None), "version None"),
    "no key": (_attr("key", None), "has no key attribute"),
    "soft link": (lambda f: (f.__delitem__("std"), f.__setitem__("std", h5py.SoftLink("/mean"))), "SoftLink"),
    "external link": (_external_link, "ExternalLink"),
    "external storage": (_external_storage, "'mean' is not a dataset stored in the file"),
    "virtual dataset": (_virtual, "'mean' is not a dataset stored in the file"),
    "int array of another width ok, but a string array": (_array("names", data=["a"], dtype=h5py.string_dtype()),
                                                          "array 'names'"),
    "array with an upper-case name": (_array("Index", data=np.arange(3)), "array 'Index'"),
    "array claiming 2**30 elements": (_array("big", shape=(2**15, 2**15), chunks=(64, 64), dtype="f4"),
                                      r"array 'big' \(float32, shape \(32768, 32768\)\)"),
    "arrays is a dataset": (lambda f: f.create_dataset("arrays", data=np.zeros(3)), "'arrays' is not a group"),
}


@pytest.mark.parametrize("kind", list(BAD_ENTRIES))
def test_a_sealed_entry_that_no_fit_writes_is_refused(tmp_path, kind):
    change, message = BAD_ENTRIES[kind]
    folder = tmp_path / "cache"
    write_entry(folder, "good", make_stats(1), {})
    write_by_hand(folder / "bad.h5", "bad", make_stats(2), change)
    rss = max_rss_bytes()
    with pytest.raises(CacheError, match=message):
        read_entry(folder, "bad")
    assert max_rss_bytes() - rss < 256 * 2**20, "a claimed size was allocated"
    with pytest.warns(CacheWarning, match=message):
        assert [e.key for e in list_entries(folder)] == ["good"]
    with pytest.warns(CacheWarning, match="moved to"):  # it begins with the entry header: the library's
        write_entry(folder, "bad", make_stats(2), {})
    assert sorted(valid_entries(folder)) == ["bad", "good"]


@contextlib.contextmanager
def fifo_watch(fifo: Path):
    """Yield a list that gets an item whenever something opens ``fifo`` for reading (and let it go)."""
    opened: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is reading
                time.sleep(0.002)
                continue
            opened.append(True)
            os.close(fd)
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join()


def test_fifos_are_never_opened_for_reading(tmp_path):
    """A FIFO as the cache path, at an entry's name, or behind an external link: refused, never read."""
    folder = tmp_path / "cache"
    write_entry(folder, "good", make_stats(1), {})
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    os.mkfifo(folder / "k.h5")
    write_by_hand(folder / "linked.h5", "linked", make_stats(2),
                  lambda f: (f.__delitem__("m2"), f.__setitem__("m2", h5py.ExternalLink(str(fifo), "/m2"))))
    with fifo_watch(fifo) as opened, fifo_watch(folder / "k.h5") as opened_too:
        with pytest.raises(CacheError, match="neither a folder nor a file"):
            read_entry(fifo, "k")
        with pytest.raises(CacheError, match="not a regular file"):
            read_entry(folder, "k")
        with pytest.raises(CacheError, match="ExternalLink"):
            read_entry(folder, "linked")
        with pytest.raises(cache.NotAnEntryError):
            write_entry(folder, "k", make_stats(3), {})
    assert not opened and not opened_too


def test_a_damaged_global_heap_never_reaches_hdf5(tmp_path):
    """HDF5 2.0 loops forever on a global heap object of size 0, and variable-length strings (every string
    attribute) live in global heaps. The digest is checked before HDF5 sees a byte: refused, in a fork with
    a deadline so that a regression fails instead of hanging."""
    folder = tmp_path / "cache"
    file = write_entry(folder, "e0", make_stats(0), entry_attrs(0, pad=300))
    data = bytearray(file.read_bytes())
    at = data.find(b"GCOL")
    assert at > 512 and data[at + 4] == 1
    data[at + 16: at + 32] = bytes(16)  # the first object: index 0, size 0
    file.write_bytes(bytes(data))

    def refuse() -> None:
        with pytest.raises(CacheError, match="damaged or truncated"):
            read_entry(folder, "e0")

    assert fork_run(refuse, timeout=30) == 0


def test_a_large_foreign_file_is_refused_after_its_first_bytes(tmp_path):
    """A 192 MiB HDF5 file of another format, as the cache path or at an entry's name: refused by read,
    list and write with the peak RSS growing by under 16 MiB."""
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=np.ones(192 * 2**20, np.uint8))
        f.attrs["format"] = "anndata"
    folder = tmp_path / "cache"
    folder.mkdir()
    os.link(path, folder / "k.h5")
    out = tmp_path / "result.json"

    def refuse() -> None:
        write_entry(tmp_path / "warm", "k", make_stats(0), {})  # imports and first allocations first
        list_entries(tmp_path / "warm")
        start, began = max_rss_bytes(), time.perf_counter()
        for call in (lambda: read_entry(path, "k"), lambda: list_entries(path), lambda: read_entry(folder, "k"),
                     lambda: write_entry(folder, "k", make_stats(0), {})):
            with pytest.raises(CacheError, match="not a torchnormfit entry file"):
                call()
        out.write_text(json.dumps({"growth": max_rss_bytes() - start, "s": time.perf_counter() - began}))

    assert fork_run(refuse) == 0
    result = json.loads(out.read_text())
    assert result["growth"] < 16 * 2**20, result
    print(f"\n[reliability] a 192 MiB foreign HDF5 file refused by read, list and write: peak RSS +"
          f"{result['growth'] / 2**20:.1f} MiB, {result['s'] * 1000:.0f} ms")


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_nothing_is_ever_unpickled(tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(str(marker)))

    def plant(f):
        f.attrs["opaque"] = np.void(payload)
        f.attrs["raw"] = np.frombuffer(payload, np.uint8)

    file = write_by_hand(tmp_path / "k.h5", "k", make_stats(1), plant)
    entry = read_entry(file, None)
    assert not marker.exists() and not any(isinstance(v, _Payload) for v in entry.attrs.values())
    with pytest.raises(ValueError, match="neither a number"):
        write_entry(tmp_path / "cache", "k", make_stats(1), {"payload": _Payload(str(marker))})
    assert not marker.exists()


# --- 3. places that cannot be written -----------------------------------------------------------


def test_unwritable_places_fail_at_once_with_the_operating_systems_reason(tmp_path):
    """No lock wait: the folder and the lock file are created first, and their error is the one raised."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for where, reason in [("/proc/stats.h5", errno.ENOENT), (afile / "sub", errno.ENOTDIR)]:
        started = time.perf_counter()
        with pytest.raises(OSError) as error:
            write_entry(where, "k", make_stats(0), {})
        assert time.perf_counter() - started < 2.0
        assert error.value.errno == reason and os.strerror(reason) in str(error.value) and str(where) in str(error.value)
    with pytest.raises(CacheError, match="is a file; an entry file is only read"):
        write_entry(afile, "k", make_stats(0), {})
    assert afile.read_text() == "x"


def test_a_fit_into_an_unwritable_place_returns_its_statistics_with_the_reason_within_2_s(tmp_path):
    dataset = CountingDataset(n=8)
    plain = FitNormalize(cache=None).fit(dataset, num_workers=0, progress=False)
    started = time.perf_counter()
    with pytest.warns(CacheWarning, match=r"not saved to the cache /proc/stats\.h5.*No such file or directory"):
        norm = FitNormalize(cache="/proc/stats.h5").fit(dataset, num_workers=0, progress=False)
    assert time.perf_counter() - started < 2.0
    assert norm.mean == plain.mean and norm.std == plain.std
    assert not norm.fit_record.written and "not saved: it could not be written" in norm.fit_record.note


def _as_nobody(action, *args) -> None:
    """In a forked child: warm lazy imports up as root, drop to uid/gid 65534, then run ``action``."""
    scratch = Path(tempfile.mkdtemp())
    write_entry(scratch, "k", make_stats(0), {})
    read_entry(scratch, "k")
    shutil.rmtree(scratch)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    action(*args)


def _unprivileged(action, *args) -> int:
    """Run ``action(*args)`` as a user file permissions apply to; exit code of the child."""
    if os.geteuid() != 0:
        return fork_run(action, *args)
    if fork_run(_try_setuid) != 0:
        pytest.skip("running as root without the right to become uid 65534, and root ignores permissions")
    return fork_run(_as_nobody, action, *args)


def _try_setuid() -> None:
    os.setgid(65534)
    os.setuid(65534)


def _expect(outcome: str, call) -> None:
    """Exit 0 if ``call()`` raises an exception whose text holds ``outcome``, 2 on another, 3 if it succeeds."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - reported through the exit code
        if outcome in f"{type(error).__name__}: {error}":
            os._exit(0)
        sys.stderr.write(f"unexpected {type(error).__name__}: {error}\n")
        os._exit(2)
    os._exit(3)


@pytest.fixture
def shared_folder():
    """A cache folder an unprivileged user can reach (pytest's tmp_path is private to root), with entry "old"."""
    base = Path(tempfile.mkdtemp(prefix="tnf-perm-"))
    os.chmod(base, 0o755)
    write_entry(base / "cache", "old", make_stats(0), {})
    yield base / "cache"
    for folder in [base, *base.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o755)
    shutil.rmtree(base)


def test_a_read_only_folder_fails_at_once_with_permission_denied(shared_folder):
    before = folder_state(shared_folder)
    os.chmod(shared_folder, 0o555)
    write = lambda: write_entry(shared_folder, "new", make_stats(1), {})  # noqa: E731
    assert _unprivileged(_expect, "PermissionError: [Errno 13] Cannot write", write) == 0
    remove = lambda: delete_entries(shared_folder, ["old"])  # noqa: E731
    assert _unprivileged(_expect, "Permission denied", remove) == 0
    assert folder_state(shared_folder) == before


def test_a_file_this_user_may_not_read_is_not_taken_for_a_damaged_one(shared_folder):
    """Another user's private entry is refused, never moved aside or replaced as if it were damaged."""
    os.chmod(shared_folder, 0o777)
    os.chmod(shared_folder / ".torchnormfit.lock", 0o666)
    os.chmod(shared_folder / ".torchnormfit-tmp", 0o777)
    os.chmod(shared_folder / "old.h5", 0o600 if os.geteuid() == 0 else 0o200)
    before = folder_state(shared_folder)
    assert _unprivileged(_expect, "not readable (permission denied)", lambda: read_entry(shared_folder, "old")) == 0
    write = lambda: write_entry(shared_folder, "old", make_stats(1), {})  # noqa: E731
    assert _unprivileged(_expect, "not readable (permission denied)", write) == 0
    assert folder_state(shared_folder) == before and aside_files(shared_folder / "old.h5") == []


def test_file_mode_follows_the_folder(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    assert stat.S_IMODE(write_entry(folder, "k", make_stats(0), {}).stat().st_mode) == 0o640


# --- 4. crash safety and concurrency with real processes -----------------------------------------


def _writer_rounds(path: str, me: int, rounds: int, barrier, same_key: bool) -> None:
    for round_ in range(rounds):
        barrier.wait()
        if same_key:
            write_entry(path, "shared", make_stats(77), entry_attrs(77, writer=me))
        else:
            seed = 1000 * round_ + me
            write_entry(path, f"w{me}-r{round_}", make_stats(seed), entry_attrs(seed))


def _reader_loop(path: str, stop, reads, failures) -> None:
    warnings.simplefilter("error", CacheWarning)
    while not stop.is_set():
        try:
            for entry in list_entries(path):
                if not same_stats(entry.stats, make_stats(entry.attrs["seed"])):
                    raise AssertionError(f"entry {entry.key} holds other values than it was written with")
            with reads.get_lock():
                reads.value += 1
        except Exception as error:  # noqa: BLE001 - counted, the test fails on any
            with failures.get_lock():
                failures.value += 1
            sys.stderr.write(f"reader: {type(error).__name__}: {error}\n")


def _beside_readers(path: Path, writers: list, readers: int = 2) -> tuple[int, int]:
    """Run the forked ``writers`` (not started yet) while ``readers`` forked processes read ``path``; every
    process must exit cleanly. Returns the readers' reads and failures."""
    stop, reads, failures = FORK.Event(), FORK.Value("i", 0), FORK.Value("i", 0)
    reader_procs = [FORK.Process(target=_reader_loop, args=(str(path), stop, reads, failures)) for _ in range(readers)]
    for process in [*reader_procs, *writers]:
        process.start()
    for process in writers:
        process.join(300)
    stop.set()
    for process in reader_procs:
        process.join(60)
    assert [p.exitcode for p in writers] == [0] * len(writers)
    assert [p.exitcode for p in reader_procs] == [0] * readers
    return reads.value, failures.value


def _concurrent(path: Path, writers: int, rounds: int, same_key: bool) -> tuple[int, int]:
    barrier = FORK.Barrier(writers)
    procs = [FORK.Process(target=_writer_rounds, args=(str(path), me, rounds, barrier, same_key))
             for me in range(writers)]
    return _beside_readers(path, procs)


def test_eight_processes_write_eight_keys_at_once(tmp_path):
    path = tmp_path / "cache"
    write_entry(path, "before", make_stats(5), entry_attrs(5))
    writers, rounds = 8, 3
    reads, failures = _concurrent(path, writers, rounds, same_key=False)
    entries = valid_entries(path)
    expected = {f"w{me}-r{r}" for me in range(writers) for r in range(rounds)} | {"before"}
    assert set(entries) == expected, f"lost: {expected - set(entries)}"
    assert all(same_stats(e.stats, make_stats(e.attrs["seed"])) for e in entries.values())
    assert failures == 0 and reads > 0 and temp_names(path) == [] and not list(path.glob("*.corrupt-*"))
    print(f"\n[reliability] {writers} concurrent writers x {rounds} rounds: {len(expected) - 1} of "
          f"{writers * rounds} entries landed; {reads} concurrent reads, {failures} failed")


def test_four_processes_write_the_same_key(tmp_path):
    path = tmp_path / "cache"
    reads, failures = _concurrent(path, writers=4, rounds=3, same_key=True)
    entries = valid_entries(path)
    assert list(entries) == ["shared"] and same_stats(entries["shared"].stats, make_stats(77))
    assert entries["shared"].attrs["writer"] in range(4) and failures == 0 and temp_names(path) == []


def _write_and_remove(path: str, rounds: int) -> None:
    for i in range(rounds):
        write_entry(path, f"k{i % 3}", make_stats(i), entry_attrs(i))
        delete_entries(path, [f"k{(i + 1) % 3}"])
        read_entry(path, f"k{(i + 2) % 3}")


def test_readers_never_fail_while_entries_are_removed(tmp_path):
    """Removing an entry unlinks its file: a reader that saw it a moment before reads it as missing."""
    path = tmp_path / "cache"
    write_entry(path, "before", make_stats(5), entry_attrs(5))
    reads, failures = _beside_readers(path, [FORK.Process(target=_write_and_remove, args=(str(path), 40))
                                             for _ in range(2)])
    assert failures == 0 and reads > 0 and "before" in valid_entries(path) and temp_names(path) == []


def test_threads_of_one_process_serialize_too(tmp_path):
    errors = []

    def write(me: int) -> None:
        try:
            for i in range(4):
                write_entry(tmp_path, f"t{me}-{i}", make_stats(100 * me + i), entry_attrs(100 * me + i))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=write, args=(me,)) for me in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and set(valid_entries(tmp_path)) == {f"t{me}-{i}" for me in range(4) for i in range(4)}


@pytest.mark.slow
def test_fresh_interpreters_write_concurrently(tmp_path):
    """8 separate Python interpreters x 5 rounds of different keys, then 4 x 5 rounds of one key."""
    path = tmp_path / "cache"
    for writers, rounds, same_key in [(8, 5, False), (4, 5, True)]:
        barrier = tmp_path / f"barrier-{same_key}"
        barrier.mkdir()
        procs = [start_worker("concurrent", path=str(path), barrier=str(barrier), me=me, writers=writers,
                              rounds=rounds, same_key=same_key, seed=50) for me in range(writers)]
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            assert json.loads(out.strip().splitlines()[-1])["failures"] == []
    entries = valid_entries(path)
    assert set(entries) == {f"w{me}-r{r}" for me in range(8) for r in range(5)} | {"shared"}
    assert all(same_stats(e.stats, make_stats(e.attrs["seed"])) for e in entries.values())
    assert temp_names(path) == []


# kill -9 ---------------------------------------------------------------------------------------------


KEYS = 6
PAD = 20_000  # bytes of provenance per entry, so that the HDF5 write takes a while


def _loop_child(path: str, log: str, start: int) -> None:
    _cache_worker.mode_loop({"path": path, "log": log, "start": start, "keys": KEYS, "pad": PAD})


def _classify_temp(temp: str) -> None:
    """Exit 0 if ``temp`` is a complete, valid entry file (killed between writing it and the rename), else 1."""
    try:
        read_entry(temp, None)
    except Exception:  # noqa: BLE001 - a partial file: that is the answer, not an error
        os._exit(1)


def _log_state(log: Path) -> tuple[list[int], list[int]]:
    begun, done = [], []
    if log.exists():
        for line in log.read_text().splitlines():
            kind, index = line.split()
            (begun if kind == "b" else done).append(int(index))
    return begun, done


class KillCampaign:
    """Kill -9 writers at random moments and check the folder after every kill.

    After a kill the folder must hold exactly the entry set before the interrupted write or the one after
    it (never a mix, never an error), each entry bit-for-bit what was written.
    """

    def __init__(self, folder: Path, seed: int):
        self.path = folder / "cache"
        self.log = folder / "writes.log"
        self.rng = random.Random(seed)
        self.on_disk: dict[str, int] = {}  # key -> seed of the entry in the folder
        self.seen_begun = self.seen_done = self.next_index = 0
        self.seen_temps: set[str] = set()
        self.phases: Counter[str] = Counter()

    def check_after_kill(self) -> None:
        begun, done = _log_state(self.log)
        before = dict(self.on_disk)
        for index in done[self.seen_done:]:
            before[f"k{index % KEYS}"] = index
        pending = [i for i in begun[self.seen_begun:] if i not in set(done[self.seen_done:])]
        assert len(pending) <= 1
        after = dict(before) | {f"k{index % KEYS}": index for index in pending}
        temps = [t for t in temp_names(self.path) if t not in self.seen_temps]
        self.seen_temps |= set(temps)
        for temp in temps:
            complete = fork_run(_classify_temp, str(self.path / ".torchnormfit-tmp" / temp)) == 0
            self.phases["writing the temp file (a partial temp file left)" if not complete
                        else "between writing the temp file and the rename (a complete temp file left)"] += 1
        entries = valid_entries(self.path)
        state = {key: entry.attrs["seed"] for key, entry in entries.items()}
        for key, entry in entries.items():
            assert same_stats(entry.stats, make_stats(entry.attrs["seed"])), f"torn entry {key}"
            assert entry.attrs["pipeline"] == "Compose(ToTensor())" + " " * PAD
        assert state in (before, after), f"the folder holds {state}, expected {before} or {after}"
        if not temps:
            if pending and state == after and state != before:
                self.phases["after the rename (the new file in place)"] += 1
            elif pending:
                self.phases["before the temp file (lock, checking the old file, building the HDF5 file)"] += 1
            else:
                self.phases["between two writes"] += 1
        self.on_disk = state
        self.seen_begun, self.seen_done = len(begun), len(done)
        self.next_index = (max(begun) + 1) if begun else self.next_index

    def kill_once(self, spawn, max_delay: float) -> None:
        process = spawn(self.next_index)
        time.sleep(self.rng.uniform(0.0, max_delay))
        os.kill(process.pid, signal.SIGKILL)
        process.wait() if isinstance(process, subprocess.Popen) else process.join()
        code = process.returncode if isinstance(process, subprocess.Popen) else process.exitcode
        assert code == -signal.SIGKILL, f"the writer exited by itself ({code})"
        self.check_after_kill()

    def fork_writer(self, start: int):
        process = FORK.Process(target=_loop_child, args=(str(self.path), str(self.log), start))
        process.start()
        return process

    def finish(self) -> float:
        """A later write must not wait for a dead writer's lock; it also clears the dead writers' temp files."""
        started = time.perf_counter()
        write_entry(self.path, "final", make_stats(4242), entry_attrs(4242))
        elapsed = time.perf_counter() - started
        assert elapsed < 5.0, f"a write after the kills took {elapsed:.1f} s"
        assert temp_names(self.path) == []
        entries = valid_entries(self.path)
        assert "final" in entries and {k: e.attrs["seed"] for k, e in entries.items() if k != "final"} == self.on_disk
        return elapsed


def _run_kills(tmp_path: Path, kills: int, seed: int) -> KillCampaign:
    campaign = KillCampaign(tmp_path, seed)
    for _ in range(kills):
        campaign.kill_once(campaign.fork_writer, max_delay=0.25)
    elapsed = campaign.finish()
    print(f"\n[reliability] {kills} kill -9 of a writer ({campaign.next_index} writes begun): folder valid after "
          f"every one; phases {dict(campaign.phases)}; next write took {elapsed * 1000:.0f} ms")
    return campaign


WRITE_PHASES = {
    "before the temp file (lock, checking the old file, building the HDF5 file)",
    "writing the temp file (a partial temp file left)",
    "between writing the temp file and the rename (a complete temp file left)",
    "after the rename (the new file in place)",
}


def test_kill_minus_9_during_writes_never_tears_an_entry(tmp_path):
    kills = 24
    campaign = _run_kills(tmp_path, kills=kills, seed=1)
    assert sum(campaign.phases.values()) == kills, campaign.phases
    assert sum(campaign.phases[phase] for phase in WRITE_PHASES) >= kills // 2, campaign.phases


@pytest.mark.slow
def test_kill_minus_9_many_times(tmp_path):
    kills = 250
    campaign = _run_kills(tmp_path, kills=kills, seed=2)
    assert sum(campaign.phases.values()) == kills and len(WRITE_PHASES & set(campaign.phases)) >= 3, campaign.phases


@pytest.mark.slow
def test_kill_minus_9_of_fresh_interpreters(tmp_path):
    campaign = KillCampaign(tmp_path, seed=3)

    def spawn(start: int) -> subprocess.Popen:
        process = start_worker("loop", path=str(campaign.path), log=str(campaign.log), start=start, keys=KEYS, pad=PAD)
        deadline = time.monotonic() + 120
        while start not in _log_state(campaign.log)[0]:  # wait out the imports
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the writer did not start: {process.communicate()[1][-2000:]}")
            time.sleep(0.01)
        return process

    for _ in range(20):
        campaign.kill_once(spawn, max_delay=0.3)
    campaign.finish()


def test_a_live_lock_holder_is_waited_for_and_a_dead_one_is_not(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    write_entry(path, "old", make_stats(0), {})
    holder = start_worker("hold_lock", path=str(path))
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        monkeypatch.setenv("TORCHNORMFIT_CACHE_LOCK_TIMEOUT", "0.5")
        with pytest.raises(OSError, match=r"Could not lock .*\.torchnormfit\.lock within 0\.5 s") as error:
            write_entry(path, "new", make_stats(1), {})
        assert error.value.errno == errno.ETIMEDOUT
        monkeypatch.setenv("TORCHNORMFIT_CACHE_LOCK_TIMEOUT", "soon")
        with pytest.raises(ValueError, match="TORCHNORMFIT_CACHE_LOCK_TIMEOUT must be a number"):
            write_entry(path, "new", make_stats(1), {})
        monkeypatch.delenv("TORCHNORMFIT_CACHE_LOCK_TIMEOUT")
        assert sorted(valid_entries(path)) == ["old"]  # readers take no lock
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    started = time.perf_counter()
    write_entry(path, "new", make_stats(1), {})
    assert time.perf_counter() - started < 5.0 and sorted(valid_entries(path)) == ["new", "old"]


def test_temp_files_of_dead_writers_are_never_read_and_are_cleared(store):
    temp = store / ".torchnormfit-tmp"
    (temp / "entry-abcd1234.tmp").write_bytes(b"partial hdf5 ...")
    shutil.copy(store / "e0.h5", temp / "entry-efgh5678.tmp")
    other = temp / "notes.txt"  # not a temporary file of a writer: left alone
    other.write_text("x")
    assert sorted(valid_entries(store)) == ["e0", "e1", "e2"]
    write_entry(store, "e3", make_stats(3), {})
    assert temp_names(store) == ["notes.txt"] and sorted(valid_entries(store)) == ["e0", "e1", "e2", "e3"]


def test_file_size_limit_during_the_write_keeps_the_old_file(tmp_path):
    """RLIMIT_FSIZE in a fresh interpreter: the write fails with EFBIG at every point of the file.

    (HDF5 2.0 crashes the process with SIGSEGV when one of its own writes fails this way; the entry file is
    built in memory and written with os.write, which fails cleanly.)
    """
    path = tmp_path / "cache"
    for i in range(4):
        write_entry(path, f"e{i}", make_stats(i), entry_attrs(i, pad=2000))
    write_entry(path, "new", make_stats(8), entry_attrs(8, pad=4000))  # the write below replaces it
    before, digest = folder_state(path), _cache_worker.store_digest(path)
    size = (path / "new.h5").stat().st_size
    result = run_worker("fsize", path=str(path), key="new", seed=9, limits=[0, 512, 4096, size // 2, size - 1],
                        pad=4000)
    for outcome in result["outcomes"]:
        assert outcome.get("is_oserror") and outcome["errno"] == errno.EFBIG, outcome
        assert "previous file is unchanged" in outcome["message"], outcome
        assert outcome["sha256"] == digest and outcome["temp_files"] == [] and outcome["aside"] == [], outcome
    assert folder_state(path) == before
    write_entry(path, "new", make_stats(9), {})
    assert same_stats(valid_entries(path)["new"].stats, make_stats(9))


def _fuzz(tmp_path: Path, trials: int, seed: int, fresh: bool) -> dict:
    """Damage an entry file of a 6-entry cache ``trials`` times at random (tests/_cache_worker.py mode_fuzz)."""
    valid = tmp_path / "valid"
    for i in range(6):
        write_entry(valid, f"e{i}", make_stats(i), entry_attrs(i, pad=100))
    work = tmp_path / "work"
    work.mkdir()
    options = {"valid": str(valid), "work": str(work), "trials": trials, "seed": seed, "trial_timeout": 20}
    budget = 120 + 3 * trials
    if fresh:
        result = run_worker("fuzz", timeout=budget, **options)
    else:  # forked from here: no interpreter start-up to pay
        out = tmp_path / "result.json"
        assert fork_run(_cache_worker.mode_fuzz, options | {"out": str(out)}, timeout=budget) == 0
        result = json.loads(out.read_text())
    assert result["bad"] == [], "\n".join(result["bad"][:20])
    figures = {k: result[k] for k in ("slowest_trial_s", "trials_over_1s", "peak_rss_mb_of_a_trial")}
    print(f"\n[reliability] {trials} randomly damaged copies of an entry file (random bytes, bit flips, zeroed "
          f"runs, truncation): no crash, hang, stray exception or wrong value: {figures} "
          f"{json.dumps(result['counts'], indent=1)}")
    return result


def test_random_damage_is_refused_or_harmless(tmp_path):
    """Damage a valid file at random: never a crash, a hang, an unexpected exception or silently wrong values."""
    _fuzz(tmp_path, trials=30, seed=0, fresh=False)


@pytest.mark.slow
def test_random_damage_many_times(tmp_path):
    _fuzz(tmp_path, trials=300, seed=1, fresh=True)


# --- 5. one entry file to hand over; pruning -----------------------------------------------------


def test_export_writes_one_self_contained_file_that_from_cache_and_cache_eq_read(tmp_path):
    folder, dataset = tmp_path / "cache", CountingDataset(n=12)
    fitted = FitNormalize(cache=folder).fit(dataset, num_workers=0, progress=False)
    out = export_entry(folder, fitted.cache_key, tmp_path / "stats.h5")
    assert out == tmp_path / "stats.h5" and out.read_bytes() == (folder / f"{fitted.cache_key}.h5").read_bytes()
    with h5py.File(out, "r") as f:
        assert f.attrs["key"] == fitted.cache_key and len(f["mean"][()]) == 3
    loaded = FitNormalize.from_cache(out)
    assert loaded.mean == fitted.mean and loaded.cache_key == fitted.cache_key
    assert FitNormalize.from_cache(out, fitted.cache_key).std == fitted.std
    with pytest.raises(CacheError, match="holds .* not 'other'"):
        FitNormalize.from_cache(out, "other")
    before = out.read_bytes()
    hit = FitNormalize(cache=out).fit(dataset, num_workers=0, progress=False)
    assert hit.fit_record.source == "cache" and hit.fit_record.verification.passed and hit.mean == fitted.mean
    other = FitNormalize(cache=out).fit(CountingDataset(n=12, seed=1), num_workers=0, progress=False, refit=True)
    assert other.fit_record.source == "pass" and not other.fit_record.written
    assert "not saved: cache= names a file, which a fit only reads" in other.fit_record.note
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["cache", "stats.h5"]
    (tmp_path / "into").mkdir()
    assert export_entry(folder, fitted.cache_key, tmp_path / "into") == tmp_path / "into" / f"{fitted.cache_key}.h5"


def test_export_replaces_only_an_entry_file(store, tmp_path):
    target = tmp_path / "labels.csv"
    target.write_text("a,b\n")
    with pytest.raises(cache.NotAnEntryError):
        export_entry(store, "e0", target)
    assert target.read_text() == "a,b\n"
    shutil.copy(store / "e1.h5", tmp_path / "mine.h5")
    assert read_entry(export_entry(store, "e0", tmp_path / "mine.h5"), None).key == "e0"
    with pytest.raises(CacheError, match="No entry 'nope'"):
        export_entry(store, "nope", tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.glob(".*.tmp"))


def test_prune_by_age_and_count(tmp_path):
    now = time.time()
    for seed, days in enumerate([1, 10, 40, 400]):
        created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - days * 86400))
        write_entry(tmp_path, f"d{days}", make_stats(seed), entry_attrs(seed, created_utc=created))
    os.utime(write_entry(tmp_path, "no-date", make_stats(9), {}), (now - 20 * 86400, now - 20 * 86400))
    with pytest.raises(ValueError, match="older_than .* or keep_last"):
        cache.prune_entries(tmp_path)
    assert sorted(cache.prune_entries(tmp_path, older_than=30 * 86400, now=now)) == ["d40", "d400"]
    assert cache.prune_entries(tmp_path, keep_last=2, now=now) == ["no-date"]
    assert cache.prune_entries(tmp_path, older_than=0, keep_last=1, now=now) == ["d10"]
    assert sorted(valid_entries(tmp_path)) == ["d1"] and cache.prune_entries(tmp_path / "none", keep_last=0) == []


def test_listing_reads_no_torch():
    """``ls`` needs entries without torch: CacheEntry.stats imports it on first use only."""
    code = ("import sys, torchnormfit.cache as c; e = c.list_entries(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(e))")
    folder = Path(tempfile.mkdtemp())
    write_entry(folder, "k", make_stats(0), {})
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=_env())
    shutil.rmtree(folder)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
