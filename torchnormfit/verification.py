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
fail. A second rule covers few images: the check also fails when all the non-zero
differences of a channel, at least :func:`unanimous_at` of them (21 for 3 channels,
or all of fewer images, never fewer than 8), have one sign, which unchanged data
does with probability ``2^(1 - m)`` per test: under 1e-5 in all from 21 non-zero
differences on; up to ``2 C 2^(1 - n)`` when only ``n < 21`` images are read (a refit
then costs fewer than 21 reads). The spread is compared on a log scale (its
differences are then about as symmetric and far less heavy-tailed).
``benchmarks/bench_verify.py`` measures both rates on realistic data.
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


def unanimous_at(samples: int, channels: int) -> int:
    """Non-zero differences needed before one sign for all of them fails a channel.

    ``2 C 2^(1 - m) <= FALSE_ALARM_BOUND`` (21 for 3 channels), or all ``samples`` when
    fewer are read, but never fewer than :data:`MIN_UNANIMOUS`.
    """
    bound = math.ceil(1 + math.log2(2 * channels / FALSE_ALARM_BOUND))
    return max(MIN_UNANIMOUS, min(samples, bound))


def compare(
    stored_mean: Tensor, stored_var: Tensor, new_mean: Tensor, new_var: Tensor, pooled_mean: Tensor, pooled_var: Tensor
) -> Verification:
    """Test re-read images ``(n, C)`` against their stored moments ``(n, C)``; the pooled statistics give the scale."""
    samples, channels = stored_mean.shape
    limit = threshold(channels)
    if new_mean.shape != stored_mean.shape:
        detail = f"the images have {new_mean.shape[-1]} channels, the entry {channels}"
        return Verification(samples, False, math.inf, limit, detail)
    floor = 1e-12 * pooled_var + torch.finfo(torch.float64).tiny  # a flat image at the mean has spread 0
    tests = {
        "mean": (new_mean - stored_mean, _TIE_RTOL * pooled_var.sqrt() + 1e-12 * pooled_mean.abs()),
        "spread": (_log_spread(new_mean, new_var, pooled_mean, floor)
                   - _log_spread(stored_mean, stored_var, pooled_mean, floor), _TIE_RTOL),
    }
    needed = unanimous_at(samples, channels)
    score, failures = 0.0, []
    for name, (diff, tie) in tests.items():
        diff = torch.where(diff.abs() <= tie, 0.0, diff)
        norm = diff.square().sum(dim=0).sqrt()
        t = torch.where(norm > 0, diff.sum(dim=0) / norm, 0.0)
        score = max(score, float(t.abs().max()))
        nonzero, positive = (diff != 0).sum(dim=0), (diff > 0).sum(dim=0)
        unanimous = (nonzero >= needed) & ((positive == 0) | (positive == nonzero))
        for channel in ((t.abs() > limit) | unanimous).nonzero().flatten().tolist():
            failures.append(_describe(name, channel, diff[:, channel], pooled_var[channel].sqrt(), float(t[channel]),
                                      limit))
    return Verification(samples, not failures, score, limit, "; ".join(failures))


def _log_spread(mean: Tensor, var: Tensor, pooled_mean: Tensor, floor: Tensor) -> Tensor:
    """log of the image's mean squared deviation from the pooled mean (its average is the pooled variance)."""
    return (var + (mean - pooled_mean).square() + floor).log()


def _describe(name: str, channel: int, diff: Tensor, std: Tensor, t: float, limit: float) -> str:
    direction = "higher" if t > 0 else "lower"
    count = int((diff > 0).sum()) if t > 0 else int((diff < 0).sum())
    if name == "mean":
        size = f"by {float(diff.mean() / std) if float(std) > 0 else math.inf:+.3g} of the channel's std on average"
        what = "image means"
    else:
        size = f"by a factor {math.exp(float(diff.mean())):.3g} on average"
        what = "spreads about the mean (std squared)"
    return (
        f"channel {channel}: the {what} are {direction} than stored in {count} of {diff.numel()} images, {size} "
        f"(test statistic {t:+.2f}, limit {limit:.2f})"
    )
