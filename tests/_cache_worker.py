"""Worker processes for tests/test_cache.py: real writers, lock holders and fault injection.

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
fuzz        damage a valid cache file at random offsets; read, list and write each damaged copy and
            classify what happened. Progress goes to stderr so a hang can be located.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from torchnormfit import ChannelStats
from torchnormfit import cache


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
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "temp_files": sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")),
            "aside": sorted(p.name for p in path.parent.glob(f"{path.name}.corrupt-*")),
        }
        outcomes.append(outcome)
    _result(outcomes=outcomes)


def mode_hold_lock(o: dict) -> None:
    with cache._locked(Path(o["path"])):
        print("locked", flush=True)
        time.sleep(3600)


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


def _same_values(stats, want) -> bool:
    """Bit-for-bit the same count, mean, m2, std, min and max."""
    return all(torch.equal(getattr(stats, f), getattr(want, f)) for f in ("count", "mean", "m2", "std", "min", "max"))


def _fuzz_trial(path: Path, damaged: bytes, how: str, truth: dict) -> tuple[list[str], list[str]]:
    """Read, list and write one damaged copy; (outcome names, failures)."""
    outcomes: list[str] = []
    bad: list[str] = []
    # Reading: CacheError, or exactly the values that were written.
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
        elif _same_values(entry.stats, truth[key].stats):
            outcomes.append("read: original values")
        else:
            bad.append(f"{how}: read_entry returned different values for {key!r} without an error")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            listed = cache.list_entries(path)
        except cache.CacheError:
            outcomes.append("list: refused (CacheError)")
        except Exception as error:
            bad.append(f"{how}: list_entries raised {type(error).__name__}: {error}")
        else:
            for entry in listed:
                if entry.key not in truth or not _same_values(entry.stats, truth[entry.key].stats):
                    bad.append(f"{how}: list_entries returned a changed entry {entry.key!r}")
    # Writing over it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cache.write_entry(path, "new", make_stats(12345), entry_attrs(12345))
        except cache.CacheError:
            outcomes.append("write: refused, file left as it was (CacheError)")
            if path.read_bytes() != damaged:
                bad.append(f"{how}: write_entry refused but changed the file")
            return outcomes, bad
        except Exception as error:
            bad.append(f"{how}: write_entry raised {type(error).__name__}: {error}")
            return outcomes, bad
    kept_aside = [p for p in path.parent.iterdir() if ".corrupt-" in p.name]
    if any(issubclass(w.category, cache.CacheWarning) for w in caught):
        outcomes.append("write: succeeded, damaged file kept aside with a CacheWarning")
        if not any(p.read_bytes() == damaged for p in kept_aside):
            bad.append(f"{how}: warned but the damaged file was not kept aside")
    else:
        outcomes.append("write: succeeded, no damage seen")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            after = {entry.key: entry for entry in cache.list_entries(path)}
    except Exception as error:
        bad.append(f"{how}: the file written over the damage does not validate: {type(error).__name__}: {error}")
        return outcomes, bad
    if "new" not in after or not _same_values(after["new"].stats, make_stats(12345)):
        bad.append(f"{how}: the new entry is missing or changed after the write")
    for key, entry in after.items():
        if key != "new" and not _same_values(entry.stats, truth[key].stats):
            bad.append(f"{how}: carried-over entry {key!r} changed")
    outcomes.append(f"write: entries carried over: {len(after) - 1} of {len(truth)}")
    return outcomes, bad


def mode_fuzz(o: dict) -> None:
    """Damage a valid cache file ``trials`` times. Whatever the damage: reading raises CacheError or returns the
    exact original values; writing succeeds (a damaged file moved or copied aside, with a CacheWarning) or refuses
    a file that no longer looks like a cache (CacheError); nothing else ever happens: no other exception, no
    crash, no hang (each trial runs in a forked child with a deadline of ``trial_timeout`` seconds)."""
    original = Path(o["valid"]).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        truth = {entry.key: entry for entry in cache.list_entries(o["valid"])}
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
        path = folder / "stats.h5"
        damaged, how = _corrupt(original, rng)
        path.write_bytes(damaged)
        (folder / "damaged.bin").write_bytes(damaged)  # kept for a post-mortem
        if not o.get("out"):  # a fresh interpreter's progress, for a post-mortem
            print(f"trial {trial} {how}", file=sys.stderr, flush=True)
        report = folder / "report.json"
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: one trial, its report in a file
            code = 0
            try:
                outcomes, failures = _fuzz_trial(path, damaged, how, truth)
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
