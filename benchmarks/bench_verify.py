#!/usr/bin/env python
"""Verified cache hits: how often unchanged data fails the check, how often changed data passes, and the cost.

::

    python benchmarks/bench_verify.py                 # the full run (minutes: 30,000 hits per kind took 3 min)
    python benchmarks/bench_verify.py --quick         # small sizes, a few hundred hits (~1 min there); a smoke check
    python benchmarks/bench_verify.py --sections sim  # only the simulated hits (``sim``, ``e2e``)

``sim``: false alarms and detection, with the library's own test.
    Each *kind* is a dataset of small uint8 images and a v2 pipeline. The fit is simulated as the
    library does it: pooled statistics over one pipeline draw of the whole dataset (``tensor_stats``),
    the tracked images chosen by ``passes.mapped.tracked_indices`` and their moments by
    ``verification.image_moments``. A hit draws ``verify`` tracked rows at random and calls
    ``verification.verify_in_stages`` with their stored moments and those of a fresh pipeline draw. To make
    tens of thousands of hits affordable, each tracked image gets a pool of ``--views`` independent
    pipeline draws up front; per hit and image, the fit's view and the hit's view are two distinct
    views of the pool (for a deterministic pipeline all views are the same). The changed data
    ("shift", "std x") is the pipeline's output changed per channel, ``(x - mean) * s + mean + d * std``
    with the pooled mean and std, which is what FitNormalize would see; "other dataset" reads the
    same indices of a second dataset of the same kind (another seed).
``e2e``: what a hit costs against a pass, each a ``fit()`` in a fresh interpreter (a user's next run),
    on a folder of PNGs (ImageFolder, ``ToImage + ToDtype + FitNormalize``, default fit settings).
"""

from __future__ import annotations

import argparse
import gc
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from torchnormfit import verification
from torchnormfit.passes import tensor_stats
from torchnormfit.passes.mapped import tracked_indices

CHANGES = [(f"shift {d} std", d, 1.0, 1.0) for d in (0.05, 0.1, 0.25, 0.5)] + [
    (f"std x{s}", 0.0, s, 1.0) for s in (1.05, 1.1, 1.25)
] + [("40% shifted 1.25 std", 1.25, 1.0, 0.4)]  # (name, shift, scale, fraction of the images changed)
OTHER = "other dataset"
REQUIRED = ("shift 0.5 std", "std x1.25")  # issue 10: these must be caught


# --- data ----------------------------------------------------------------------------------------


