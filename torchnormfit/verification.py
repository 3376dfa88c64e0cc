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
images vary. The sign test is exact under the same symmetry: the number of
positive differences among the ``m`` non-zero ones is Binomial(m, 1/2), and it is
not thrown by a few huge differences (a ``ColorJitter`` applied to 10% of the
images) as ``T`` can be. A check fails when either test rejects; each test of the
``2 C`` (two statistics, ``C`` channels) runs at ``FALSE_ALARM_BOUND / (4 C)``, so
unchanged data fails a check with probability at most :data:`FALSE_ALARM_BOUND`.
A data change that shifts most differences one way fails it.

With few images neither test can reject at that level (``|T| <= sqrt(n)``; the
sign test needs about 21 non-zero differences). Below :func:`unanimous_at` images
(21 for 3 channels) a third rule fails a channel whose ``n >= 8`` differences are
all non-zero and of one sign, which unchanged data does with probability up to
``2 C 2^(1 - n)`` (4.7% at 8 images; a refit then costs fewer than 21 reads).
The spread is compared on a log scale (its differences are then far less
heavy-tailed).

Two stages (:func:`verify_in_stages`, from :data:`TWO_STAGES_FROM` images on):
half the images are read and tested first, at a tenth of the false-alarm bound
(:data:`FIRST_STAGE_SHARE`) and without the unanimous rule. A check that already
fails there fails; one that is clean there passes: every ``|T| <= 3``, every
sign-test p-value at least 0.01, and in each channel either every image came
back identical or none did (some identical and some not is what a change of
part of the data looks like under a deterministic pipeline). Anything else reads the rest and tests all of them at the other nine
tenths of the bound. The two tests' false alarms add up to at most
:data:`FALSE_ALARM_BOUND`; a change near the limit of what the whole check sees
may pass at the first stage a little more often than the whole check passes it.
``benchmarks/bench_verify.py`` measures the rates and the reads on realistic
data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TRACKED", "DEFAULT_VERIFY", "MAX_VERIFY", "FALSE_ALARM_BOUND", "Verification", "image_moments", "compare",
    "stages", "verify_in_stages",
]

TRACKED = 256
"""Images of a fit whose own mean and variance the cache entry keeps (chosen at random, a fixed seed)."""

DEFAULT_VERIFY = 64
"""Images read again to verify a cache hit when ``verify`` is not given."""

MAX_VERIFY = TRACKED

FALSE_ALARM_BOUND = 1e-5
"""Upper bound on the probability that unchanged data fails the check (all channels and both tests)."""

MIN_UNANIMOUS = 8
"""Fewest images for which, below :func:`unanimous_at`, differences all of one sign fail the check."""

TWO_STAGES_FROM = 48
"""From this many images on, a check reads and tests half of them first (see :func:`verify_in_stages`)."""

FIRST_STAGE_SHARE = 0.1
"""The share of FALSE_ALARM_BOUND the first stage's test runs at; the whole check runs at the rest. The first
stage is there to pass clean data early; a change it must fail on its own (every image moved) fails it far below
this level, and the check that reads everything keeps nearly the whole bound (and power)."""

EARLY_PASS_T = 3.0
EARLY_PASS_SIGN_P = 0.01
"""A first stage whose every ``|T|`` is at most EARLY_PASS_T and every sign-test p-value at least this passes."""

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
    sign_p: float = 1.0
    """The smallest sign-test p-value over channels and the two tests."""
    mixed: bool = False
    """Whether, in some channel and test, some images came back identical and others did not."""


def image_moments(image: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) variance of one image ``(..., C, H, W)``, float64 on the CPU."""
    channels = image.shape[-3]
    flat = image.detach().movedim(-3, 0).reshape(channels, -1).to("cpu", torch.float64)
    mean = flat.mean(dim=1)  # two passes: 5x faster than torch.var_mean in float64
    return mean, (flat - mean[:, None]).square_().mean(dim=1)


def _level(channels: int, bound: float = FALSE_ALARM_BOUND) -> float:
    """The level of each of the ``2 x 2C`` tests (T and sign, two statistics, C channels)."""
    return bound / (4.0 * channels)


def threshold(channels: int, bound: float = FALSE_ALARM_BOUND) -> float:
    """``t`` with ``2 exp(-t^2 / 2)`` equal to each test's level."""
    return math.sqrt(2.0 * math.log(2.0 / _level(channels, bound)))


def sign_p_value(positive: int, nonzero: int) -> float:
    """Two-sided exact p-value of ``positive`` successes in ``nonzero`` fair coin flips."""
    extreme = max(positive, nonzero - positive)
    tail = sum(math.comb(nonzero, k) for k in range(extreme, nonzero + 1)) / 2.0**nonzero
    return min(1.0, 2.0 * tail)


def unanimous_at(channels: int, bound: float = FALSE_ALARM_BOUND) -> int:
    """Below this many images the unanimous-sign rule applies: ``2 C 2^(1 - n) <= bound`` from here on."""
    return math.ceil(1 + math.log2(2 * channels / bound))


