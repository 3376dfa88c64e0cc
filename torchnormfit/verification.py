"""Is a cache entry still right for this data? A paired test on a few images' own statistics.

A fit keeps, for up to :data:`TRACKED` images, each image's per-channel mean and
variance (the entry's ``samples`` arrays). A later hit reads some of those
images again through the same pipeline and compares them, image by image, with
what was stored. For each channel two differences are tested: of the image's
mean, and of its spread about the entry's pooled mean (``var + (mean - mu)^2``,
whose pixel-weighted average is the pooled variance), so a change of the mean or
of the std is seen.

Why a paired test, and why this one: with a deterministic pipeline the
differences are zero (up to rounding). With a random one (``RandomResizedCrop``)
the fit's and the check's views of one image are two independent draws of the
same augmentation, so each difference is symmetric about zero whatever the
images look like. For symmetric differences ``d`` the self-normalised sum
``T = sum(d) / sqrt(sum(d^2))`` obeys ``P(|T| >= t) <= 2 exp(-t^2 / 2)``
(Hoeffding's inequality applied to random signs given ``|d|``; Efron 1969,
"Student's t-test under symmetry conditions"), with no assumption on how the
images vary. The threshold puts the bound for all ``2 C`` tests together at
:data:`FALSE_ALARM_BOUND`; a data change that shifts most differences one way
gives ``|T|`` near ``sqrt(n)`` and fails.

``|T| <= sqrt(n)``, so below ``t^2`` images (29 for 3 channels) ``T`` can never
fail. A second rule covers few images: the check also fails when all of at least
:data:`MIN_UNANIMOUS` non-zero differences of a channel have one sign, which
unchanged data does with probability ``2^(1 - m)`` per test (``m`` non-zero
differences): under ``2 C 2^(1 - m)`` in all, 1e-5 from 22 images on, up to 4.7%
at 8 (a refit then costs fewer than 22 reads). ``benchmarks/bench_verify.py``
measures both rates on realistic data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TRACKED", "DEFAULT_VERIFY", "MAX_VERIFY", "FALSE_ALARM_BOUND", "Verification", "image_moments", "compare"]

TRACKED = 256
"""Images of a fit whose own mean and variance the cache entry keeps (chosen at random, a fixed seed)."""

DEFAULT_VERIFY = 64
"""Images read again to verify a cache hit when ``verify`` is not given."""

MAX_VERIFY = TRACKED

FALSE_ALARM_BOUND = 1e-5
"""Upper bound on the probability that unchanged data fails the check (all channels and both tests)."""

MIN_UNANIMOUS = 8
"""Fewest non-zero differences for which one sign for all of them fails the check."""

_TIE_RTOL = 1e-6  # differences below this fraction of the pooled std (var) are rounding: counted as zero


@dataclass(frozen=True)
class Verification:
    """What checking a cache entry against re-read images found."""

    samples: int
    passed: bool
    score: float
    """The largest ``|T|`` over channels and the two tests."""
    threshold: float
    detail: str
    """What did not match and how far; empty when it passed."""


def image_moments(image: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) variance of one image ``(..., C, H, W)``, float64 on the CPU."""
    channels = image.shape[-3]
    flat = image.detach().movedim(-3, 0).reshape(channels, -1).to("cpu", torch.float64)
    var, mean = torch.var_mean(flat, dim=1, correction=0)
    return mean, var


def threshold(channels: int) -> float:
    """``t`` with ``2 C * 2 exp(-t^2 / 2) = FALSE_ALARM_BOUND``."""
    return math.sqrt(2.0 * math.log(4.0 * channels / FALSE_ALARM_BOUND))


def min_samples(channels: int) -> int:
    """Fewer images than this can never fail the check (``|T| <= sqrt(n)``)."""
    return math.floor(threshold(channels) ** 2) + 1


def compare(
    stored_mean: Tensor, stored_var: Tensor, new_mean: Tensor, new_var: Tensor, pooled_mean: Tensor, pooled_var: Tensor
) -> Verification:
    """Test re-read images ``(n, C)`` against their stored moments ``(n, C)``; the pooled statistics give the scale."""
    samples, channels = stored_mean.shape
    limit = threshold(channels)
    if new_mean.shape != stored_mean.shape:
        detail = f"the images have {new_mean.shape[-1]} channels, the entry {channels}"
        return Verification(samples, False, math.inf, limit, detail)
    pooled_std = pooled_var.sqrt()
    tests = {
        "mean": (new_mean - stored_mean, pooled_std, pooled_std),
        "spread": (_spread(new_mean, new_var, pooled_mean) - _spread(stored_mean, stored_var, pooled_mean),
                   pooled_var, pooled_var),
    }
    score, failures = 0.0, []
    for name, (diff, scale, unit) in tests.items():
        diff = torch.where(diff.abs() <= _TIE_RTOL * scale + 1e-12 * pooled_mean.abs(), 0.0, diff)
        norm = diff.square().sum(dim=0).sqrt()
        t = torch.where(norm > 0, diff.sum(dim=0) / norm, 0.0)
        score = max(score, float(t.abs().max()))
        nonzero, positive = (diff != 0).sum(dim=0), (diff > 0).sum(dim=0)
        unanimous = (nonzero >= MIN_UNANIMOUS) & ((positive == 0) | (positive == nonzero))
        for channel in ((t.abs() > limit) | unanimous).nonzero().flatten().tolist():
            failures.append(_describe(name, channel, diff[:, channel], unit[channel], float(t[channel]), limit))
    return Verification(samples, not failures, score, limit, "; ".join(failures))


def _spread(mean: Tensor, var: Tensor, pooled_mean: Tensor) -> Tensor:
    return var + (mean - pooled_mean).square()


def _describe(name: str, channel: int, diff: Tensor, unit: Tensor, t: float, limit: float) -> str:
    higher = int((diff > 0).sum())
    what = "image means" if name == "mean" else "spreads about the mean"
    unit_name = "std" if name == "mean" else "variance"
    shift = float(diff.mean() / unit) if float(unit) > 0 else math.inf
    return (
        f"channel {channel}: the {what} are {'higher' if t > 0 else 'lower'} than stored in "
        f"{higher if t > 0 else int((diff < 0).sum())} of {diff.numel()} images, by {shift:+.3g} of the channel's "
        f"{unit_name} on average (test statistic {t:+.2f}, limit {limit:.2f})"
    )
