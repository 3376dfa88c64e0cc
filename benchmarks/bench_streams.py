#!/usr/bin/env python
"""The fit on a WebDataset stream against a plain DataLoader pass over the same stream (issue 13).

::

    python benchmarks/bench_streams.py            # the full run (~3 min on 2 cores)
    python benchmarks/bench_streams.py --quick    # small shards, one round; a smoke check

Each workload is one WebDataset pipeline over tar shards written to a temp folder; its samples are
what a user's pipeline yields (float tensors in [0, 1]). The **plain pass** iterates
``DataLoader(stream, batch_size=B, num_workers=W)`` (default collate: one stacked tensor a batch) and
does nothing with the batches; the **fit** is ``FitNormalize(cache=None).fit(stream, num_workers=W)``, which batches in
its workers with the batch size it picks from the first image (``B`` is that same size). Rounds are
interleaved (the order of the two alternates each round); the ratio is the median of per-round
ratios. CPU seconds (this process and its reaped workers) are reported beside the wall time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from torchnormfit import FitNormalize  # noqa: E402
from torchnormfit.passes import default_batch_size, first_images  # noqa: E402


def write_shards(folder: Path, kind: str, n: int, size: int, shards: int) -> str:
    """``n`` images, JPEG (quality 90, smooth noise) or float32 npy, over ``shards`` tars; the brace pattern."""
    rng = np.random.default_rng(0)
    per_shard = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{kind}-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                if kind == "jpg":
                    buffer = io.BytesIO()
                    picture = PIL.Image.fromarray(pixels).resize((size * 4, size * 4), PIL.Image.BILINEAR)
                    picture.crop((0, 0, size, size)).save(buffer, format="JPEG", quality=90)
                    sink.write({"__key__": f"{i:08d}", "jpg": buffer.getvalue(), "cls": i % 10})
                else:
                    sink.write({"__key__": f"{i:08d}", "npy": pixels.transpose(2, 0, 1).astype(np.float32) / 255})
    return str(folder / f"{kind}-{{000000..{shards - 1:06d}}}.tar")


def stream(pattern: str, kind: str) -> wds.WebDataset:
    dataset = wds.WebDataset(pattern, shardshuffle=False, empty_check=False)
    if kind == "jpg":
        return dataset.decode("torchrgb").to_tuple("jpg")
    return dataset.decode().to_tuple("npy").map_tuple(torch.from_numpy)


def plain_pass(dataset: Any, batch_size: int, workers: int) -> int:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)  # default collate: stacked images
    return sum(len(images) for (images,) in loader)


def fit_pass(dataset: Any, workers: int) -> int:
    return FitNormalize(cache=None).fit(dataset, num_workers=workers, progress=False).num_samples


def measure(run: Callable[[], int]) -> dict[str, float]:
    cpu = _cpu_seconds()
    start = time.perf_counter()
    count = run()
    return {"wall": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu, "samples": count}


def _cpu_seconds() -> float:
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def run_workload(name: str, dataset: Any, rounds: int, workers: int) -> dict[str, Any]:
    batch_size = default_batch_size(first_images(dataset, 1)[0], None, workers)
    methods = {"plain pass": lambda: plain_pass(dataset, batch_size, workers),
               "fit": lambda: fit_pass(dataset, workers)}
    times: dict[str, list[dict[str, float]]] = {method: [] for method in methods}
    for r in range(rounds):
        for method in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            times[method].append(measure(methods[method]))
    samples = {t["samples"] for ts in times.values() for t in ts}
    assert len(samples) == 1, f"{name}: the passes read different numbers of samples: {samples}"
    ratios = [f["wall"] / p["wall"] for f, p in zip(times["fit"], times["plain pass"])]
    cpu_ratios = [f["cpu"] / p["cpu"] for f, p in zip(times["fit"], times["plain pass"])]
    return {
        "workload": name, "samples": samples.pop(), "batch_size": batch_size, "num_workers": workers,
        "plain_s": statistics.median(t["wall"] for t in times["plain pass"]),
        "fit_s": statistics.median(t["wall"] for t in times["fit"]),
        "ratio": statistics.median(ratios), "ratios": ratios, "cpu_ratio": statistics.median(cpu_ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shards, one round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rounds, scale = (1, 0.05) if args.quick else (args.rounds, 1.0)
    workloads = [("jpg", "JPEG 224x224, decode('torchrgb')", 2000, 224), ("npy", "float32 npy 3x32x32", 30000, 32)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name, n, size in workloads:
            pattern = write_shards(Path(tmp), kind, max(16, int(n * scale)), size, shards=8)
            rows.append(run_workload(name, stream(pattern, kind), rounds, args.workers))
    load = os.getloadavg()
    print(f"rounds {rounds}, num_workers {args.workers}, load average at the end {load[0]:.2f}, "
          f"torch {torch.__version__}")
    print("| workload | samples | batch_size | plain pass s | fit s | fit / plain (median of rounds) | cpu ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['workload']} | {row['samples']} | {row['batch_size']} | {row['plain_s']:.2f} "
              f"| {row['fit_s']:.2f} | {row['ratio']:.3f} | {row['cpu_ratio']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
