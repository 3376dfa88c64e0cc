"""BatchNorm2d running statistics versus the exact dataset statistics.

A common recipe for a dataset's per-channel mean and std is to run every batch through an
``nn.BatchNorm2d`` in train mode and read ``running_mean`` and ``running_var``. With the default
``momentum=0.1`` that is an exponential average that remembers mostly the last batches; with
``momentum=None`` it is the plain average of per-batch means and (unbiased) per-batch variances,
which misses the spread between the batch means. Both are far off as soon as batches differ,
for example when the data is sorted by class.

This script draws 2000 batches of 16 random 3x16x16 images from 10 synthetic "classes", each
with its own brightness and colour cast, in class order (as an ImageFolder is without shuffle),
feeds the same batches to the three recipes, and prints each one's relative error against a
float64 two-pass computation over every pixel.

Run: ``python examples/bn_vs_exact.py`` (a few seconds on one CPU core; no download).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from torchnormfit import BatchNormAccumulator

CHANNELS, SIZE = 3, 16


def batches(num_batches: int, batch_size: int, num_classes: int, seed: int):
    """The batches, in class order, generated again identically on every call (for a second pass)."""
    g = torch.Generator().manual_seed(seed)
    # Class k: a brightness between 0.35 and 0.65 and its own colour cast.
    level = torch.linspace(0.35, 0.65, num_classes, dtype=torch.float64)[:, None]
    cast = 0.05 * torch.randn(num_classes, CHANNELS, generator=g, dtype=torch.float64)
    base = (level + cast)[:, :, None, None]
    per_class = num_batches // num_classes
    for i in range(num_batches):
        k = min(i // per_class, num_classes - 1)
        gi = torch.Generator().manual_seed(seed * 1_000_003 + i)
        brightness = 0.08 * torch.randn(batch_size, 1, 1, 1, generator=gi, dtype=torch.float64)  # per image
        noise = 0.15 * torch.randn(batch_size, CHANNELS, SIZE, SIZE, generator=gi, dtype=torch.float64)  # per pixel
        yield (base[k] + brightness + noise).clamp_(0.0, 1.0).float()


def two_pass_truth(make_batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 two-pass mean and population std over every pixel (the data is generated twice)."""
    total = torch.zeros(CHANNELS, dtype=torch.float64)
    count = 0
    for x in make_batches():
        total += x.double().sum(dim=(0, 2, 3))
        count += x.numel() // CHANNELS
    mean = total / count
    squares = torch.zeros(CHANNELS, dtype=torch.float64)
    for x in make_batches():
        squares += (x.double() - mean[:, None, None]).square().sum(dim=(0, 2, 3))
    return mean, (squares / count).sqrt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: threads cost more than they bring

    def make_batches():
        return batches(args.batches, args.batch_size, args.classes, args.seed)

    start = time.perf_counter()
    true_mean, true_std = two_pass_truth(make_batches)

    ema = nn.BatchNorm2d(CHANNELS, affine=False, momentum=0.1)  # the common recipe
    cumulative = nn.BatchNorm2d(CHANNELS, affine=False, momentum=None)  # cumulative average of batch stats
    exact = BatchNormAccumulator(CHANNELS)  # this library
    ema_twin = BatchNormAccumulator(CHANNELS, momentum=0.1)  # its comparison mode
    with torch.no_grad():
        for x in make_batches():
            ema(x)
            cumulative(x)
            exact(x)
            ema_twin(x)
    elapsed = time.perf_counter() - start

    def row(name: str, mean: torch.Tensor, std: torch.Tensor) -> str:
        mean_err = ((mean.double() - true_mean).abs() / true_mean).max().item()
        std_err = ((std.double() - true_std).abs() / true_std).max().item()
        return f"{name:<42} {mean_err:>14.2e} {std_err:>14.2e}"

    pixels = args.batches * args.batch_size * SIZE * SIZE
    print(f"{args.batches} batches of {args.batch_size} images 3x{SIZE}x{SIZE} ({pixels:,} pixels per channel), "
          f"{args.classes} classes in class order")
    print(f"float64 two-pass truth: mean {[round(v, 6) for v in true_mean.tolist()]}, "
          f"std {[round(v, 6) for v in true_std.tolist()]}")
    print()
    print(f"{'method (relative error, worst channel)':<42} {'mean':>14} {'std':>14}")
    print(row("BatchNorm2d(momentum=0.1)", ema.running_mean, ema.running_var.sqrt()))
    print(row("BatchNorm2d(momentum=None)", cumulative.running_mean, cumulative.running_var.sqrt()))
    print(row("BatchNormAccumulator (exact, float64 state)", exact.stats.mean, exact.stats.std))
    print(row("BatchNormAccumulator running_mean/var", exact.running_mean, exact.running_var.sqrt()))
    same = torch.equal(ema_twin.running_mean, ema.running_mean) and torch.equal(ema_twin.running_var, ema.running_var)
    print()
    print(f"BatchNormAccumulator(momentum=0.1) reproduces stock BatchNorm2d(momentum=0.1) bit for bit: {same}")
    print(f"({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
