"""What the cache folder costs as it grows, and what a large foreign file costs before it is refused.

Three sections, each printed as a markdown table with ratios against a baseline measured in the same run:

1. **Save and hit vs entries.** Cache folders of 1, 100, 1,000 and 10,000 entries are filled first (each
   entry with ``write_entry``, as fits write them). Then, round after round, each folder in turn gets one
   save of a new key (``write_entry``: lock, entry file built in memory, written, fsynced, renamed; the key
   is removed again between rounds, untimed) and one hit (``read_entry`` of one of its keys, at random).
   Medians; ratios against the 1-entry folder.
2. **Listing** (what ``torchnormfit ls`` reads): ``list_entries`` of each folder, once per size; the time per
   entry against the 1-entry folder's.
3. **A foreign file.** ``read_entry`` on a ~1.5 GB HDF5 file of another format (its root attributes
   written last, so their global heap sits at the end of the file) and on a small one, alternately,
   each call in a forked child after a warm-up: the time, the growth of the child's peak RSS and the
   bytes it read (``rchar`` of ``/proc/self/io``).

Run: ``PYTHONPATH=. python benchmarks/bench_cache.py`` (``--quick``: 1 to 100 entries, a 64 MiB file).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from torchnormfit import ChannelStats, cache

FORK = multiprocessing.get_context("fork")


def stats_for(seed: int) -> ChannelStats:
    generator = torch.Generator().manual_seed(seed)
    return ChannelStats.from_pixels(torch.rand(3, 256, generator=generator, dtype=torch.float64))


def attrs_for(seed: int) -> dict:
    """Provenance of the size a fit writes (dataset description and pipeline repr)."""
    return {
        "created_utc": "2026-12-01T00:00:00+00:00",
        "dataset": json.dumps({"class": "ImageFolder", "root": f"/data/set-{seed}", "len": 50000}),
        "pipeline": "Compose(Resize(size=[256]), CenterCrop(size=(224, 224)), ToImage(), ToDtype(float32))",
        "num_samples": 50000,
        "ddof": 0,
    }


def fill(path: Path, entries: int) -> float:
    """Write ``entries`` entries with write_entry; the mean seconds per write."""
    started = time.perf_counter()
    for i in range(entries):
        cache.write_entry(path, f"key-{i:05d}", stats_for(i), attrs_for(i))
    return (time.perf_counter() - started) / max(entries, 1)


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def section_entries(sizes: list[int], rounds: int, tmp: Path) -> list[dict]:
    caches = {}
    fill_s = {}
    for size in sizes:
        caches[size] = tmp / f"entries-{size}"
        fill_s[size] = fill(caches[size], size)
        print(f"filled {size} entries: {fill_s[size] * 1000:.1f} ms per write", file=sys.stderr, flush=True)
    saves = {size: [] for size in sizes}
    hits = {size: [] for size in sizes}
    rng = random.Random(0)
    for round_ in range(rounds):  # interleaved: every size once per round
        for size in sizes:
            path = caches[size]
            saves[size].append(_timed(lambda path=path, round_=round_: cache.write_entry(
                path, "probe", stats_for(10**6 + round_), attrs_for(round_))))
            cache.delete_entries(path, ["probe"])
            key = f"key-{rng.randrange(size):05d}"
            hits[size].append(_timed(lambda path=path, key=key: cache.read_entry(path, key)))
    base_save, base_hit = statistics.median(saves[sizes[0]]), statistics.median(hits[sizes[0]])
    rows = []
    for size in sizes:
        save, hit = statistics.median(saves[size]), statistics.median(hits[size])
        rows.append({"entries": size, "save_ms": save * 1000, "save_x": save / base_save, "hit_ms": hit * 1000,
                     "hit_x": hit / base_hit, "fill_ms_per_write": fill_s[size] * 1000})
    return rows


def section_listing(sizes: list[int], tmp: Path) -> list[dict]:
    """``list_entries`` of each folder built by :func:`section_entries` (median of 3, interleaved): ms in all
    and per entry."""
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(3):
        for size in sizes:
            times[size].append(_timed(lambda size=size: cache.list_entries(tmp / f"entries-{size}")))
    rows = []
    for size in sizes:
        seconds = statistics.median(times[size])
        rows.append({"entries": size, "list_ms": seconds * 1000, "ms_per_entry": seconds * 1000 / size})
    return rows


def make_foreign(path: Path, size: int) -> None:
    """An HDF5 file of another format: ``size`` bytes of data, then root attributes (a global heap at the end)."""
    block = np.arange(2**21, dtype=np.uint64).view(np.uint8)
    with h5py.File(path, "w") as f:
        data = f.create_dataset("X", shape=(size,), dtype="u1")
        for start in range(0, size, block.size):
            data[start : start + block.size] = block[: size - start]
        f.attrs["format"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"


def _bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (Linux /proc/self/io ``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def _refuse(path: str, warm: str, conn) -> None:
    """In a forked child: warm up on a valid cache, then time the refusal; the peak RSS growth, bytes read."""
    cache.list_entries(warm)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start_read = _bytes_read()
    started = time.perf_counter()
    try:
        cache.read_entry(path, "k")
        refused = False
    except cache.CacheError:
        refused = True
    seconds = time.perf_counter() - started
    read = _bytes_read() - start_read
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) * 1024
    conn.send({"s": seconds, "rss_growth": growth, "bytes_read": read, "refused": refused})


def _in_child(path: Path, warm: Path) -> dict:
    parent, child = FORK.Pipe()
    process = FORK.Process(target=_refuse, args=(str(path), str(warm), child))
    process.start()
    result = parent.recv()
    process.join()
    return result


def section_foreign(size: int, rounds: int, tmp: Path) -> list[dict]:
    small, large = tmp / "foreign-small.h5", tmp / "foreign-large.h5"
    make_foreign(small, 2**20)
    started = time.perf_counter()
    make_foreign(large, size)
    os.sync()  # no dirty pages being written back while the reads are timed
    print(f"wrote {large.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    warm = tmp / "warm"
    cache.write_entry(warm, "k", stats_for(0), attrs_for(0))
    results = {small: [], large: []}
    for _ in range(rounds):
        for path in (small, large):
            results[path].append(_in_child(path, warm))
    base = statistics.median(r["s"] for r in results[small])
    rows = []
    for name, path in (("1 MiB", small), (f"{large.stat().st_size / 2**30:.2f} GiB", large)):
        seconds = statistics.median(r["s"] for r in results[path])
        rows.append({"file": name, "bytes": path.stat().st_size, "refused": all(r["refused"] for r in results[path]),
                     "ms": seconds * 1000, "x": seconds / base,
                     "rss_growth_mib": max(r["rss_growth"] for r in results[path]) / 2**20,
                     "bytes_read": max(r["bytes_read"] for r in results[path])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 to 100 entries, a 64 MiB foreign file")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tmpdir", type=Path, help="where to build the caches (default: a new temp folder)")
    args = parser.parse_args()
    sizes = [1, 10, 100] if args.quick else [1, 100, 1000, 10000]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.tmpdir))
    try:
        entries = section_entries(sizes, args.rounds, tmp)
        listing = section_listing(sizes, tmp)
        foreign = section_foreign(2**26 if args.quick else 3 * 2**29, max(3, args.rounds // 6), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("## Save and hit vs entries (median; x: against the 1-entry cache, interleaved)\n")
    print("| entries | save ms | save x | hit ms | hit x | filling: ms per write |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in entries:
        print(f"| {r['entries']:,} | {r['save_ms']:.2f} | {r['save_x']:.2f} | {r['hit_ms']:.2f} | {r['hit_x']:.2f} | "
              f"{r['fill_ms_per_write']:.2f} |")
    print("\n## Listing the folder (list_entries, what ls reads; x: ms per entry against the 1-entry folder)\n")
    print("| entries | list ms | ms per entry | x |")
    print("|---:|---:|---:|---:|")
    for r in listing:
        print(f"| {r['entries']:,} | {r['list_ms']:.1f} | {r['ms_per_entry']:.2f} | "
              f"{r['ms_per_entry'] / listing[0]['ms_per_entry']:.2f} |")
    print("\n## A foreign HDF5 file refused (read_entry in a forked child; median time, max peak-RSS growth)\n")
    print("| file | refused | ms | x the small file | peak RSS growth MiB | bytes read |")
    print("|---|---|---:|---:|---:|---:|")
    for r in foreign:
        print(f"| {r['file']} | {r['refused']} | {r['ms']:.2f} | {r['x']:.2f} | {r['rss_growth_mib']:.1f} | "
              f"{r['bytes_read']:,} |")
    if args.json:
        args.json.write_text(json.dumps({"entries": entries, "listing": listing, "foreign": foreign}, indent=1))


if __name__ == "__main__":
    main()
