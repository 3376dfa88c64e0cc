"""Worker processes for tests/test_cache.py: real writers, lock holders and fault injection.

A cache is a folder of entry files (torchnormfit/cache, docs/cache-format.md); ``path`` below is that folder.

Run as ``python tests/_cache_worker.py MODE '<json options>'``. Every mode ends by
printing one JSON line (its result) on stdout. The helpers at the top
(:func:`make_stats`, :func:`entry_attrs`) are imported by the tests too, so a
writer here and a checker there agree on what each entry must hold.

Modes
-----
write       write one entry; report the exception if any.
fsize       under several RLIMIT_FSIZE caps (SIGXFSZ ignored, so writes fail with EFBIG) write one entry.
hold_lock   take the cache's write lock the way write_entry does, say so, and sleep until killed.
loop        write entries forever, logging "b <i>" before and "d <i>" after each write (kill -9 target).
concurrent  ``writers`` writers in ``rounds`` rounds started together through a file barrier; this
            process is one writer of them (the tests start several).
fuzz        damage one entry file of a valid cache at random offsets; read, list and write each damaged
            copy and classify what happened. Progress goes to stderr so a hang can be located.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import filelock
import torch

from torchnormfit import ChannelStats, cache


def make_stats(seed: int, channels: int = 3, pixels: int = 1000) -> ChannelStats:
    """Deterministic statistics for ``seed``: the same bits in every process."""
    generator = torch.Generator().manual_seed(seed)
    pixels_ = torch.rand(channels, pixels, generator=generator, dtype=torch.float64) * (1 + seed % 7)
    return ChannelStats.from_pixels(pixels_)


def entry_attrs(seed: int, pad: int = 0, **extra) -> dict:
    """Provenance attributes like a fit's, plus ``seed`` so a checker can rebuild the stats."""
    return {
        "created_utc": "2026-01-01T00:00:00+00:00",
        "dataset": json.dumps({"class": "FakeData", "seed": seed}),
        "pipeline": "Compose(ToTensor())" + " " * pad,
        "num_samples": 100 + seed,
        "ddof": 0,
        "seed": seed,
        **extra,
    }


def entry_file(path: Path, key: str) -> Path:
    """Where the documented layout puts entry ``key`` of cache folder ``path``: ``<path>/<key>.h5`` for a plain key."""
    return Path(path) / cache.entry_name(key)


