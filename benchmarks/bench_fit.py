#!/usr/bin/env python
"""torchnormfit performance benchmark: the fit pass against the data-loading floor and the common recipes.

One command measures, in one run and on the same data, everything issue 4 asks for::

    python benchmarks/bench_fit.py            # the full run (~30-40 min on 2 cores)
    python benchmarks/bench_fit.py --quick    # small sizes, one round (~1 min); a smoke check

Sections (``--sections``, default all):

``fit``
    Workloads x methods. Every measurement runs in a fresh process forked from this one
    (so its peak RSS is its own), rounds are interleaved and the method order rotates each
    round; ratios to the floor are taken per round, then the median.
``hit``
    What a cache hit costs, part by part, in fresh processes.
``accumulator``
    ``batch_stats`` alone on resident batches against ``x.sum()`` (1 and 2 threads), for the
    library's version, its version before issue 14 and two lower bounds (``accumulator_variants.py``).
``rss``
    Peak RSS of a fit when the dataset grows 10x.
``defaults``
    A ``batch_size`` x ``num_workers`` sweep of the fit, against the library defaults.
``ranks``
    The FakeData fit on 1 and 2 ``torch.distributed`` (gloo) ranks.

How the floor and the fit see the same pipeline: each workload is one dataset object whose
samples are what a user's pipeline yields (float tensors in [0, 1], built per sample in the
DataLoader workers). The floor iterates a plain ``DataLoader`` over it with the same
``batch_size`` and ``num_workers`` the fit uses (the library defaults) and does nothing with
the batches; mixed-size images use a list collate, since the default collate cannot stack them.
``FitNormalize(cache=None).fit(dataset)`` runs over the same dataset with the same settings.
The recipes iterate the floor's loader and compute in the main process, as they are written
on forums. The "uint8 batches" workload holds the same 50,000 uint8 images as "uint8" but each
item is a whole batch of 64 converted at once (batch-level conversion, ``batch_size=1``), so the
loading is as cheap as it gets and the statistics' cost shows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import FakeData, ImageFolder
from torchvision.transforms import ToTensor

import torchnormfit
from torchnormfit import FitNormalize
from torchnormfit.passes import loader as passes_loader

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "tests"):  # tests/reference.py: the float64 truth the tests use too
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import accumulator_variants as variants  # noqa: E402
from reference import truth  # noqa: E402

_THREADS = torch.get_num_threads()  # the children get the default back (see _fork)
READS = [0]  # samples read through __getitem__ in this process (the cache hit must read none)

ITEM_IMAGES = 64  # images per item of the "uint8 batches" workload


def default_workers() -> int:
    fn = getattr(passes_loader, "default_num_workers", None)
    return fn() if fn is not None else min(8, len(os.sched_getaffinity(0)))


# --- datasets --------------------------------------------------------------------------------

class UInt8Images(Dataset):
    """An in-memory uint8 set like CIFAR-10; each sample converted to float in [0, 1] when read."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
        for start in range(0, n, 4096):  # in chunks: little temporary memory
            k = min(n, start + 4096) - start
            # Not uniform noise: a per-image brightness and contrast, like photos.
            base = torch.randint(40, 200, (k, 1, 1, 1), generator=g, dtype=torch.int16)
            spread = torch.randint(10, 60, (k, 1, 1, 1), generator=g, dtype=torch.int16)
            noise = torch.randint(-128, 128, (k, 3, 32, 32), generator=g, dtype=torch.int16)
            self.images[start : start + k] = (base + noise * spread // 128).clamp_(0, 255)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        READS[0] += 1
        return self.images[index].float().div_(255)


class UInt8Batches(Dataset):
    """The same images as :class:`UInt8Images`, one item per batch of ``per_item``, converted at once."""

    def __init__(self, n: int, per_item: int = 64, seed: int = 0):
        self.images = UInt8Images(n, seed).images
        self.per_item = per_item

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.per_item)

    def __getitem__(self, index: int) -> torch.Tensor:
        READS[0] += 1
        return self.images[index * self.per_item : (index + 1) * self.per_item].float().div_(255)


class CountingFakeData(FakeData):
    """torchvision ``FakeData`` that counts the samples read in this process."""

    def __getitem__(self, index):
        READS[0] += 1
        return super().__getitem__(index)


class CountingImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that counts the samples read in this process."""

    def __getitem__(self, index):
        READS[0] += 1
        return super().__getitem__(index)


def write_image_folder(root: Path, n: int, sizes: tuple[int, int], seed: int = 0) -> dict[str, Any]:
    """``n`` RGB images of mixed sizes, half PNG and half JPEG, in 4 class folders; returns a summary."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = 0
    for i in range(n):
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            img.save(folder / f"{i:05d}.jpg", quality=90)
        else:
            img.save(folder / f"{i:05d}.png")
        pixels += h * w
    return {"files": n, "pixels_per_image": pixels / n}


def _list_collate(batch):
    return batch


def images_of(batch: Any, mixed: bool) -> Any:
    """The image tensor (or list of image tensors) of a loader batch."""
    if mixed:
        return [sample[0] if isinstance(sample, (tuple, list)) else sample for sample in batch]
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# --- workloads -------------------------------------------------------------------------------