def stages(verify: int) -> tuple[int, ...]:
    """How many images have been read at each test of a check of ``verify`` images."""
    return (verify // 2, verify) if verify >= TWO_STAGES_FROM else (verify,)


def verify_in_stages(
    stored_mean: Tensor, stored_var: Tensor, measure: Callable[[int, int], tuple[Tensor, Tensor]],
    pooled_mean: Tensor, pooled_var: Tensor,
) -> Verification:
    """Check ``n`` images in :func:`stages`: ``measure(start, stop)`` reads images ``start:stop`` again and
    returns their moments ``(stop - start, C)`` (fewer if there are no more); the stored ones are ``(n, C)``.
    Stops after the first stage when it fails, or when it is far from failing."""
    plan = stages(stored_mean.shape[0])
    bounds = (FALSE_ALARM_BOUND,) if len(plan) == 1 else (
        FALSE_ALARM_BOUND * FIRST_STAGE_SHARE, FALSE_ALARM_BOUND * (1 - FIRST_STAGE_SHARE))
    means: list[Tensor] = []
    variances: list[Tensor] = []
    for start, stop, bound in zip((0, *plan), plan, bounds):
        mean, var = measure(start, stop)
        means.append(mean)
        variances.append(var)
        read = start + len(mean)  # fewer than asked when a stream ran dry
        if read == 0:
            limit = threshold(stored_mean.shape[1], bound)
            return Verification(0, False, math.inf, limit, "no image could be read again")
        result = compare(stored_mean[:read], stored_var[:read], torch.cat(means), torch.cat(variances),
                         pooled_mean, pooled_var, bound=bound, unanimous=len(plan) == 1)
        if not result.passed or _clearly_unchanged(result) or read < stop:
            break
    return result


def _clearly_unchanged(result: Verification) -> bool:
    return result.passed and result.score <= EARLY_PASS_T and result.sign_p >= EARLY_PASS_SIGN_P and not result.mixed


def compare(
    stored_mean: Tensor, stored_var: Tensor, new_mean: Tensor, new_var: Tensor, pooled_mean: Tensor, pooled_var: Tensor,
    bound: float = FALSE_ALARM_BOUND, unanimous: bool = True,
) -> Verification:
    """Test re-read images ``(n, C)`` against their stored moments ``(n, C)``; the pooled statistics give the scale.

    Unchanged data fails it with probability at most ``bound`` (plus the unanimous rule's share below
    :func:`unanimous_at` images, if ``unanimous``)."""
    samples, channels = stored_mean.shape
    limit = threshold(channels, bound)
    if new_mean.shape != stored_mean.shape:
        detail = f"the images have {new_mean.shape[-1]} channels, the entry {channels}"
        return Verification(samples, False, math.inf, limit, detail)
    floor = 1e-12 * pooled_var + torch.finfo(torch.float64).tiny  # a flat image at the mean has spread 0
    tests = {
        "mean": (new_mean - stored_mean, _TIE_RTOL * pooled_var.sqrt() + 1e-12 * pooled_mean.abs()),
        "spread": (_log_spread(new_mean, new_var, pooled_mean, floor)
                   - _log_spread(stored_mean, stored_var, pooled_mean, floor), _TIE_RTOL),
    }
    level, few = _level(channels, bound), unanimous and MIN_UNANIMOUS <= samples < unanimous_at(channels, bound)
    score, smallest_p, mixed, failures = 0.0, 1.0, False, []
    for name, (diff, tie) in tests.items():
        diff = torch.where(diff.abs() <= tie, 0.0, diff)
        norm = diff.square().sum(dim=0).sqrt()
        t = torch.where(norm > 0, diff.sum(dim=0) / norm, 0.0)
        score = max(score, float(t.abs().max()))
        nonzero, positive = (diff != 0).sum(dim=0).tolist(), (diff > 0).sum(dim=0).tolist()
        mixed = mixed or any(0 < count < samples for count in nonzero)
        for channel in range(channels):
            p = sign_p_value(positive[channel], nonzero[channel])
            smallest_p, signs = min(smallest_p, p), p <= level
            one_sign = few and nonzero[channel] == samples and positive[channel] in (0, samples)
            if not (abs(float(t[channel])) > limit or signs or one_sign):
                continue
            failures.append(_describe(name, channel, diff[:, channel], pooled_var[channel].sqrt(), float(t[channel]),
                                      limit))
    return Verification(samples, not failures, score, limit, "; ".join(failures), smallest_p, mixed)


def _log_spread(mean: Tensor, var: Tensor, pooled_mean: Tensor, floor: Tensor) -> Tensor:
    """log of the image's mean squared deviation from the pooled mean (its average is the pooled variance)."""
    return (var + (mean - pooled_mean).square() + floor).log()


def _describe(name: str, channel: int, diff: Tensor, std: Tensor, t: float, limit: float) -> str:
    higher, lower = int((diff > 0).sum()), int((diff < 0).sum())
    direction, count = ("higher", higher) if higher >= lower else ("lower", lower)
    if name == "mean":
        size = f"by {float(diff.mean() / std) if float(std) > 0 else math.inf:+.3g} of the channel's std on average"
        what = "image means"
    else:
        size = f"by a factor {math.exp(float(diff.mean())):.3g} on average"
        what = "spreads about the mean (std squared)"
    return (
        f"channel {channel}: the {what} are {direction} than stored in {count} of {diff.numel()} images, {size} "
        f"(T {t:+.2f}, limit {limit:.2f})"
    )
