#!/usr/bin/env python
"""Issue 14, items 3 and 4: the fit pass in the main process, and what a key costs on a large permuted tensor.

    python benchmarks/bench_hidden_costs.py             # both sections (~3 min on 2 cores)
    python benchmarks/bench_hidden_costs.py --quick     # small sizes, a smoke check

``main-process``
    1,500 PNG images of 3x96x96 in an image folder, ``ToImage + ToDtype(float32, scale=True)``,
    batch 128, ``num_workers=0``. Interleaved rounds of: the plain DataLoader pass over that
    pipeline (the floor), the same pass plus the library's ``batch_stats`` on each collated batch,
    and ``FitNormalize(cache=None).fit`` with the transform at the end of the same pipeline.
    Ratios to the floor of the same round, then the median (target for the fit: <= 1.08x).
``digest``
    ``fingerprint`` of a ``TensorDataset`` holding a 3 GB uint8 tensor laid out NHWC and viewed
    NCHW (``permute``), against the same bytes contiguous: time, and peak RSS growth of a fresh
    forked process (bounded time and memory whatever the layout).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from torchnormfit import FitNormalize
from torchnormfit.accumulator import batch_stats
from torchnormfit.key import fingerprint


def write_pngs(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 200)
        pixels = (base + rng.integers(0, 56, (size, size, 3))).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def section_main_process(n: int, size: int, rounds: int) -> dict:
    tmp = Path(tempfile.mkdtemp())
    write_pngs(tmp, n, size)
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]

    def floor():
        for _batch, _ in DataLoader(ImageFolder(tmp, transform=v2.Compose(to_float)), batch_size=128, num_workers=0):
            pass

    def floor_stats():
        for batch, _ in DataLoader(ImageFolder(tmp, transform=v2.Compose(to_float)), batch_size=128, num_workers=0):
            batch_stats(batch)

    def fit():
        norm = FitNormalize(cache=None)
        norm.fit(ImageFolder(tmp, transform=v2.Compose([*to_float, norm])), batch_size=128, num_workers=0,
                 progress=False)

    methods = {"floor": floor, "floor + batch_stats": floor_stats, "fit": fit}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():  # warm-up: file cache, lazy imports
        method()
    for r in range(rounds):
        order = list(methods)[r % 3:] + list(methods)[: r % 3]
        for name in order:
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
    ratios = {name: statistics.median(t / f for t, f in zip(times[name], times["floor"])) for name in methods}
    return {"images": n, "size": size, "rounds": rounds,
            "median_s": {name: statistics.median(t) for name, t in times.items()}, "x_floor": ratios}


def _digest_child(conn, gib: float, permuted: bool) -> None:
    n = int(gib * (1 << 30)) // (3 * 224 * 224)
    nhwc = torch.from_numpy(np.full((n, 224, 224, 3), 7, dtype=np.uint8))
    x = nhwc.permute(0, 3, 1, 2) if permuted else nhwc
    dataset = TensorDataset(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    fingerprint(dataset, None, {})
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    conn.send({"gib": x.numel() / (1 << 30), "seconds": seconds, "rss_growth_mib": after - before})


def section_digest(gib: float) -> dict:
    out = {}
    for permuted in (False, True):
        parent, child = mp.get_context("spawn").Pipe()
        process = mp.get_context("spawn").Process(target=_digest_child, args=(child, gib, permuted))
        process.start()
        out["permuted" if permuted else "contiguous"] = parent.recv()
        process.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="*", default=["main-process", "digest"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"load_avg_start": os.getloadavg()}
    if "main-process" in args.sections:
        results["main-process"] = section_main_process(*((150, 32, 1) if args.quick else (1500, 96, 7)))
    if "digest" in args.sections:
        results["digest"] = section_digest(0.05 if args.quick else 3.0)
    results["load_avg_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