def temp_names(path: Path) -> list[str]:
    """The temporary files in the cache's temporary folder (a writer's, or a dead writer's)."""
    folder = Path(path) / ".torchnormfit-tmp"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def store_digest(path: Path) -> str:
    """SHA-256 over the names and bytes of every file of cache folder ``path`` (the lock file excepted)."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file() and file.name != ".torchnormfit.lock":
            digest.update(f"{file.relative_to(path)}\n".encode() + file.read_bytes())
    return digest.hexdigest()


def _log(fd: int, text: str) -> None:
    os.write(fd, f"{text}\n".encode())


def _result(**values) -> None:
    print(json.dumps(values), flush=True)


def _error(error: BaseException) -> dict:
    return {"error": type(error).__name__, "errno": getattr(error, "errno", None), "message": str(error)}


def mode_write(o: dict) -> None:
    try:
        cache.write_entry(o["path"], o["key"], make_stats(o["seed"]), entry_attrs(o["seed"]))
    except Exception as error:  # reported, not raised: the test decides
        _result(**_error(error))
    else:
        _result(ok=True)


def mode_fsize(o: dict) -> None:
    """For each limit in ``limits``: cap RLIMIT_FSIZE, try the write, lift the cap, and record the outcome
    together with what is on disk afterwards (the file's SHA-256, temp files, files kept aside)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    path = Path(o["path"])
    stats, attrs = make_stats(o["seed"]), entry_attrs(o["seed"], pad=o.get("pad", 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    outcomes = []
    for limit in o["limits"]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            cache.write_entry(path, o["key"], stats, attrs)
        except Exception as error:
            outcome = _error(error) | {"is_oserror": isinstance(error, OSError)}
        else:
            outcome = {"ok": True}
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        outcome |= {
            "limit": limit,
            "sha256": store_digest(path),
            "temp_files": temp_names(path),
            "aside": sorted(p.name for p in path.glob("*.corrupt-*")),
        }
        outcomes.append(outcome)
    _result(outcomes=outcomes)


def hold_lock(path: str) -> None:
    """Take the cache folder's documented write lock (``.torchnormfit.lock``, an flock) and keep it until killed."""
    Path(path).mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(Path(path) / ".torchnormfit.lock"):
        print("locked", flush=True)
        time.sleep(3600)


def mode_hold_lock(o: dict) -> None:
    hold_lock(o["path"])


def mode_loop(o: dict) -> None:
    """Write key ``k{i % keys}`` with the stats of seed ``i`` for i = start, start+1, ... until killed."""
    fd = os.open(o["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    i = o["start"]
    while o.get("stop") is None or i < o["stop"]:
        _log(fd, f"b {i}")
        cache.write_entry(o["path"], f"k{i % o['keys']}", make_stats(i), entry_attrs(i, pad=o.get("pad", 0)))
        _log(fd, f"d {i}")
        i += 1
    _result(ok=True)


def _barrier(folder: Path, name: str, me: int, parties: int, timeout: float = 120.0) -> None:
    (folder / f"{name}-{me}").touch()
    deadline = time.monotonic() + timeout
    while sum(1 for _ in folder.glob(f"{name}-*")) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: not all {parties} writers arrived")
        time.sleep(0.001)


def mode_concurrent(o: dict) -> None:
    """One of ``writers`` processes: each round, wait for all, then write (``same_key``: all the same key)."""
    barrier = Path(o["barrier"])
    written, failures = [], []
    for round_ in range(o["rounds"]):
        _barrier(barrier, f"r{round_}", o["me"], o["writers"])
        if o["same_key"]:
            key, seed = "shared", o["seed"]
        else:
            key, seed = f"w{o['me']}-r{round_}", o["seed"] + 1000 * round_ + o["me"]
        try:
            cache.write_entry(o["path"], key, make_stats(seed), entry_attrs(seed, writer=o["me"]))
            written.append(key)
        except Exception as error:
            failures.append(_error(error) | {"traceback": traceback.format_exc()})
    _result(written=written, failures=failures)


def _corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(data)
    kind = rng.choice(["bytes", "bytes", "bit", "zero", "truncate"])
    offset = rng.randrange(len(data))
    if kind == "bit":
        data[offset] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        for i in range(offset, min(len(data), offset + rng.choice([1, 4, 16, 64]))):
            data[i] = rng.randrange(256)
    elif kind == "zero":
        end = min(len(data), offset + rng.choice([8, 64, 512]))
        data[offset:end] = bytes(end - offset)
    else:
        del data[offset:]
    return bytes(data), f"{kind}@{offset}"


def _same(a: ChannelStats, b: ChannelStats) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("count", "mean", "m2", "std", "min", "max"))


def _fuzz_reads(path: Path, how: str, truth: dict, outcomes: list[str], bad: list[str]) -> None:
    """Reading each key: a CacheError, or exactly the values written. Listing: the same for what it lists."""
    for key in sorted(truth):
        try:
            entry = cache.read_entry(path, key)
        except cache.CacheError:
            outcomes.append("read: refused (CacheError)")
            continue
        except Exception as error:
            bad.append(f"{how}: read_entry raised {type(error).__name__}: {error}")
            continue
        if entry is None:
            outcomes.append("read: entry missing")
        elif _same(entry.stats, truth[key]):
            outcomes.append("read: original values")
        else:
            bad.append(f"{how}: read_entry returned different values for {key!r} without an error")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            listed = cache.list_entries(path)
        except cache.CacheError:
            outcomes.append("list: refused (CacheError)")
            return
        except Exception as error:
            bad.append(f"{how}: list_entries raised {type(error).__name__}: {error}")
            return
    for entry in listed:
        if entry.key not in truth or not _same(entry.stats, truth[entry.key]):
            bad.append(f"{how}: list_entries returned a changed entry {entry.key!r}")


def _fuzz_write(path: Path, damaged_file: Path, damaged: bytes, key: str, how: str) -> tuple[list[str], list[str]]:
    """Write ``key`` over the damage: it lands and reads back, the damaged file untouched or kept aside with a
    CacheWarning; or a CacheError that changed nothing (the damage looks like a foreign or newer file)."""
    outcomes: list[str] = []
    bad: list[str] = []
    stats = make_stats(12345)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cache.write_entry(path, key, stats, entry_attrs(12345))
        except cache.CacheError:
            outcomes.append(f"write {key}: refused, file left as it was (CacheError)")
            if damaged_file.read_bytes() != damaged:
                bad.append(f"{how}: write_entry refused but changed the file")
            return outcomes, bad
        except Exception as error:
            bad.append(f"{how}: write_entry raised {type(error).__name__}: {error}")
            return outcomes, bad
    aside = [p for p in damaged_file.parent.iterdir() if p.name.startswith(f"{damaged_file.name}.corrupt-")]
    if any(issubclass(w.category, cache.CacheWarning) for w in caught):
        outcomes.append(f"write {key}: succeeded, damaged file kept aside with a CacheWarning")
        if not any(p.read_bytes() == damaged for p in aside):
            bad.append(f"{how}: warned but the damaged file was not kept aside")
    elif damaged_file.exists() and damaged_file.read_bytes() != damaged:
        outcomes.append(f"write {key}: succeeded, replacing an entry that read as valid")
    else:
        outcomes.append(f"write {key}: succeeded, damaged file untouched")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entry = cache.read_entry(path, key)
    except Exception as error:
        bad.append(f"{how}: the entry written over the damage does not read: {type(error).__name__}: {error}")
        return outcomes, bad
    if entry is None or not _same(entry.stats, stats):
        bad.append(f"{how}: the entry {key!r} written over the damage reads back different")
    return outcomes, bad


def _fuzz_trial(path: Path, damaged_file: Path, damaged: bytes, how: str, truth: dict) -> tuple[list[str], list[str]]:
    """Read, list and write over one damaged file of a cache; (outcome names, failures)."""
    outcomes: list[str] = []
    bad: list[str] = []
    _fuzz_reads(path, how, truth, outcomes, bad)
    written = ["new", sorted(truth)[0]]  # the damaged entry file is written over too
    for key in written:
        more, worse = _fuzz_write(path, damaged_file, damaged, key, how)
        outcomes += more
        bad += worse
    if not any(outcome.endswith("(CacheError)") and outcome.startswith("write") for outcome in outcomes):
        _fuzz_reads(path, how, truth | dict.fromkeys(written, make_stats(12345)), outcomes, bad)
    return outcomes, bad


def mode_fuzz(o: dict) -> None:
    """Damage the first key's entry file of a valid cache folder ``trials`` times. Whatever the damage: reading raises CacheError or returns the exact
    original values; writing succeeds (the entry reads back; a damaged file untouched, or moved aside with a
    CacheWarning) or refuses a file that no longer looks like a cache (CacheError); nothing else ever happens:
    no other exception, no crash, no hang (each trial runs in a forked child with a deadline of
    ``trial_timeout`` seconds)."""
    valid = Path(o["valid"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        truth = {entry.key: entry.stats for entry in cache.list_entries(valid)}
    target = entry_file(valid, sorted(truth)[0])
    original = target.read_bytes()
    rng = random.Random(o["seed"])
    work = Path(o["work"])
    deadline_s = o.get("trial_timeout", 30.0)
    counts: dict[str, int] = {}
    bad: list[str] = []
    durations: list[float] = []
    peak_rss_mb = 0.0
    for trial in range(o["trials"]):
        folder = work / f"t{trial}"
        folder.mkdir()
        path = folder / valid.name
        shutil.copytree(valid, path)
        damaged_file = path / target.name
        damaged, how = _corrupt(original, rng)
        damaged_file.write_bytes(damaged)
        (folder / "damaged.bin").write_bytes(damaged)  # kept for a post-mortem
        if not o.get("out"):  # a fresh interpreter's progress, for a post-mortem
            print(f"trial {trial} {how}", file=sys.stderr, flush=True)
        report = folder / "report.json"
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: one trial, its report in a file
            code = 0
            try:
                outcomes, failures = _fuzz_trial(path, damaged_file, damaged, how, truth)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                report.write_text(json.dumps({"outcomes": outcomes, "bad": failures, "rss_mb": rss}))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - started > deadline_s:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.002)
        durations.append(time.monotonic() - started)
        if status is None:
            bad.append(f"{how}: hung (killed after {deadline_s:g} s); file kept at {folder / 'damaged.bin'}")
            continue
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or not report.exists():
            bad.append(f"{how}: the process died (wait status {status}); file kept at {folder / 'damaged.bin'}")
            continue
        result = json.loads(report.read_text())
        for name in result["outcomes"]:
            counts[name] = counts.get(name, 0) + 1
        bad.extend(result["bad"])
        peak_rss_mb = max(peak_rss_mb, result["rss_mb"])
    result = {
        "counts": counts,
        "bad": bad,
        "trials": o["trials"],
        "slowest_trial_s": round(max(durations, default=0.0), 3),
        "trials_over_1s": sum(d > 1.0 for d in durations),
        "peak_rss_mb_of_a_trial": round(peak_rss_mb),
    }
    if o.get("out"):  # when run in a forked child, the result goes to a file
        Path(o["out"]).write_text(json.dumps(result))
    else:
        _result(**result)


MODES = {
    "write": mode_write,
    "fsize": mode_fsize,
    "hold_lock": mode_hold_lock,
    "loop": mode_loop,
    "concurrent": mode_concurrent,
    "fuzz": mode_fuzz,
}

if __name__ == "__main__":
    MODES[sys.argv[1]](json.loads(sys.argv[2]))