def workload_specs(args) -> dict[str, dict[str, Any]]:
    s = args.scale
    if args.quick:
        n_u8, n_fake, n_folder, fake_px, folder_sizes = 5_000, 64, 96, 224, (48, 200)
    else:
        n_u8, n_fake, n_folder, fake_px, folder_sizes = 50_000, 2_000, 3_000, 224, (64, 400)
    specs = {
        "uint8": {"kind": "uint8", "n": max(256, int(n_u8 * s))},
        "uint8 batches": {"kind": "uint8_batches", "n": max(256, int(n_u8 * s))},
        "FakeData": {"kind": "fakedata", "n": max(16, int(n_fake * s)), "px": fake_px},
        "ImageFolder": {"kind": "folder", "n": max(16, int(n_folder * s)), "sizes": folder_sizes},
    }
    return {k: v for k, v in specs.items() if k in args.workloads}


def build(spec: dict[str, Any]) -> tuple[Dataset, bool, int | None]:
    """``(dataset, mixed_sizes, batch_size)`` for a workload spec; ``None``: the library's default."""
    kind = spec["kind"]
    if kind == "uint8":
        return UInt8Images(spec["n"]), False, None
    if kind == "uint8_batches":
        return UInt8Batches(spec["n"], per_item=ITEM_IMAGES), False, 1
    if kind == "fakedata":
        px = spec["px"]
        return CountingFakeData(size=spec["n"], image_size=(3, px, px), transform=ToTensor()), False, None
    if kind == "folder":
        return CountingImageFolder(spec["root"], transform=ToTensor()), True, None
    raise ValueError(kind)


# --- what a child process measures -----------------------------------------------------------

def _rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM, ru_maxrss) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _cpu_s() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _loader(ds: Dataset, mixed: bool, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_list_collate if mixed else None)


def _recipe_floor(ds, mixed, bs, nw):
    batches = 0
    for _ in _loader(ds, mixed, bs, nw):
        batches += 1
    return None, None


def _recipe_bn(ds, mixed, bs, nw):
    bn = torch.nn.BatchNorm2d(3, momentum=0.1)
    bn.train()
    with torch.no_grad():
        for batch in _loader(ds, mixed, bs, nw):
            x = images_of(batch, mixed)
            if mixed:
                for im in x:
                    bn(im[None])
            else:
                bn(x.reshape(-1, *x.shape[-3:]))
    return bn.running_mean.double(), bn.running_var.double().sqrt()


def _recipe_forum(ds, mixed, bs, nw):
    mean = torch.zeros(3, dtype=torch.float64)
    std = torch.zeros(3, dtype=torch.float64)
    k = 0
    for batch in _loader(ds, mixed, bs, nw):
        x = images_of(batch, mixed)
        parts = x if mixed else [x.reshape(-1, *x.shape[-3:])]
        for part in parts:
            dims = (1, 2) if mixed else (0, 2, 3)
            mean += part.mean(dims).double()
            std += part.std(dims).double()
            k += 1
    return mean / k, std / k


def _recipe_stack(ds, mixed, bs, nw):
    parts = []
    for batch in _loader(ds, mixed, bs, nw):
        x = images_of(batch, mixed)
        if mixed:
            parts.extend(im.reshape(im.shape[0], -1) for im in x)
        else:
            parts.append(x.reshape(-1, *x.shape[-3:]))
    if mixed:
        everything = torch.cat(parts, dim=1)
        del parts
        std, mean = torch.std_mean(everything, dim=1)
    else:
        everything = torch.cat(parts)
        del parts
        std, mean = torch.std_mean(everything, dim=(0, 2, 3))
    return mean.double(), std.double()


def _fit(ds, mixed, bs, nw, cache=None):
    norm = FitNormalize(cache=cache).fit(ds, batch_size=bs, num_workers=nw, progress=False)
    return torch.tensor(norm.mean, dtype=torch.float64), torch.tensor(norm.std, dtype=torch.float64)


def _fit_previous(ds, mixed, bs, nw):
    """The fit with the library's batch_stats from before issue 14 (in this forked process and its workers)."""
    passes_loader.batch_stats = variants.previous
    return _fit(ds, mixed, bs, nw)


METHODS: dict[str, Callable | None] = {
    "floor": _recipe_floor,
    "fit": _fit,
    "fit[previous batch_stats]": _fit_previous,
    "BatchNorm2d(0.1)": _recipe_bn,
    "forum mean/std": _recipe_forum,
    "stack+std_mean": _recipe_stack,
    "cache hit": None,  # special: see _measure_method
}
DEFAULT_METHODS = [m for m in METHODS if not m.startswith("fit[")]
METHOD_NOTES = {
    "floor": "plain DataLoader pass, no statistics",
    "fit": "FitNormalize(cache=None).fit, the library as checked out",
    "fit[previous batch_stats]": "the same fit with accumulator_variants.previous (the library's batch_stats before issue 14)",
    "BatchNorm2d(0.1)": "BatchNorm2d(momentum=0.1) forward loop (train mode, no_grad)",
    "forum mean/std": "per-batch mean and std over (0,2,3), averaged over batches (per image when sizes differ)",
    "stack+std_mean": "all images stacked in memory, then torch.std_mean",
    "cache hit": "FitNormalize(cache=file).fit with the entry already there",
}


def library_batch_size(ds: Dataset, num_workers: int) -> int:
    """The batch size the fit picks for ``ds`` when given none (from its first image and length)."""
    sample = ds[0]
    image = sample[0] if isinstance(sample, (tuple, list)) else sample
    return passes_loader.default_batch_size(image, len(ds), num_workers)


