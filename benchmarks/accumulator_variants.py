"""The library's ``batch_stats`` beside the version before it and two lower bounds.

Each variant takes a batch and returns its ``ChannelStats``. Run this file to check every
variant's exactness on adversarial data (against a float64 two-pass truth) and to time it against
``x.sum()`` on the same resident batch, all interleaved in one run::

    python benchmarks/accumulator_variants.py            # both checks, 1 and 2 threads
    python benchmarks/accumulator_variants.py --quick
    python benchmarks/accumulator_variants.py --bound    # the rounding of uncentred rows against sum(x**2) / M2

``current`` is the library's (``torchnormfit.accumulator.batch_stats``): rows (one image channel
each) whose ``sum(x**2) / M2`` is at most 5 are reduced uncentred (sum, sum of squares, amin,
amax: four passes), the others centred first (a fifth pass, a subtraction into a scratch buffer).
``previous`` is the library's before (issue 14): every image centred on the mean of an 8x8 grid of
its pixels, in 4 MiB blocks, with a scratch buffer the caller passed in and got back.
``four_reductions`` times the four reductions an exact accumulator needs on rows
(``view(N*C, H*W)``: sum, ``vector_norm``, amin, amax, stock kernels, unblocked): the floor of an
uncentred one. ``five_passes_only`` adds the centring subtraction, blocked like ``previous``: the
floor of an accumulator that centres every row. Neither floor is an accumulator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from torchnormfit.reduce import batch_stats as current
from torchnormfit.reduce import reuse_buffer
from torchnormfit.stats import ChannelStats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import truth as _truth  # noqa: E402 - the float64 truth the tests use

__all__ = ["current", "previous", "four_reductions", "five_passes_only", "VARIANTS", "FLOORS", "check_exactness",
           "time_ratios"]

_PREVIOUS_BLOCK_BYTES, _PREVIOUS_CHUNK, _GRID = 4 << 20, 1024, 8
_previous_work: list[Tensor | None] = [None]  # the buffer the previous API handed back to its caller


def previous(images: Tensor) -> ChannelStats:
    """The library's ``batch_stats`` before issue 14 (git 0da2f21), its scratch buffer kept here."""
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    images = images.detach()
    channels, height, width = images.shape[-3:]
    flat = images.reshape(-1, channels, height * width)
    n = flat.shape[-1]
    rows, cols = max(1, height // _GRID), max(1, width // _GRID)
    centre = flat.unflatten(-1, (height, width))[..., rows // 2 :: rows, cols // 2 :: cols].mean(dim=(-2, -1))
    mean_i, m2_i, low, high = _previous_reduce(flat, centre)
    constant = low == high
    far = ((mean_i - centre.double()).square() > m2_i / n) & ~constant
    if bool(far.any()):
        redo = far.nonzero(as_tuple=True)
        mean_again, m2_again, _, _ = _previous_reduce(flat[redo][:, None], mean_i[redo].to(flat.dtype)[:, None])
        mean_i[redo], m2_i[redo] = mean_again[:, 0], m2_again[:, 0]
    mean_i = torch.where(constant, low, mean_i.clamp(min=low, max=high))
    m2_i = torch.where(constant, 0.0, m2_i.clamp_min(0))
    mean = mean_i.mean(dim=0)
    m2 = m2_i.sum(dim=0) + n * (mean_i - mean).square().sum(dim=0)
    count = torch.full_like(mean, float(flat.shape[0] * n))
    return ChannelStats(count, mean, m2, low.amin(dim=0), high.amax(dim=0))


def _previous_reduce(flat: Tensor, centre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    count, channels, n = flat.shape
    per_block = min(count, max(1, _PREVIOUS_BLOCK_BYTES // (channels * n * flat.element_size())))
    work = _previous_work[0] = reuse_buffer(_previous_work[0], per_block * channels * n, flat)
    chunks = n // _PREVIOUS_CHUNK if n > 2 * _PREVIOUS_CHUNK else 0
    whole = chunks * _PREVIOUS_CHUNK
    dev_sum, low, high = torch.empty(3, count, channels, dtype=flat.dtype)
    norms = torch.empty(count, channels, chunks + (whole < n), dtype=flat.dtype)
    for start in range(0, count, per_block):
        stop = min(count, start + per_block)
        block = flat[start:stop]
        centred = work[: block.numel()].view(block.shape)
        torch.sub(block, centre[start:stop, :, None], out=centred)
        torch.sum(centred, dim=-1, out=dev_sum[start:stop])
        torch.amin(block, dim=-1, out=low[start:stop])
        torch.amax(block, dim=-1, out=high[start:stop])
        if chunks:
            torch.linalg.vector_norm(centred[..., :whole].unflatten(-1, (chunks, _PREVIOUS_CHUNK)), dim=-1,
                                     out=norms[start:stop, :, :chunks])
        if whole < n:
            torch.linalg.vector_norm(centred[..., whole:], dim=-1, keepdim=True, out=norms[start:stop, :, chunks:])
    dev_sum = dev_sum.double()
    mean = centre.double() + dev_sum / n
    m2 = norms.double().square_().sum(dim=-1) - dev_sum.square() / n
    return mean, m2, low.double(), high.double()


def four_reductions(images: Tensor) -> None:
    """A lower bound, NOT an accumulator: sum, sum of squares, amin and amax of each row, nothing else."""
    rows = images.reshape(-1, images.shape[-2] * images.shape[-1])
    rows.sum(dim=-1), torch.linalg.vector_norm(rows, dim=-1), rows.amin(dim=-1), rows.amax(dim=-1)


_floor_work: list[Tensor | None] = [None]


def five_passes_only(images: Tensor) -> None:
    """A lower bound, NOT an accumulator: the four reductions after subtracting a centre into a
    scratch buffer, in ``previous``'s 4 MiB blocks."""
    channels, height, width = images.shape[-3:]
    x = images.reshape(-1, channels, height * width)
    n_img, _, n = x.shape
    per_block = min(n_img, max(1, _PREVIOUS_BLOCK_BYTES // (channels * n * x.element_size())))
    work = _floor_work[0] = reuse_buffer(_floor_work[0], per_block * channels * n, x)
    out = torch.empty(4, n_img, channels, dtype=x.dtype)
    centre = torch.full((n_img, channels, 1), 0.5, dtype=x.dtype)
    for start in range(0, n_img, per_block):
        stop = min(n_img, start + per_block)
        block = x[start:stop]
        scratch = work[: block.numel()].view(block.shape)
        torch.sub(block, centre[start:stop], out=scratch)
        torch.sum(scratch, dim=-1, out=out[0, start:stop])
        torch.linalg.vector_norm(scratch, dim=-1, out=out[1, start:stop])
        torch.amin(block, dim=-1, out=out[2, start:stop])
        torch.amax(block, dim=-1, out=out[3, start:stop])


VARIANTS = {"current": current, "previous": previous}
FLOORS = {"four_reductions": four_reductions, "five_passes_only": five_passes_only}


# --- exactness -------------------------------------------------------------------------------

def adversarial_cases(seed: int = 0) -> dict[str, list[Tensor]]:
    """Named lists of float32 batches (merged in order) that break naive accumulators."""
    g = torch.Generator().manual_seed(seed)
    cases: dict[str, list[Tensor]] = {}
    cases["uniform 0-1, 224px"] = [torch.rand(8, 3, 224, 224, generator=g) for _ in range(3)]
    cases["mean 0.5 std 0.05"] = [(0.5 + 0.05 * torch.randn(64, 3, 32, 32, generator=g)) for _ in range(6)]
    cases["mean 0.5 std 0.05, 224px"] = [(0.5 + 0.05 * torch.randn(4, 3, 224, 224, generator=g)) for _ in range(4)]
    cases["brightness per batch"] = [(b + 0.01 * torch.rand(32, 3, 32, 32, generator=g)) for b in (0.02, 0.9, 0.3, 0.99, 0.0)]
    inside = 0.05 * torch.rand(64, 3, 32, 32, generator=g)
    inside[::2] += 0.9
    cases["brightness per image"] = [inside, 0.5 + 0.001 * torch.rand(7, 3, 32, 32, generator=g)]
    const = torch.rand(16, 3, 40, 30, generator=g)
    const[:, 1] = 0.7
    const[:, 2] = 1 / 3
    cases["constant channels (std must be 0)"] = [const, const[:5].clone()]
    cases["short last batch"] = [torch.rand(64, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)]
    cases["offset 1000, std 0.01"] = [(1000 + 0.01 * torch.randn(16, 3, 64, 64, generator=g)) for _ in range(2)]
    cases["uint8 levels /255"] = [torch.randint(0, 256, (64, 3, 32, 32), generator=g).float() / 255 for _ in range(3)]
    flat = torch.rand(32, 3, 32, 32, generator=g)
    flat[::3] = 0.30742281675338745  # a value whose float32 mean over 128 copies is not the value
    flat[1::3, 1] = 0.0
    cases["flat images among others"] = [flat]
    return cases


def _fit(fn, batches: list[Tensor]) -> ChannelStats:
    stats = fn(batches[0])
    for b in batches[1:]:
        stats = stats.merge(fn(b))
    return stats


def check_exactness(variants: dict | None = None) -> list[tuple[str, str, float, float, bool]]:
    """``(variant, case, max rel. error of mean, of std, constant channels exact)`` for each pair."""
    variants = variants or VARIANTS
    rows = []
    for case, batches in adversarial_cases().items():
        truth = _truth(batches)
        for name, fn in variants.items():
            got = _fit(fn, batches)
            mean_err = float(((got.mean - truth["mean"]).abs() / truth["mean"].abs().clamp_min(1e-300)).max())
            tstd = truth["std"]
            nonzero = tstd > 0
            std_err = float(((got.std - tstd).abs()[nonzero] / tstd[nonzero]).max()) if nonzero.any() else 0.0
            zero_ok = bool((got.std[~nonzero] == 0).all()) and bool((got.min == truth["min"]).all() and (got.max == truth["max"]).all())
            rows.append((name, case, mean_err, std_err, zero_ok))
    return rows


# --- the bound on uncentred rows -------------------------------------------------------------

def uncentred_bound(rows: int = 20_000, ratios=(2.0, 5.0, 20.0)) -> list[tuple[str, float, float, float]]:
    """``(distribution, k, largest M2 error / (k * 2**-24), largest std error)`` of float32 rows of 1,024
    pixels reduced uncentred as the library does, k = sum(x**2) / M2 (1 + mean**2 / var)."""
    from torchnormfit.reduce import _reduce

    g = torch.Generator().manual_seed(3)
    out = []
    for ratio in ratios:
        shift = (ratio - 1) ** 0.5
        for name, z in {"uniform": (torch.rand(rows, 1024, generator=g, dtype=torch.float64) - 0.5) * 12**0.5,
                        "normal": torch.randn(rows, 1024, generator=g, dtype=torch.float64),
                        "uint8 levels": torch.randint(0, 256, (rows, 1024), generator=g).double()}.items():
            z = (z - z.mean(dim=1, keepdim=True)) / z.std(dim=1, correction=0, keepdim=True)
            x = (shift + z).float()
            total, squares, _, _ = _reduce(x, None)
            m2 = squares - total.square() / x.shape[1]
            var = x.double().var(dim=1, correction=0)
            k = squares / m2
            m2_error = (m2 / x.shape[1] - var).abs() / var
            out.append((name, ratio, float((m2_error / (k * 2**-24)).max()),
                        float(((m2 / x.shape[1] / var).sqrt() - 1).abs().max())))
    return out


# --- speed ----------------------------------------------------------------------------------

def time_ratios(fns: dict, x: Tensor, *, rounds: int = 15, inner: int = 7) -> dict[str, tuple[float, float, float]]:
    """``{name: (median ratio fn / x.sum(), median seconds of fn, median seconds of x.sum())}``.

    ``x.sum()`` and every ``fn`` alternate call by call on the same resident tensor. Per round,
    the best of ``inner`` calls of each (other processes only ever add time), and each one's
    ratio to ``x.sum()``'s; then the median over rounds.
    """
    calls = {"sum": lambda: x.sum(), **{name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}}
    for call in calls.values():  # warm up: scratch buffers, first touches
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    clock = time.perf_counter
    for _ in range(rounds):
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(inner):
            for name, call in calls.items():
                start = clock()
                call()
                best[name] = min(best[name], clock() - start)
        for name in calls:
            seconds[name].append(best[name])
    sums = seconds.pop("sum")
    return {name: (statistics.median(t / s for t, s in zip(times, sums)), statistics.median(times), statistics.median(sums))
            for name, times in seconds.items()}


SHAPES = {"256x3x32x32": (256, 3, 32, 32), "64x3x224x224": (64, 3, 224, 224)}
TARGETS = {"256x3x32x32": 7.0, "64x3x224x224": 5.0}  # issue 14, for the uniform batch


def batches(shape: tuple[int, ...]) -> dict[str, Tensor]:
    """'uniform' (U(0, 1): every row has sum(x**2) / M2 ~ 4, reduced uncentred) and 'narrow' (mean 0.5,
    std 0.05: ~100, every row centred)."""
    g = torch.Generator().manual_seed(1)
    return {"uniform": torch.rand(shape, generator=g), "narrow": 0.5 + 0.05 * torch.randn(shape, generator=g)}


def speed_table(variants: dict | None = None, threads=(1, 2), rounds: int = 15) -> list[tuple[str, str, int, str, float, float, float]]:
    """``(shape, batch, threads, variant, ratio, ms, sum ms)`` rows; each batch's variants interleaved."""
    variants = variants or {**VARIANTS, **FLOORS}
    rows = []
    before = torch.get_num_threads()
    try:
        for shape_name, shape in SHAPES.items():
            for kind, x in batches(shape).items():
                for t in threads:
                    torch.set_num_threads(t)
                    for name, (ratio, s_fn, s_sum) in time_ratios(variants, x, rounds=rounds).items():
                        rows.append((shape_name, kind, t, name, ratio, s_fn * 1e3, s_sum * 1e3))
    finally:
        torch.set_num_threads(before)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    parser.add_argument("--bound", action="store_true", help="only the rounding of uncentred rows, against k")
    args = parser.parse_args(argv)
    if args.bound:
        print("uncentred float32 rows of 1,024 pixels, 20,000 per line: largest M2 error / (k * 2**-24), largest std error")
        for name, ratio, per_k, std_error in uncentred_bound():
            print(f"  k = {ratio:4g}  {name:13s} {per_k:5.2f}  {std_error:.2e}")
        return 0
    print("exactness (max relative error vs float64 two-pass; 'exact' = zero std on constant channels and min/max equal)")
    worst: dict[str, float] = {}
    for name, case, me, se, ok in check_exactness(VARIANTS):
        worst[name] = max(worst.get(name, 0.0), me, se)
        print(f"  {name:10s} {case:36s} mean {me:9.2e}  std {se:9.2e}  {'exact' if ok else 'NOT EXACT'}")
    print("  worst:", ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    print("speed (median of per-round ratios to x.sum() on the same resident batch, all interleaved)")
    for shape, kind, t, name, ratio, ms, sum_ms in speed_table(rounds=7 if args.quick else 21):
        target = f"  target <= {TARGETS[shape]:g}x: {'met' if ratio <= TARGETS[shape] else 'NOT met'}" if name == "current" else ""
        print(f"  {shape:13s} {kind:8s} threads={t} {name:16s} {ratio:6.2f}x  ({ms:7.3f} ms; x.sum {sum_ms:6.3f} ms){target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