def photos(n: int, size: int, gen: torch.Generator, brightness: torch.Tensor | None = None) -> torch.Tensor:
    """Photo-like uint8 images: a coloured gradient, texture at two scales, noise; random brightness and gamma."""
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    ramp = torch.linspace(0, 1, size)
    angle = u(n, 1, 1, 1) * 2 * math.pi
    grad = torch.cos(angle) * ramp.view(1, 1, 1, -1) + torch.sin(angle) * ramp.view(1, 1, -1, 1)
    grad = (grad - grad.amin((2, 3), keepdim=True)) / (grad.amax((2, 3), keepdim=True) - grad.amin((2, 3), keepdim=True))
    start, end = u(n, 3, 1, 1), u(n, 3, 1, 1)
    img = start + (end - start) * grad
    for cells, amplitude in ((max(2, size // 8), 0.3), (max(2, size // 2), 0.15)):
        noise = F.interpolate(torch.randn(n, 3, cells, cells, generator=gen), size=(size, size), mode="bilinear")
        img = img + amplitude * u(n, 1, 1, 1) * noise
    img = img + 0.05 * u(n, 1, 1, 1) * torch.randn(n, 3, size, size, generator=gen)
    gamma = 0.5 + 1.5 * u(n, 1, 1, 1)
    scale = brightness if brightness is not None else torch.exp(math.log(0.3) + math.log(5) * u(n))
    img = img.clamp(0, 1) ** gamma * scale.view(n, 1, 1, 1)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def mixture(n: int, size: int, gen: torch.Generator, textured: float) -> torch.Tensor:
    """Flat images (one colour each) with a fraction ``textured`` of high-contrast noise images among them."""
    images = (torch.rand(n, 3, 1, 1, generator=gen) * 255).round().to(torch.uint8).expand(n, 3, size, size).clone()
    picked = torch.randperm(n, generator=gen)[: max(1, round(textured * n))]
    images[picked] = torch.randint(0, 256, (len(picked), 3, size, size), generator=gen, dtype=torch.uint8)
    return images


def class_sorted(n: int, size: int, gen: torch.Generator, classes: int = 10) -> torch.Tensor:
    """Photo-like images in class blocks (index order), each class at its own brightness (0.1 to 1)."""
    level = 0.1 + 0.9 * torch.arange(classes, dtype=torch.float32) / (classes - 1)
    return photos(n, size, gen, brightness=level.repeat_interleave(math.ceil(n / classes))[:n])


def pipelines(size: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The v2 pipelines before FitNormalize: uint8 image in, float image out."""
    to_float = v2.ToDtype(torch.float32, scale=True)
    return {
        "deterministic": v2.Compose([v2.ToImage(), v2.CenterCrop(size - size // 6), to_float]),
        "RandomResizedCrop": v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            to_float,
        ]),
        "ColorJitter p=0.1": v2.Compose([
            v2.ToImage(), to_float, v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.1),
        ]),
    }


KINDS: list[tuple[str, str, Callable[[int, int, torch.Generator], torch.Tensor]]] = [
    ("photos", "deterministic", photos),
    ("photos", "RandomResizedCrop", photos),
    ("photos", "ColorJitter p=0.1", photos),
    ("10% textured, 90% flat", "RandomResizedCrop", lambda n, s, g: mixture(n, s, g, 0.10)),
    ("1% textured, 99% flat", "RandomResizedCrop", lambda n, s, g: mixture(n, s, g, 0.01)),
    ("1% textured, 99% flat", "ColorJitter p=0.1", lambda n, s, g: mixture(n, s, g, 0.01)),
    ("class-sorted", "RandomResizedCrop", class_sorted),
    ("class-sorted", "deterministic", class_sorted),
]


# --- the simulated fit and hits ------------------------------------------------------------------


def _view(pipeline: Callable, image: torch.Tensor) -> torch.Tensor:
    return pipeline(image).as_subclass(torch.Tensor)


def simulate_fit(images: torch.Tensor, pipeline: Callable) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pooled mean and variance over one pipeline draw of every image, and the tracked indices."""
    stats, _ = tensor_stats(torch.stack([_view(pipeline, im) for im in images]))
    return stats.mean, stats.var, tracked_indices(range(len(images)))


def view_moments(
    images: torch.Tensor, tracked: list[int], pipeline: Callable, views: int, pooled: tuple[torch.Tensor, torch.Tensor],
    changes: list[tuple[str, float, float, float]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (mean, var)``, each ``(tracked, views, C)``: moments of independent pipeline draws, as seen
    unchanged ("same") and after each change of the pipeline's output (of a fixed part of the images)."""
    mean, std = pooled[0].view(-1, 1, 1), pooled[1].sqrt().view(-1, 1, 1)
    out = {name: ([], []) for name in ["same", *(c[0] for c in changes)]}
    for index in tracked:
        rows = {name: ([], []) for name in out}
        for _ in range(views):
            x = _view(pipeline, images[index])
            for name, shift, scale, fraction in [("same", 0.0, 1.0, 0.0), *changes]:
                hit = index % 100 < 100 * fraction
                changed = ((x - mean) * scale + mean + shift * std).to(x.dtype) if hit else x
                m, v = verification.image_moments(changed)
                rows[name][0].append(m)
                rows[name][1].append(v)
        for name, (ms, vs) in rows.items():
            out[name][0].append(torch.stack(ms))
            out[name][1].append(torch.stack(vs))
    return {name: (torch.stack(ms), torch.stack(vs)) for name, (ms, vs) in out.items()}


def run_hits(
    stored: tuple[torch.Tensor, torch.Tensor], seen: tuple[torch.Tensor, torch.Tensor],
    pooled: tuple[torch.Tensor, torch.Tensor], verify: int, hits: int, rng: np.random.Generator,
) -> dict[str, int]:
    """Simulated hits: ``verify`` random tracked rows, the fit's and the hit's view two distinct pool draws."""
    tracked, views = stored[0].shape[:2]
    failed = by_t = reads = 0
    for _ in range(hits):
        rows = torch.from_numpy(rng.choice(tracked, size=min(verify, tracked), replace=False))
        fit_view = torch.from_numpy(rng.integers(views, size=len(rows)))
        hit_view = (fit_view + torch.from_numpy(rng.integers(1, views, size=len(rows)))) % views
        result = verification.verify_in_stages(
            stored[0][rows, fit_view], stored[1][rows, fit_view],
            lambda a, b: (seen[0][rows[a:b], hit_view[a:b]], seen[1][rows[a:b], hit_view[a:b]]), *pooled,
        )
        failed += not result.passed
        by_t += result.score > result.threshold
        reads += result.samples
    return {"hits": hits, "failed": failed, "failed_by_t": by_t, "failed_by_sign_only": failed - by_t,
            "mean_reads": reads / hits}


def upper_bound(failures: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound of a binomial rate (~3/n for 0 failures)."""
    if failures >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                            + k * math.log(p) + (n - k) * math.log1p(-p)) for k in range(failures + 1))

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - confidence else (lo, mid)
    return hi


def theory_bound(verify: int, channels: int) -> float:
    """Union bound on a false alarm: FALSE_ALARM_BOUND (the T and sign tests), plus ``2 C 2^(1 - n)`` for the
    unanimous-sign rule of fewer than ``unanimous_at`` images."""
    few = verification.MIN_UNANIMOUS <= verify < verification.unanimous_at(channels)
    return verification.FALSE_ALARM_BOUND + (2 * channels * 2.0 ** (1 - verify) if few else 0.0)


def sim_kind(data: str, pipe: str, make: Callable, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """False alarms and detection rates of one kind, at every ``verify`` of ``args``."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, other = make(args.images, args.size, gen), make(args.images, args.size, gen)
    pipeline = pipelines(args.size)[pipe]
    pooled_mean, pooled_var, tracked = simulate_fit(images, pipeline)
    pooled = (pooled_mean, pooled_var)
    moments = view_moments(images, tracked, pipeline, args.views, pooled, CHANGES)
    moments[OTHER] = view_moments(other, tracked, pipeline, args.views, pooled, [])["same"]
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"data": data, "pipeline": pipe, "images": args.images, "tracked": len(tracked),
                              "false_alarms": {}, "detection": {}}
    for verify in args.verify:
        counts = run_hits(moments["same"], moments["same"], pooled, verify, args.hits, rng)
        counts.update(rate=counts["failed"] / counts["hits"], upper95=upper_bound(counts["failed"], counts["hits"]),
                      theory=theory_bound(verify, len(pooled_mean)))
        result["false_alarms"][verify] = counts
        result["detection"][verify] = {
            name: run_hits(moments["same"], moments[name], pooled, verify, args.detect_hits, rng)["failed"]
            / args.detect_hits
            for name in [*(c[0] for c in CHANGES), OTHER]
        }
    result["seconds"] = time.perf_counter() - started
    return result


# --- end to end: a hit against a pass, in fresh interpreters ---------------------------------------


def write_png_folder(root: Path, n: int, size: int, classes: int = 10) -> None:
    """``n`` photo-like PNGs in ``classes`` class folders (an ImageFolder)."""
    from torchvision.io import write_png

    images = photos(n, size, torch.Generator().manual_seed(1234))
    for i, image in enumerate(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(image, str(folder / f"{i:05d}.png"))


def child(root: str, cache: str, mode: str) -> None:
    """One user's run: build the dataset, time ``fit()``, print what happened as JSON."""
    from torchvision.datasets import ImageFolder

    from torchnormfit import FitNormalize

    norm = FitNormalize(cache=cache)
    dataset = ImageFolder(root, transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm]))
    options = {"verify": 0} if mode == "hit, verify=0" else {}
    gc.collect()  # the interpreter's first full collection of import garbage (~0.17 s) is no part of fit()
    started, cpu = time.perf_counter(), _cpu_seconds()
    norm.fit(dataset, progress=False, **options)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    record = norm.fit_record
    samples = record.verification.samples if record.verification is not None else 0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "source": record.source, "verified": samples,
                      "passed": None if record.verification is None else record.verification.passed}))


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _spawn(root: Path, cache: Path, mode: str) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(root), str(cache), mode],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - started}


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds of a pass (a fresh cache file: miss, pass, write), a verified hit and a hit with verify=0."""
    modes = ["pass", "hit", "hit, verify=0"]
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache.h5"
        write_png_folder(root, args.e2e_images, args.e2e_size)
        _spawn(root, cache, "pass")  # the entry the hits find
        rounds = []
        for r in range(args.rounds):
            row = {}
            for mode in modes[r % 3:] + modes[: r % 3]:
                row[mode] = _spawn(root, Path(tmp) / f"miss{r}.h5" if mode == "pass" else cache, mode)
            rounds.append(row)
    median = statistics.median
    return {
        "images": args.e2e_images, "size": args.e2e_size, "rounds": rounds,
        "median_seconds": {m: median([row[m]["seconds"] for row in rounds]) for m in modes},
        "median_cpu_seconds": {m: median([row[m]["cpu_seconds"] for row in rounds]) for m in modes},
        "median_process_seconds": {m: median([row[m]["process_seconds"] for row in rounds]) for m in modes},
        "pass_over_hit": median([row["pass"]["seconds"] / row["hit"]["seconds"] for row in rounds]),
        "pass_over_hit_verify0": median([row["pass"]["seconds"] / row["hit, verify=0"]["seconds"] for row in rounds]),
        "cpu_pass_over_hit": median([row["pass"]["cpu_seconds"] / row["hit"]["cpu_seconds"] for row in rounds]),
        "cpu_pass_over_hit_verify0": median([row["pass"]["cpu_seconds"] / row["hit, verify=0"]["cpu_seconds"]
                                             for row in rounds]),
        "sources": sorted({(m, row[m]["source"], row[m]["verified"]) for row in rounds for m in modes}),
    }


# --- report ------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "git": commit, "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "load_start": list(os.getloadavg()),
    }


def print_sim(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n## False alarms on unchanged data ({args.hits:,} simulated hits per kind and verify)\n")
    print(f"{args.images:,} images of 3x{args.size}x{args.size} per kind; fit and hit views drawn from a pool of "
          f"{args.views} pipeline draws per tracked image (two distinct draws per image and hit).\n")
    print("| data | pipeline | verify | hits | failed | by T | by a sign rule only | rate | 95% upper bound | theory bound "
          "| images read (mean) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for verify, c in r["false_alarms"].items():
            print(f"| {r['data']} | {r['pipeline']} | {verify} | {c['hits']:,} | {c['failed']} | {c['failed_by_t']} | "
                  f"{c['failed_by_sign_only']} | {c['rate']:.1e} | {c['upper95']:.1e} | {c['theory']:.1e} | "
                  f"{c['mean_reads']:.1f} |")
    names = [*(c[0] for c in CHANGES), OTHER]
    for verify in args.verify:
        print(f"\n## Detection: fraction of {args.detect_hits:,} hits that fail, verify={verify}\n")
        print("| data | pipeline | " + " | ".join(names) + " |")
        print("|---|---|" + "---:|" * len(names))
        for r in results:
            print(f"| {r['data']} | {r['pipeline']} | " + " | ".join(f"{r['detection'][verify][n]:.3f}" for n in names)
                  + " |")
    verify = max(args.verify)
    print(f"\n## Issue 10's requirements at verify={verify}\n")
    print("| data | pipeline | false alarms (95% upper bound) | shift 0.5 std caught | std x1.25 caught |")
    print("|---|---|---|---|---|")
    for r in results:
        c, d = r["false_alarms"][verify], r["detection"][verify]
        caught = ["yes" if d[n] == 1.0 else f"NO ({d[n]:.3f})" for n in REQUIRED]
        print(f"| {r['data']} | {r['pipeline']} | {c['failed']} in {c['hits']:,} ({c['upper95']:.1e}) | "
              + " | ".join(caught) + " |")


def print_e2e(e: dict[str, Any]) -> None:
    print(f"\n## End to end: a cache hit against a pass ({e['images']:,} PNGs of 3x{e['size']}x{e['size']}, "
          f"{len(e['rounds'])} interleaved rounds, each fit() in a fresh interpreter)\n")
    print("| run | fit() s | pass / this | fit() cpu s | pass / this, cpu | whole process s |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = {"pass": (1.0, 1.0), "hit": (e["pass_over_hit"], e["cpu_pass_over_hit"]),
              "hit, verify=0": (e["pass_over_hit_verify0"], e["cpu_pass_over_hit_verify0"])}
    for mode, (ratio, cpu_ratio) in ratios.items():
        print(f"| {mode} | {e['median_seconds'][mode]:.4f} | {ratio:.1f} | {e['median_cpu_seconds'][mode]:.4f} | "
              f"{cpu_ratio:.1f} | {e['median_process_seconds'][mode]:.2f} |")
    print("\nTimes: medians over rounds; ratios: medians of the per-round ratios. cpu: the fit()'s process and its "
          "DataLoader workers (steadier when other processes compete); whole process: the interpreter's start, "
          "imports and the dataset's construction included.")
    print(f"\nWhat the runs did (run, source, images verified): {e['sources']}")
    for what, key, target in (("hit", "pass_over_hit", 20), ("hit with verify=0", "pass_over_hit_verify0", 100)):
        print(f"Target: {what} >= {target}x faster than a pass: {'yes' if e[key] >= target else 'NO'} "
              f"(wall {e[key]:.1f}x, cpu {e['cpu_' + key]:.1f}x)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few hits (a smoke check)")
    p.add_argument("--sections", nargs="+", choices=["sim", "e2e"], default=["sim", "e2e"])
    p.add_argument("--hits", type=int, help="simulated hits per kind and verify (default 20,000; quick 200)")
    p.add_argument("--detect-hits", type=int, help="hits per kind, change and verify (default 1,000; quick 50)")
    p.add_argument("--verify", type=int, nargs="+", default=[verification.DEFAULT_VERIFY, 16])
    p.add_argument("--images", type=int, help="images per simulated dataset (default 1,500; quick 120)")
    p.add_argument("--size", type=int, help="side of the simulated images (default 48; quick 12)")
    p.add_argument("--views", type=int, help="pipeline draws per tracked image (default 20; quick 3)")
    p.add_argument("--rounds", type=int, help="end-to-end rounds (default 5; quick 1)")
    p.add_argument("--e2e-images", type=int, help="PNGs in the end-to-end folder (default 1,500; quick 60)")
    p.add_argument("--e2e-size", type=int, default=96)
    p.add_argument("--one-stage", action="store_true",
                   help="check every hit in one stage (the check before two stages), to compare")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    defaults = dict(hits=(200, 20_000), detect_hits=(50, 1_000), images=(120, 1_500), size=(12, 48), views=(3, 20),
                    rounds=(1, 5), e2e_images=(60, 1_500))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--child":
        return child(*sys.argv[2:])
    args = parse_args(argv)
    torch.set_num_threads(1)  # small tensors: threads only add overhead on a shared machine
    if args.one_stage:
        verification.TWO_STAGES_FROM = verification.MAX_VERIFY + 1
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"bench_verify.py {' '.join(sys.argv[1:])}: {results['machine']}")
    if "sim" in args.sections:
        results["sim"] = [sim_kind(data, pipe, make, args, seed) for seed, (data, pipe, make) in enumerate(KINDS)]
        print_sim(results["sim"], args)
    if "e2e" in args.sections:
        results["e2e"] = end_to_end(args)
        print_e2e(results["e2e"])
    results["machine"].update(load_end=list(os.getloadavg()), wall_minutes=(time.perf_counter() - started) / 60)
    print(f"\nload average at end {results['machine']['load_end']}; wall time {results['machine']['wall_minutes']:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