def _measure_method(method: str, spec: dict[str, Any], batch_size: int | None = None,
                    num_workers: int | None = None, cache: str | None = None) -> dict[str, Any]:
    ds, mixed, bs = build(spec)
    bs = bs if batch_size is None else batch_size
    nw = default_workers() if num_workers is None else num_workers
    if bs is None and method not in ("fit", "populate", "cache hit"):
        bs = library_batch_size(ds, nw)  # the floor and the recipes load what the fit loads
    _reset_peak_rss()  # the peak counts from here: not the building of the dataset
    base_rss = _rss_now_mib()
    READS[0] = 0
    cpu0, t0 = _cpu_s(), time.perf_counter()
    if method == "cache hit":  # verify=0: a hit that reads no sample (bench_verify.py times verified hits)
        norm = FitNormalize(cache=cache).fit(ds, batch_size=bs, num_workers=nw, progress=False, verify=0)
        mean, std = torch.tensor(norm.mean, dtype=torch.float64), torch.tensor(norm.std, dtype=torch.float64)
    elif method == "populate":
        mean, std = _fit(ds, mixed, bs, nw, cache=cache)
    else:
        mean, std = METHODS[method](ds, mixed, bs, nw)
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    out = {
        "seconds": seconds, "cpu_s": cpu, "reads_in_main": READS[0], "base_rss_mib": base_rss, "batch_size": bs,
        "mean": None if mean is None else mean.tolist(), "std": None if std is None else std.tolist(),
    }
    return out


def _truth(spec: dict[str, Any]) -> dict[str, Any]:
    """Float64 two-pass statistics (tests/reference.py) of exactly the tensors the pipeline yields."""
    ds, mixed, bs = build(spec)
    loader = DataLoader(ds, batch_size=max(1, 64 // bs) if bs == 1 else 64, num_workers=default_workers(),
                        collate_fn=_list_collate)

    def images():
        for batch in loader:
            for sample in batch:
                yield sample[0] if isinstance(sample, (tuple, list)) else sample

    want = truth(images)
    return {"mean": want["mean"].tolist(), "std": want["std"].tolist(), "pixels": int(want["count"][0]),
            "min": want["min"].tolist(), "max": want["max"].tolist()}


def _rel_err(got: list[float] | None, want: list[float]) -> float | None:
    if got is None:
        return None
    g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    return float(((g - w).abs() / w.abs()).max())


# --- running children ------------------------------------------------------------------------

def _child_main(conn, fn, args, kwargs):
    try:
        torch.set_num_threads(_THREADS)
        result = fn(*args, **kwargs)
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        if isinstance(result, dict):
            result.setdefault("peak_rss_mib", me.ru_maxrss / 1024)
            result.setdefault("workers_peak_rss_mib", kids.ru_maxrss / 1024)
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - report anything, the parent decides
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _fork(fn: Callable, *args, timeout: float = 1800, start: str = "fork", **kwargs) -> dict[str, Any]:
    """Run ``fn`` in a fresh process, forked (or a new interpreter: ``start="spawn"``); return its
    result, or ``{"error": ...}``.

    This process never runs a multi-threaded torch kernel (its thread count is 1), so forking
    is safe; the child gets the default thread count back.
    """
    ctx = mp.get_context(start)
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child_end, fn, args, kwargs))
    proc.start()
    child_end.close()
    status, payload = "error", f"no result within {timeout:.0f} s"
    if parent_end.poll(timeout):
        try:
            status, payload = parent_end.recv()
        except EOFError:
            payload = "the child died without a result"
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if status != "ok":
        return {"error": payload}
    return payload


def _log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- section: workloads x methods ------------------------------------------------------------

def section_fit(args, specs, tmp: Path, results: dict[str, Any]) -> None:
    methods = [m for m in METHODS if m in args.methods]
    truths: dict[str, Any] = {}
    caches: dict[str, str] = {}
    for name, spec in specs.items():
        _log(f"[fit] truth for {name} ...")
        truths[name] = _fork(_truth, spec)
        if "cache hit" in methods:
            caches[name] = str(tmp / f"cache-{spec['kind']}.h5")
            populated = _fork(_measure_method, "populate", spec, cache=caches[name])
            if "error" in populated:
                _log(populated["error"])
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    mem_avail = _mem_available_mib()
    recipes = {"BatchNorm2d(0.1)", "forum mean/std", "stack+std_mean"}
    recipe_rounds = max(1, min(args.rounds, 2, args.rounds // 2))  # the slow recipes need no more to show where they stand
    for r in range(args.rounds):
        for name, spec in specs.items():
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for method in order:
                if method in recipes and r >= recipe_rounds:
                    continue
                if method == "stack+std_mean" and _stack_bytes(spec, truths[name]) / 2**20 > 0.4 * mem_avail:
                    runs.setdefault((name, method), []).append({"error": "skipped: would not fit in memory"})
                    continue
                res = _fork(_measure_method, method, spec, cache=caches.get(name))
                res["round"] = r
                runs.setdefault((name, method), []).append(res)
                _log(f"[fit] round {r + 1}/{args.rounds} {name:13s} {method:16s} "
                     + (f"{res['seconds']:8.3f} s" if "seconds" in res else res["error"].strip().splitlines()[-1]))
    table = []
    for name in specs:
        truth = truths[name]
        floor = {run["round"]: run for run in runs.get((name, "floor"), []) if "seconds" in run}
        for method in methods:
            good = [run for run in runs.get((name, method), []) if "seconds" in run]
            row: dict[str, Any] = {"workload": name, "method": method}
            if not good:
                errs = [run.get("error", "") for run in runs.get((name, method), [])]
                row["error"] = (errs[0].strip().splitlines() or ["?"])[-1] if errs else "not run"
                table.append(row)
                continue
            ratios = [g["seconds"] / floor[g["round"]]["seconds"] for g in good if g["round"] in floor]
            cpu_ratios = [g["cpu_s"] / floor[g["round"]]["cpu_s"] for g in good if g["round"] in floor]
            row.update(
                seconds=statistics.median(g["seconds"] for g in good),
                ratio=statistics.median(ratios) if ratios else None,
                cpu_ratio=statistics.median(cpu_ratios) if cpu_ratios else None,
                peak_rss_mib=max(g["peak_rss_mib"] for g in good),
                base_rss_mib=statistics.median(g["base_rss_mib"] for g in good),
                workers_peak_rss_mib=max(g["workers_peak_rss_mib"] for g in good),
                runs=len(good),
                reads_in_main=max(g["reads_in_main"] for g in good),
                batch_size=good[0].get("batch_size"),
            )
            if "error" not in truth:
                row["mean_err"] = _rel_err(good[0]["mean"], truth["mean"])
                row["std_err"] = _rel_err(good[0]["std"], truth["std"])
            table.append(row)
    results["fit"] = {"table": table, "truth": truths, "specs": specs}


def _mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _stack_bytes(spec: dict[str, Any], truth: dict[str, Any]) -> float:
    pixels = truth.get("pixels", 0) if isinstance(truth, dict) else 0
    return pixels * 3 * 4 * 2.2  # the batches, the concatenation, and slack


# --- section: what a cache hit costs -------------------------------------------------------

def _populate(spec: dict[str, Any], cache: str) -> dict[str, Any]:
    ds, _, bs = build(spec)
    norm = FitNormalize(cache=cache).fit(ds, batch_size=bs, num_workers=default_workers(), progress=False)
    return {"key": norm.cache_key}


def _hit_parts(spec: dict[str, Any], cache: str, key: str) -> dict[str, Any]:
    """In a fresh interpreter: a whole ``fit()`` that hits, then its parts again: the key, two reads."""
    from torchnormfit.cache import read_entry
    from torchnormfit.key import fingerprint

    ds, _, bs = build(spec)
    clock = time.perf_counter
    t0 = clock()
    norm = FitNormalize(cache=cache).fit(ds, batch_size=bs, num_workers=default_workers(), progress=False,
                                         verify=0)
    t1 = clock()
    if norm.cache_key != key:
        raise RuntimeError(f"the hit used {norm.cache_key!r}, not the entry {key!r} just written")
    fingerprint(ds, FitNormalize(cache=None), {})  # what fit() computes first (the settings cost nothing)
    t2 = clock()
    read_entry(cache, key)
    t3 = clock()
    read_entry(cache, key)
    t4 = clock()
    return {"hit_ms": (t1 - t0) * 1e3, "key_ms": (t2 - t1) * 1e3, "read_ms": (t3 - t2) * 1e3,
            "read_again_ms": (t4 - t3) * 1e3, "reads_in_main": READS[0]}


def section_hit(args, specs, tmp: Path, results: dict[str, Any]) -> None:
    rows = []
    for name, spec in specs.items():
        cache = str(tmp / f"hit-{spec['kind']}.h5")
        # A new interpreter (spawn), as in a user's next run: in a fork of this process the first touches
        # of shared pages cost copy-on-write faults (~10 ms more). It writes the entry too: the key
        # names the dataset class by its module, which is __mp_main__ there.
        populated = _fork(_populate, spec, cache, start="spawn")
        if "error" in populated:
            _log(populated["error"])
            continue
        runs = [_fork(_hit_parts, spec, cache, populated["key"], start="spawn") for _ in range(1 if args.quick else 5)]
        good = [r for r in runs if "error" not in r]
        _log(f"[hit] {name}: " + (f"{len(good)} runs" if good else runs[0]["error"].strip().splitlines()[-1]))
        if good:
            rows.append({"workload": name, **{k: statistics.median(r[k] for r in good) for k in good[0]}})
    results["hit"] = rows


# --- section: accumulator alone --------------------------------------------------------------

def _accumulator_child(rounds: int) -> dict[str, Any]:
    exact = variants.check_exactness(variants.VARIANTS)
    worst: dict[str, dict[str, Any]] = {}
    for name, case, me, se, ok in exact:
        w = worst.setdefault(name, {"err": 0.0, "exact": True, "worst_case": ""})
        if max(me, se) > w["err"]:
            w.update(err=max(me, se), worst_case=case)
        w["exact"] &= ok
    speed = variants.speed_table(threads=(1, 2), rounds=rounds)
    return {"speed": speed, "exactness": worst, "cases": [row for row in exact]}


def section_accumulator(args, results: dict[str, Any]) -> None:
    _log("[accumulator] exactness and speed ...")
    results["accumulator"] = _fork(_accumulator_child, 3 if args.quick else 21)


# --- section: RSS growth ---------------------------------------------------------------------

def section_rss(args, results: dict[str, Any]) -> None:
    """Peak RSS of the fit at n and 10n images, with a fixed batch size and with the default.

    The default batch size grows with the dataset until it holds 64 MiB of images (or 256), so
    the default rows start where it has reached that cap for 224 px images (16 batches per worker).
    """
    n0 = max(16, int((24 if args.quick else 300) * args.scale))
    px = 64 if args.quick else 224
    n_u8 = max(256, int((500 if args.quick else 5_000) * args.scale))
    plan = [("fakedata", n0, 64), ("fakedata", 10 * n0, 64), ("fakedata", 10 * n0, None), ("fakedata", 100 * n0, None),
            ("uint8", n_u8, None), ("uint8", 10 * n_u8, None)]
    rows = []
    for kind, n, bs in plan:
        spec = {"kind": kind, "n": n, "px": px}
        _log(f"[rss] fit on {kind} n={n} batch_size={bs or 'auto'} ...")
        res = _fork(_measure_method, "fit", spec, batch_size=bs)
        res.update(kind=kind, n=n, fixed_batch_size=bs)
        rows.append(res)
    results["rss"] = rows


# --- section: defaults sweep -----------------------------------------------------------------

def section_defaults(args, specs, results: dict[str, Any]) -> None:
    """``None`` batch size = the library's choice (``default_batch_size`` of the first image)."""
    d_nw = default_workers()
    default = (None, d_nw)
    if args.quick:
        configs = [default, (64, d_nw)]
        names = [n for n in specs if n in ("uint8",)] or list(specs)[:1]
        rounds = 1
    else:
        configs = [default] + [(b, d_nw) for b in (16, 32, 64, 128, 256)] + [
            (None, w) for w in sorted({0, 1, 2, 3, 4}) if w != d_nw]
        names = [n for n in specs if n != "uint8 batches"]
        rounds = args.rounds  # a sweep point differs from the next by a few percent: as many rounds as the fit section
    label = {c: f"{'auto' if c[0] is None else c[0]}x{c[1]}" for c in configs}
    table = []
    for name in names:
        spec = dict(specs[name])
        if spec["kind"] == "fakedata" and not args.quick:
            spec["n"] = max(16, spec["n"] // 2)  # half the images: the sweep has many points
        times: dict[tuple[int | None, int], list[float]] = {c: [] for c in configs}
        for r in range(rounds):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for bs, nw in order:
                res = _fork(_measure_method, "fit", spec, batch_size=bs, num_workers=nw)
                if "seconds" in res:
                    times[(bs, nw)].append(res["seconds"])
                _log(f"[defaults] {name} {label[(bs, nw)]}: "
                     + (f"{res['seconds']:.3f} s" if "seconds" in res else res["error"].strip().splitlines()[-1]))
        med = {c: statistics.median(v) for c, v in times.items() if v}
        if not med:
            continue
        best = min(med, key=med.get)
        table.append({
            "workload": name, "n": spec["n"], "times": {label[c]: t for c, t in med.items()},
            "best": f"batch_size={label[best].split('x')[0]}, num_workers={best[1]}", "best_s": med[best],
            "default_s": med.get(default), "default_over_best": med.get(default, float("nan")) / med[best],
        })
    results["defaults"] = {"table": table, "default": f"batch_size=auto (64 MiB of images, >= 16 batches per worker), num_workers={d_nw}"}


# --- section: ranks --------------------------------------------------------------------------

def _rank_main(rank: int, world: int, n: int, px: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    # mp.spawn leaves "spawn" as this process's start method, so DataLoader workers would each
    # re-import torch (seconds per worker, per pass). torchrun-launched ranks fork them; do the same.
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(max(1, _THREADS // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = CountingFakeData(size=n, image_size=(3, px, px), transform=ToTensor())
        dist.barrier()
        t0 = time.perf_counter()
        norm = FitNormalize(cache=None).fit(ds, progress=False)
        dist.barrier()
        seconds = time.perf_counter() - t0
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"seconds": seconds, "mean": norm.mean, "std": norm.std, "reads": READS[0]}, f)
    finally:
        dist.destroy_process_group()


def _ranks_child(world: int, n: int, px: int, tmp: str) -> dict[str, Any]:
    import torch.multiprocessing as tmp_mp

    out_dir = tempfile.mkdtemp(dir=tmp)
    init_file = os.path.join(out_dir, "init")
    tmp_mp.spawn(_rank_main, args=(world, n, px, init_file, out_dir), nprocs=world, join=True)
    ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
    return {"seconds": max(r["seconds"] for r in ranks), "mean": ranks[0]["mean"], "std": ranks[0]["std"],
            "same_on_all_ranks": all(r["mean"] == ranks[0]["mean"] and r["std"] == ranks[0]["std"] for r in ranks),
            "reads": [r["reads"] for r in ranks]}


def section_ranks(args, specs, tmp: Path, results: dict[str, Any]) -> None:
    spec = specs.get("FakeData") or {"n": max(16, int(96 * args.scale)), "px": 224}
    n, px = spec["n"], spec.get("px", 224)
    rounds = 1 if args.quick else 3
    times: dict[int, list[float]] = {1: [], 2: []}
    last: dict[int, dict[str, Any]] = {}
    for r in range(rounds):
        for world in ((1, 2) if r % 2 == 0 else (2, 1)):
            _log(f"[ranks] {world} rank(s), FakeData n={n} ...")
            res = _fork(_ranks_child, world, n, px, str(tmp))
            if "seconds" in res:
                times[world].append(res["seconds"])
                last[world] = res
            else:
                _log(res["error"])
    out: dict[str, Any] = {"n": n, "px": px, "times": times}
    if times[1] and times[2]:
        out["ratio_2_over_1"] = statistics.median(times[2]) / statistics.median(times[1])
        a, b = last[1], last[2]
        out["max_rel_diff_1_vs_2"] = max(_rel_err(b["mean"], a["mean"]), _rel_err(b["std"], a["std"]))
        out["same_on_all_ranks"] = b["same_on_all_ranks"]
    results["ranks"] = out


# --- report ----------------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".2f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return none
    return format(v, spec)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "torchnormfit"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        rev += " (+ uncommitted changes in torchnormfit/)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__, "torchnormfit": getattr(torchnormfit, "__version__", "?"),
        "git": rev, "torch_threads": _THREADS,
        "default_num_workers": default_workers(),
    }


def _fastest_fit(results: dict[str, Any]) -> dict[str, Any] | None:
    """The fit-table row of the library's fastest fit (the cache-hit targets compare with it)."""
    fits = [r for r in (results.get("fit") or {}).get("table", []) if r["method"] == "fit" and "seconds" in r]
    return min(fits, key=lambda r: r["seconds"]) if fits else None


def _hit_target(where: str, fastest: dict[str, Any], hit_ms: float, reads: float) -> tuple[str, bool, str]:
    speedup = fastest["seconds"] * 1e3 / hit_ms
    return (f"cache hit {where} >= 100x faster than the fastest fit ({fastest['workload']})",
            speedup >= 100 and reads == 0,
            f"{fastest['seconds']:.3f} s / {hit_ms:.1f} ms = {speedup:.0f}x; samples read by the hit: {reads:.0f}")


def report(results: dict[str, Any]) -> tuple[str, list[tuple[str, bool | None, str]]]:
    lines: list[str] = []
    targets: list[tuple[str, bool | None, str]] = []
    m = results["machine"]
    lines.append(f"# torchnormfit benchmark ({'quick' if results['args']['quick'] else 'full'} run)")
    lines.append("")
    lines.append(f"- command: `{results['command']}`")
    lines.append(f"- date: {m['date']}; git {m['git']}")
    lines.append(f"- machine: {m['cpus']} CPUs ({m['cpu']}), {m['mem_gib']} GiB; Python {m['python']}, torch {m['torch']}, "
                 f"torchvision {m['torchvision']}, torchnormfit {m['torchnormfit']}; {m['torch_threads']} torch threads")
    la = results["load"]
    lines.append(f"- load average (1/5/15 min) at start {la['start']}, at end {la['end']}; "
                 f"wall time of the run {results['wall_s'] / 60:.1f} min")
    floors = [r for r in (results.get("fit") or {}).get("table", []) if r["method"] == "floor" and "batch_size" in r]
    sizes = ", ".join(f"{r['workload']} {r['batch_size']}" for r in floors)
    lines.append(f"- loader settings everywhere: the library defaults, num_workers={m['default_num_workers']} and the "
                 f"batch_size it picks from the first image ({sizes or 'see the table'}; on 'uint8 batches' one item "
                 f"holds {ITEM_IMAGES} images and batch_size=1)")
    lines.append("")

    fit = results.get("fit")
    if fit:
        lines.append("## Fit pass vs. floor and recipes")
        lines.append("")
        lines.append("Wall time: median over rounds; ratio: median of per-round ratios to the floor of the same round; "
                     "cpu: the same for CPU seconds (main process + DataLoader workers), steadier under load. "
                     "RSS: peak of the measuring process (forked from the benchmark, so it starts at the 'base' "
                     "shown, which holds torch and the dataset), and the peak of any one DataLoader worker. "
                     "Errors: max over channels of |x - truth| / truth, truth = float64 two-pass over the same tensors.")
        lines.append("")
        lines.append("| workload | method | time s | x floor | cpu x floor | peak RSS MiB (base) | worker RSS MiB | mean rel err | std rel err |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in fit["table"]:
            if "error" in row:
                lines.append(f"| {row['workload']} | {row['method']} | {row['error']} | | | | | | |")
                continue
            lines.append(
                f"| {row['workload']} | {row['method']} | {row['seconds']:.3f} | {_fmt(row.get('ratio'), '.3f')} | "
                f"{_fmt(row.get('cpu_ratio'), '.2f')} | {row['peak_rss_mib']:.0f} ({row['base_rss_mib']:.0f}) | "
                f"{row['workers_peak_rss_mib']:.0f} | {_fmt(row.get('mean_err'), '.1e')} | {_fmt(row.get('std_err'), '.1e')} |")
        lines.append("")
        sizes = []
        for name, spec in fit["specs"].items():
            t = fit["truth"].get(name, {})
            desc = {"uint8": "3x32x32 uint8 in memory, x[i].float()/255 per sample",
                    "uint8_batches": "same images, one item = 64 images converted at once",
                    "fakedata": f"torchvision FakeData 3x{spec.get('px')}x{spec.get('px')} through ToTensor",
                    "folder": f"ImageFolder, half PNG half JPEG, sides {spec.get('sizes')} px, ToTensor"}[spec["kind"]]
            sizes.append(f"{name}: {spec['n']:,} images ({desc}); {t.get('pixels', 0) / 1e6:.1f} M pixels per channel")
        lines.append("Workloads: " + "; ".join(sizes) + ".")
        lines.append("")
        by = {(r["workload"], r["method"]): r for r in fit["table"]}
        for name, limit in (("FakeData", 1.05), ("ImageFolder", 1.05), ("uint8", 1.5), ("uint8 batches", 1.5)):
            r = by.get((name, "fit"))
            if r and r.get("ratio") is not None:
                note = f"fit {r['ratio']:.3f}x floor (cpu {r['cpu_ratio']:.2f}x)"
                targets.append((f"fit <= {limit}x floor on {name}", r["ratio"] <= limit, note))
        exact_limit = 1e-6
        for name in fit["specs"]:
            fr = by.get((name, "fit"))
            if not fr or fr.get("ratio") is None:
                continue
            for method in ("BatchNorm2d(0.1)", "forum mean/std", "stack+std_mean"):
                rr = by.get((name, method))
                if not rr or rr.get("ratio") is None:
                    continue
                less_exact = max(rr.get("std_err") or 0, rr.get("mean_err") or 0) > max(fr.get("std_err") or 0, fr.get("mean_err") or 0)
                if less_exact:
                    targets.append((f"fit faster than {method} on {name}", fr["seconds"] < rr["seconds"],
                                    f"{fr['ratio']:.3f}x vs {rr['ratio']:.3f}x floor; its std error {_fmt(rr.get('std_err'), '.1e')}"))
            exact = (fr.get("std_err") or 1) <= exact_limit and (fr.get("mean_err") or 1) <= exact_limit
            targets.append((f"fit exact (<= 1e-6) on {name}", exact,
                            f"mean {_fmt(fr.get('mean_err'), '.1e')}, std {_fmt(fr.get('std_err'), '.1e')}"))
        fastest = _fastest_fit(results)
        hit = by.get((fastest["workload"], "cache hit")) if fastest else None
        if hit and "seconds" in hit:
            targets.append(_hit_target("in a fork of the benchmark", fastest, hit["seconds"] * 1e3, hit["reads_in_main"]))

    hit = results.get("hit")
    if hit:
        lines.append("## What a cache hit costs")
        lines.append("")
        lines.append("Each in a new interpreter (`spawn`, as in a user's next run; median of 5): a whole `fit()` that "
                     "hits, then its parts again: the cache key (fingerprint) and two validated reads of the entry "
                     "(`cache.read_entry`). The 'cache hit' rows above are measured in forks of the benchmark, where "
                     "the first touches of shared pages cost copy-on-write faults.")
        lines.append("")
        lines.append("| workload | whole hit ms | key ms | read ms | read again ms | samples read |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for row in hit:
            lines.append(f"| {row['workload']} | {row['hit_ms']:.1f} | {row['key_ms']:.1f} | {row['read_ms']:.1f} | "
                         f"{row['read_again_ms']:.1f} | {row['reads_in_main']:.0f} |")
        lines.append("")
        fastest = _fastest_fit(results)
        row = next((row for row in hit if fastest and row["workload"] == fastest["workload"]), None)
        if row:
            targets.append(_hit_target("in a new interpreter", fastest, row["hit_ms"], row["reads_in_main"]))

    acc = results.get("accumulator")
    if acc:
        lines.append("## The accumulator alone")
        lines.append("")
        if "error" in acc:
            lines.append("failed: " + acc["error"].strip().splitlines()[-1])
        else:
            lines.append("`batch_stats(x)` on a resident float32 batch, as a ratio to `x.sum()` on the same tensor "
                         "(all variants of a batch and `x.sum()` alternate; per round the best of 7 calls each; median "
                         "over rounds). 'current' is `torchnormfit.accumulator.batch_stats` as checked out, 'previous' "
                         "the library's before issue 14; the floors are in `benchmarks/accumulator_variants.py`. "
                         "'uniform' is U(0, 1) (rows reduced uncentred), 'narrow' mean 0.5 std 0.05 (every row centred). "
                         "Worst error: max relative error of mean/std over the adversarial cases there (float64 "
                         "two-pass truth); exact: zero std on constant channels, min/max equal to the truth's.")
            lines.append("")
            lines.append("| batch | data | threads | current | previous | four_reductions | five_passes_only | x.sum() ms |")
            lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
            table: dict[tuple[str, str, int], dict[str, float]] = {}
            for shape, kind, t, name, ratio, _ms, sms in acc["speed"]:
                table.setdefault((shape, kind, t), {"sum_ms": sms})[name] = ratio
            for (shape, kind, t), r in table.items():
                cells = " | ".join(f"{r.get(name, float('nan')):.2f}"
                                   for name in ("current", "previous", "four_reductions", "five_passes_only"))
                lines.append(f"| {shape} | {kind} | {t} | {cells} | {r['sum_ms']:.3f} |")
                if kind == "uniform" and "current" in r:
                    limit = variants.TARGETS[shape]
                    targets.append((f"accumulator <= {limit:g}x x.sum() on {shape}, {t} thread(s)", r["current"] <= limit,
                                    f"{r['current']:.2f}x (four reductions {r.get('four_reductions', float('nan')):.2f}x)"))
            lines.append("")
            lines.append("Worst error over the adversarial cases: " + ", ".join(
                f"{name} {e['err']:.1e} ({'exact' if e['exact'] else 'NOT exact'})" for name, e in acc["exactness"].items()) + ".")
        lines.append("")

    rss = results.get("rss")
    if rss:
        lines.append("## Peak RSS when the dataset grows 10x")
        lines.append("")
        lines.append("| dataset | images | batch_size | time s | peak RSS MiB | base RSS MiB | peak - base MiB | worker peak RSS MiB |")
        lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
        for row in rss:
            bs = row.get("fixed_batch_size") or "auto"
            if "error" in row:
                lines.append(f"| {row['kind']} | {row['n']} | {bs} | failed | | | | |")
                continue
            lines.append(f"| {row['kind']} | {row['n']:,} | {bs} | {row['seconds']:.2f} | {row['peak_rss_mib']:.0f} | "
                         f"{row['base_rss_mib']:.0f} | {row['peak_rss_mib'] - row['base_rss_mib']:.0f} | "
                         f"{row['workers_peak_rss_mib']:.0f} |")
        lines.append("")
        ok = [r for r in rss if "error" not in r]
        for bs in (64, None):
            fake = [r for r in ok if r["kind"] == "fakedata" and r.get("fixed_batch_size") == bs]
            if len(fake) == 2:
                g_main = fake[1]["peak_rss_mib"] / fake[0]["peak_rss_mib"] - 1
                g_work = fake[1]["workers_peak_rss_mib"] / fake[0]["workers_peak_rss_mib"] - 1
                targets.append((f"peak RSS grows < 10% for 10x data (FakeData {fake[0]['n']:,} -> {fake[1]['n']:,}, "
                                f"batch_size={bs or 'auto'})", max(g_main, g_work) < 0.10,
                                f"main {g_main * 100:+.1f}%, workers {g_work * 100:+.1f}%"))
        u8 = [r for r in ok if r["kind"] == "uint8"]
        if len(u8) == 2:
            d0 = u8[0]["peak_rss_mib"] - u8[0]["base_rss_mib"]
            d1 = u8[1]["peak_rss_mib"] - u8[1]["base_rss_mib"]
            lines.append(f"On the in-memory uint8 set the data itself grows 10x ({u8[0]['base_rss_mib']:.0f} -> "
                         f"{u8[1]['base_rss_mib']:.0f} MiB base); what the pass adds on top: {d0:.0f} -> {d1:.0f} MiB.")
            lines.append("")

    d = results.get("defaults")
    if d:
        lines.append("## Defaults: batch_size x num_workers")
        lines.append("")
        lines.append(f"Library defaults: {d['default']}. Wall time (median) of `{d.get('method', 'fit')}`, seconds:")
        lines.append("")
        for row in d["table"]:
            cells = ", ".join(f"{k}: {v:.2f}" for k, v in row["times"].items())
            lines.append(f"- {row['workload']} ({row['n']:,} images): {cells} (batch_size x num_workers). Best {row['best']} "
                         f"({row['best_s']:.2f} s); default {_fmt(row['default_s'])} s = {row['default_over_best']:.2f}x best.")
            targets.append((f"defaults within 10% of the best on {row['workload']}", row["default_over_best"] <= 1.10,
                            f"{row['default_over_best']:.2f}x; best {row['best']}"))
        lines.append("")

    rk = results.get("ranks")
    if rk:
        lines.append("## 1 vs 2 torch.distributed ranks (gloo, spawn, file:// init), FakeData")
        lines.append("")
        if "ratio_2_over_1" in rk:
            t1, t2 = statistics.median(rk["times"][1]), statistics.median(rk["times"][2])
            lines.append(f"{rk['n']:,} images 3x{rk['px']}x{rk['px']}: 1 rank {t1:.2f} s, 2 ranks {t2:.2f} s "
                         f"(each rank with the default num_workers), 2 ranks / 1 rank = {rk['ratio_2_over_1']:.2f}x; "
                         f"results 1 vs 2 ranks differ by {rk['max_rel_diff_1_vs_2']:.1e} (relative); "
                         f"identical on all ranks: {rk['same_on_all_ranks']}.")
        else:
            lines.append("failed (see the log).")
        lines.append("")

    if targets:
        lines.append("## Targets (issue 4)")
        lines.append("")
        lines.append("| target | met | measurement |")
        lines.append("|---|---|---|")
        for name, ok, note in targets:
            lines.append(f"| {name} | {'yes' if ok else ('NO' if ok is not None else '?')} | {note} |")
        lines.append("")
    return "\n".join(lines), targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one round: about a minute")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload size by this")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measurement (default 5, quick 1)")
    p.add_argument("--sections", default="fit,hit,accumulator,rss,defaults,ranks")
    p.add_argument("--workloads", default="uint8,uint8 batches,FakeData,ImageFolder")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--markdown", type=Path, help="also write the report here")
    p.add_argument("--tmpdir", type=Path, help="where the image folder and cache files go (default: a new temp dir)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.workloads = [s.strip() for s in args.workloads.split(",") if s.strip()]
    args.methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # this process forks the measurements; it must not start an OpenMP pool
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench_fit.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(), "load": {"start": [round(v, 2) for v in os.getloadavg()]},
    }
    tmp = Path(tempfile.mkdtemp(prefix="torchnormfit-bench-", dir=args.tmpdir))
    try:
        specs = workload_specs(args)
        if "ImageFolder" in specs:
            spec = specs["ImageFolder"]
            spec["root"] = str(tmp / "folder")
            _log(f"writing {spec['n']} PNG/JPEG files into {spec['root']} ...")
            spec.update(write_image_folder(Path(spec["root"]), spec["n"], spec["sizes"]))
        sections = {
            "fit": lambda: section_fit(args, specs, tmp, results),
            "hit": lambda: section_hit(args, specs, tmp, results),
            "accumulator": lambda: section_accumulator(args, results),
            "rss": lambda: section_rss(args, results),
            "defaults": lambda: section_defaults(args, specs, results),
            "ranks": lambda: section_ranks(args, specs, tmp, results),
        }
        for name, run in sections.items():
            if name in args.sections:
                run()
                if args.json:  # keep what is measured so far, in case the run is cut short
                    args.json.write_text(json.dumps(results, indent=1, default=str))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load"]["end"] = [round(v, 2) for v in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - started
    text, targets = report(results)
    results["targets"] = [{"target": t, "met": ok, "measurement": note} for t, ok, note in targets]
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
