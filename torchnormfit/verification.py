"""Is a cache entry still right for this data? Paired tests on a few images' own statistics.

A fit keeps, for up to :data:`TRACKED` images, each image's per-channel mean and
variance (the entry's ``samples`` arrays), and reads each of them a second time
through the same pipeline (:data:`MIN_REREADS` readings at least): the second
reading is stored too, and whether every image came back identical decides if
the entry's pipeline is *deterministic*. A later hit reads some of those images
again and compares them, image by image, with what was stored. For each channel
two statistics are tested: the image's mean, and its spread about the entry's
pooled mean (``var + (mean - mu)^2``, whose pixel-weighted average is the pooled
variance; on a log scale), so a change of the mean or of the std is seen.

The tests, per channel and statistic, on the differences ``d = now - first``
and ``d0 = second - first`` (the fit's own two readings):

- **identical** (deterministic entries): the pipeline gave each image twice the
  same, so one re-read image whose moments differ beyond rounding
  (:data:`ROUNDING` of the pooled std) proves a change. A change of 10% of the
  images escapes ``n`` reads with probability ``0.9^n`` (1% at 44).
- **sum**: ``T = sum(d) / sqrt(sum(d^2))``. Under no change each ``d`` is
  symmetric about zero (two independent draws of one augmentation), and then
  ``P(|T| >= t) <= 2 exp(-t^2 / 2)`` (Hoeffding's inequality applied to random
  signs given ``|d|``; Efron 1969, "Student's t-test under symmetry
  conditions"), whatever the images look like.
- **sign**: the number of positive ``d`` among the ``m`` non-zero ones is
  Binomial(m, 1/2), exactly; a few huge differences (``ColorJitter`` on 10% of
  the images) cannot throw it as they can ``T``.
- **noise** (entries with a second reading): under no change ``d`` and ``d0``
  are exchangeable (the check's reading and the fit's second one are two
  independent draws alike), so ``|d| > |d0|`` in Binomial(m, 1/2) of the ``m``
  images where they differ, exactly, whatever the augmentation. A change that
  moves image means both ways (every image inverted, R and B swapped) leaves
  ``sum(d)`` near zero but makes ``|d|`` larger than the fit's own noise ``|d0|``
  in most images: this test sees it, one-sided.

Each of the ``k C`` tests (``k`` per channel: two statistics times sum, sign and,
with a second reading, noise) runs at ``bound / (k C)``, so unchanged data fails a
check with probability at most :data:`FALSE_ALARM_BOUND` (plus, for a
deterministic entry, the chance that its verdict was wrong: see below).

With few images neither test can reject at that level (``|T| <= sqrt(n)``; the
sign test needs about 21 non-zero differences). Below :func:`unanimous_at` images
(21 for 3 channels) a further rule fails a channel whose ``n >= 8`` differences are
all non-zero and of one sign, which unchanged data does with probability up to
``2 C 2^(1 - n)`` (4.7% at 8 images; a refit then costs fewer than 21 reads).

Two stages (:func:`verify_in_stages`, from :data:`TWO_STAGES_FROM` images on):
half the images are read and tested first, at a tenth of the false-alarm bound
(:data:`FIRST_STAGE_SHARE`) and without the unanimous rule. A check that already
fails there fails; one that is clean there passes: every ``|T| <= 3``, every
sign-test p-value at least 0.01, in each channel either every image came back
identical or none did (some identical and some not is what a change of part of
the data looks like under a deterministic pipeline). On a deterministic entry the
first stage reads at least :data:`DETERMINISTIC_READS` images (44 of 64): the
identical test needs reads, not a larger sum (a 10% change escapes 32 reads in
3.4% of hits, 44 in at most 1%). Anything else reads the rest and tests all of them at
the other nine tenths of the bound.

A wrong deterministic verdict (a discrete augmentation whose no-op branch came up
in every one of the fit's second readings, such as ``RandomGrayscale(p=0.1)``:
``0.82^64 = 3e-6``) makes the next hit fail and refit once; the refit stores a new
verdict. ``benchmarks/bench_verify.py`` measures the rates and the reads;
docs/verification.md explains what the check can and cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_VERIFY",
    "FALSE_ALARM_BOUND",
    "MAX_VERIFY",
    "MIN_REREADS",
    "ROUNDING",
    "TRACKED",
    "Verification",
    "compare",
    "identical",
    "image_moments",
    "readings_per_image",
    "stages",
    "threshold",
    "verify_in_stages",
]

TRACKED = 256
"""Images of a fit whose own mean and variance the cache entry keeps (chosen at random, a fixed seed)."""

DEFAULT_VERIFY = 64
"""Images read again to verify a cache hit when ``verify`` is not given."""

MAX_VERIFY = TRACKED

MIN_REREADS = 64
"""Second readings a fit makes at least (of the tracked images, each more than once when fewer are tracked): a
random pipeline whose images come back identical 82% of the time (``RandomGrayscale(p=0.1)``) looks deterministic
after 64 of them with probability 3e-6."""

FALSE_ALARM_BOUND = 1e-5
"""Upper bound on the probability that unchanged data fails the check (all channels and tests)."""

ROUNDING = 1e-4
"""Differences of an image's moments up to this fraction of the pooled std (of the log spread: up to this much)
are rounding, not a change: thread counts, CPUs and a cache on a network drive shared by machines move the last
bits. Such differences are ties (zero) in every test: under a deterministic pipeline a last-bit shift of every
image would otherwise be all of one sign."""

MIN_UNANIMOUS = 8
"""Fewest images for which, below :func:`unanimous_at`, differences all of one sign fail the check."""

TWO_STAGES_FROM = 48
"""From this many images on, a check reads and tests half of them first (see :func:`verify_in_stages`)."""

DETERMINISTIC_READS = 44
"""Fewest images a check of a deterministic entry reads before it passes (when ``verify`` asks for more): a change
of 10% of the images escapes 44 reads in at most 1% of hits (``0.9^44``; 0.6-0.7% when 44 of 256 tracked images
are drawn), 32 in 3.4%."""

FIRST_STAGE_SHARE = 0.1
"""The share of FALSE_ALARM_BOUND the first stage's test runs at; the whole check runs at the rest. The first
stage is there to pass clean data early; a change it must fail on its own (every image moved) fails it far below
this level, and the check that reads everything keeps nearly the whole bound (and power)."""

EARLY_PASS_T = 3.0
EARLY_PASS_SIGN_P = 0.01
"""A first stage whose every ``|T|`` is at most EARLY_PASS_T and every sign-test p-value at least this passes."""

@dataclass(frozen=True)
class Verification:
    """What checking a cache entry against re-read images found."""

    samples: int
    passed: bool
    score: float
    """The largest ``|T|`` over channels and statistics."""
    threshold: float
    detail: str
    """What did not match, naming each test that failed and its numbers; empty when it passed."""
    sign_p: float = 1.0
    """The smallest p-value of the sign and noise tests over channels and statistics."""
    mixed: bool = False
    """Whether, in some channel and statistic, some images came back identical and others did not."""
    failed: tuple[str, ...] = ()
    """The tests that failed: ``"identical"``, ``"sum"``, ``"sign"``, ``"noise"``, ``"unanimous"``, ``"channels"``,
    ``"read"`` (no image could be read)."""


def image_moments(image: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) variance of one image ``(..., C, H, W)``, float64 on the CPU."""
    channels = image.shape[-3]
    flat = image.detach().movedim(-3, 0).reshape(channels, -1).to("cpu", torch.float64)
    mean = flat.mean(dim=1)  # two passes: 5x faster than torch.var_mean in float64
    return mean, (flat - mean[:, None]).square_().mean(dim=1)


def readings_per_image(tracked: int) -> int:
    """How many times a fit reads each of ``tracked`` images: once, plus enough second readings that there are
    :data:`MIN_REREADS` of them in all (2 from 64 tracked images on; 5 for 16)."""
    return 1 + max(1, math.ceil(MIN_REREADS / max(1, tracked)))


def identical(
    readings: Sequence[tuple[Tensor, Tensor]], pooled_mean: Tensor, pooled_var: Tensor
) -> bool:
    """Whether every reading ``(mean, var)``, each ``(n, C)``, equals the first up to :data:`ROUNDING`: the fit's
    verdict that the pipeline is deterministic."""
    first = readings[0]
    return all(not bool(_changed_rows(first, other, pooled_mean, pooled_var).any()) for other in readings[1:])


def _changed_rows(
    stored: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], pooled_mean: Tensor, pooled_var: Tensor
) -> Tensor:
    """Per row, whether ``new`` differs from ``stored`` beyond rounding in some channel's mean or spread."""
    mean, spread = _statistics(*stored, *new, pooled_mean, pooled_var, None)
    return ((mean.diff != 0) | (spread.diff != 0)).any(dim=1)


def _level(channels: int, bound: float = FALSE_ALARM_BOUND, per_statistic: int = 2) -> float:
    """The level of each test: ``per_statistic`` tests of two statistics in each of ``channels``."""
    return bound / (2.0 * per_statistic * channels)


def threshold(channels: int, bound: float = FALSE_ALARM_BOUND, per_statistic: int = 2) -> float:
    """``t`` with ``2 exp(-t^2 / 2)`` equal to each test's level."""
    return math.sqrt(2.0 * math.log(2.0 / _level(channels, bound, per_statistic)))


def sign_p_value(positive: int, nonzero: int) -> float:
    """Two-sided exact p-value of ``positive`` successes in ``nonzero`` fair coin flips."""
    return min(1.0, 2.0 * _upper_tail(max(positive, nonzero - positive), nonzero))


def _upper_tail(successes: int, trials: int) -> float:
    """``P(Binomial(trials, 1/2) >= successes)``."""
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2.0**trials


def unanimous_at(channels: int, bound: float = FALSE_ALARM_BOUND) -> int:
    """Below this many images the unanimous-sign rule applies: ``2 C 2^(1 - n) <= bound`` from here on."""
    return math.ceil(1 + math.log2(2 * channels / bound))


def stages(verify: int, deterministic: bool = False) -> tuple[int, ...]:
    """How many images have been read at each test of a check of ``verify`` images (of a ``deterministic``
    entry: at least :data:`DETERMINISTIC_READS` in the first)."""
    if verify < TWO_STAGES_FROM:
        return (verify,)
    first = max(verify // 2, DETERMINISTIC_READS) if deterministic else verify // 2
    return (first, verify) if first < verify else (verify,)


def verify_in_stages(
    stored_mean: Tensor, stored_var: Tensor, measure: Callable[[int, int], tuple[Tensor, Tensor]],
    pooled_mean: Tensor, pooled_var: Tensor, *, again: tuple[Tensor, Tensor] | None = None,
    deterministic: bool = False, known: tuple[Tensor, Tensor] | None = None,
) -> Verification:
    """Check ``n`` images in :func:`stages`: ``measure(start, stop)`` reads images ``start:stop`` again and
    returns their moments ``(stop - start, C)`` (fewer if there are no more); the stored ones are ``(n, C)``, and
    ``again`` the fit's second reading of the same images. Stops after the first stage when it fails, or when it is
    far from failing.

    ``known``: every tracked image's stored moments, on a deterministic entry. A re-read image that is not the one
    stored at its place but equals another tracked image is paired with that one: the data was reordered (the parts
    of a ``ConcatDataset``), not changed."""
    plan = stages(stored_mean.shape[0], deterministic)
    if deterministic and known is not None:
        stored_mean, stored_var = stored_mean.clone(), stored_var.clone()
        measure = _pairing(measure, stored_mean, stored_var, known, pooled_mean, pooled_var)
        again = None if again is None else (stored_mean, stored_var)
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
            return Verification(0, False, math.inf, limit, "no image could be read again", failed=("read",))
        result = compare(stored_mean[:read], stored_var[:read], torch.cat(means), torch.cat(variances),
                         pooled_mean, pooled_var, bound=bound, unanimous=len(plan) == 1,
                         again=None if again is None else (again[0][:read], again[1][:read]),
                         deterministic=deterministic)
        if not result.passed or _clearly_unchanged(result) or read < stop:
            break
    return result


def _pairing(
    measure: Callable[[int, int], tuple[Tensor, Tensor]], stored_mean: Tensor, stored_var: Tensor,
    known: tuple[Tensor, Tensor], pooled_mean: Tensor, pooled_var: Tensor,
) -> Callable[[int, int], tuple[Tensor, Tensor]]:
    """``measure``, pairing each re-read image that differs from its stored row with a known image it equals
    (``stored_mean``/``stored_var`` rows are replaced in place)."""

    def paired(start: int, stop: int) -> tuple[Tensor, Tensor]:
        mean, var = measure(start, stop)
        rows = slice(start, start + len(mean))
        moved = _changed_rows((stored_mean[rows], stored_var[rows]), (mean, var), pooled_mean, pooled_var)
        for offset in moved.nonzero().flatten().tolist():
            one = (mean[offset].expand_as(known[0]), var[offset].expand_as(known[1]))
            equal = (~_changed_rows(known, one, pooled_mean, pooled_var)).nonzero().flatten()
            if len(equal):
                stored_mean[start + offset], stored_var[start + offset] = known[0][equal[0]], known[1][equal[0]]
        return mean, var

    return paired


def _clearly_unchanged(result: Verification) -> bool:
    return result.passed and result.score <= EARLY_PASS_T and result.sign_p >= EARLY_PASS_SIGN_P and not result.mixed


@dataclass(frozen=True)
class _Statistic:
    """One statistic of one channel, as the tests see it."""

    name: str
    diff: Tensor
    """``now - first`` per image, rounding set to zero."""
    base: Tensor | None
    """``second - first`` per image (the fit's own noise), if stored."""
    tie: Tensor | float


def compare(
    stored_mean: Tensor, stored_var: Tensor, new_mean: Tensor, new_var: Tensor, pooled_mean: Tensor, pooled_var: Tensor,
    bound: float = FALSE_ALARM_BOUND, unanimous: bool = True, *, again: tuple[Tensor, Tensor] | None = None,
    deterministic: bool = False,
) -> Verification:
    """Test re-read images ``(n, C)`` against their stored moments ``(n, C)``; the pooled statistics give the scale,
    ``again`` (the fit's second reading) the noise, ``deterministic`` whether any difference is a change.

    Unchanged data fails it with probability at most ``bound`` (plus the unanimous rule's share below
    :func:`unanimous_at` images, if ``unanimous``)."""
    samples, channels = stored_mean.shape
    per_statistic = 2 if again is None else 3
    limit, level = threshold(channels, bound, per_statistic), _level(channels, bound, per_statistic)
    if new_mean.shape != stored_mean.shape:
        detail = f"the images read again have {new_mean.shape[-1]} channels, the entry {channels}"
        return Verification(samples, False, math.inf, limit, detail, failed=("channels",))
    failures: list[str] = []
    failed: list[str] = []
    if deterministic:
        changed = _changed_rows((stored_mean, stored_var), (new_mean, new_var), pooled_mean, pooled_var)
        if bool(changed.any()):
            failures.append(_describe_identical(stored_mean, new_mean, changed, pooled_var.sqrt()))
            failed.append("identical")
    few = unanimous and MIN_UNANIMOUS <= samples < unanimous_at(channels, bound)
    score, smallest_p, mixed = 0.0, 1.0, False
    for statistic in _statistics(stored_mean, stored_var, new_mean, new_var, pooled_mean, pooled_var, again):
        diff = statistic.diff
        norm = diff.square().sum(dim=0).sqrt()
        t = torch.where(norm > 0, diff.sum(dim=0) / norm, 0.0)
        score = max(score, float(t.abs().max()))
        nonzero, positive = (diff != 0).sum(dim=0).tolist(), (diff > 0).sum(dim=0).tolist()
        mixed = mixed or any(0 < count < samples for count in nonzero)
        louder = None if statistic.base is None else _louder(diff, statistic.base, statistic.tie)
        for channel in range(channels):
            one_sign = few and nonzero[channel] == samples and positive[channel] in (0, samples)
            tests, p = _channel_tests(float(t[channel]), positive[channel], nonzero[channel],
                                      None if louder is None else (louder[0][channel], louder[1][channel]),
                                      limit, level, unanimous_at(channels, bound) if one_sign else None)
            smallest_p = min(smallest_p, p)
            if tests:
                failed.extend(name for name, _ in tests if name not in failed)
                failures.append(_describe(statistic.name, channel, diff[:, channel], pooled_var[channel].sqrt(),
                                          [text for _, text in tests]))
    detail = f"of {samples} images read again, " + _listed(failures) if failures else ""
    return Verification(samples, not failures, score, limit, detail, smallest_p, mixed, tuple(failed))


def _channel_tests(
    t: float, positive: int, nonzero: int, louder: tuple[int, int] | None, limit: float, level: float,
    unanimous_below: int | None,
) -> tuple[list[tuple[str, str]], float]:
    """The tests one channel's statistic failed, each ``(name, what it found in words)``, and the smallest
    p-value of its sign and noise tests; ``unanimous_below``: the unanimous rule fired (fewer images than that)."""
    tests: list[tuple[str, str]] = []
    if abs(t) > limit:
        tests.append(("sum", f"the sum test failed (T = {t:+.2f}; it fails beyond {limit:.2f} either way)"))
    p = sign_p_value(positive, nonzero)
    if p <= level:
        way = max(positive, nonzero - positive)
        tests.append(("sign", f"the sign test failed ({way} of {nonzero} differing images one way: p = {p:.2g}; "
                              f"it fails at {level:.2g} or less)"))
    if louder is not None:
        larger, differing = louder
        noise_p = _upper_tail(larger, differing)
        p = min(p, noise_p)
        if noise_p <= level:
            tests.append(("noise", f"the noise test failed ({larger} of {differing} images moved further from their "
                                   f"stored value than the fit's own second reading of them did: p = {noise_p:.2g}; "
                                   f"it fails at {level:.2g} or less)"))
    if unanimous_below is not None:
        tests.append(("unanimous", f"the unanimous rule failed (all {nonzero} images one way; with fewer than "
                                   f"{unanimous_below} images that fails)"))
    return tests, p


_LISTED = 3  # findings a warning spells out; the rest are counted


def _listed(failures: list[str]) -> str:
    more = len(failures) - _LISTED
    return "; ".join(failures[:_LISTED]) + (f"; and {more} more (channels and statistics) like these" if more > 0
                                            else "")


def _statistics(
    stored_mean: Tensor, stored_var: Tensor, new_mean: Tensor, new_var: Tensor, pooled_mean: Tensor, pooled_var: Tensor,
    again: tuple[Tensor, Tensor] | None,
) -> list[_Statistic]:
    """The image means and log spreads as differences from the stored ones, ties (rounding) set to zero."""
    mean_tie = ROUNDING * pooled_var.sqrt() + 1e-12 * pooled_mean.abs()
    first_spread = _log_spread(stored_mean, stored_var, pooled_mean, pooled_var)
    spread = _log_spread(new_mean, new_var, pooled_mean, pooled_var) - first_spread
    found = [_Statistic("mean", _untie(new_mean - stored_mean, mean_tie), None, mean_tie),
             _Statistic("spread", _untie(spread, ROUNDING), None, ROUNDING)]
    if again is None:
        return found
    bases = (again[0] - stored_mean, _log_spread(*again, pooled_mean, pooled_var) - first_spread)
    return [_Statistic(s.name, s.diff, _untie(base, s.tie), s.tie) for s, base in zip(found, bases)]


def _untie(diff: Tensor, tie: Tensor | float) -> Tensor:
    return torch.where(diff.abs() <= tie, 0.0, diff)


def _louder(diff: Tensor, base: Tensor, tie: Tensor | float) -> tuple[list[int], list[int]]:
    """Per channel: in how many images ``|diff| > |base|``, and in how many they differ (beyond ``tie``)."""
    gap = _untie(diff.abs() - base.abs(), tie)
    return (gap > 0).sum(dim=0).tolist(), (gap != 0).sum(dim=0).tolist()


def _log_spread(mean: Tensor, var: Tensor, pooled_mean: Tensor, pooled_var: Tensor) -> Tensor:
    """log of the image's mean squared deviation from the pooled mean (its average is the pooled variance)."""
    floor = 1e-12 * pooled_var + torch.finfo(torch.float64).tiny  # a flat image at the mean has spread 0
    return (var + (mean - pooled_mean).square() + floor).log()


def _describe(name: str, channel: int, diff: Tensor, std: Tensor, tests: list[str]) -> str:
    higher, lower = int((diff > 0).sum()), int((diff < 0).sum())
    direction, count = ("higher", higher) if higher >= lower else ("lower", lower)
    if name == "mean":
        scale = float(std) if float(std) > 0 else math.nan
        average, typical = float(diff.mean()) / scale, float(diff.abs().mean()) / scale
        what, size = "image means", f"by {average:+.3g} of the channel's std on average"
    else:
        average, typical = float(diff.mean()), float(diff.abs().mean())
        what, size = "spreads about the mean (std squared)", f"by a factor {math.exp(average):.3g} on average"
    if abs(average) < typical / 2:  # they moved both ways: say how far
        size += f" ({typical:.3g} apart ignoring the direction)" if name == "mean" else (
            f" (a factor {math.exp(typical):.3g} apart ignoring the direction)")
    return f"channel {channel}'s {what} are {direction} than stored in {count}, {size}: " + " and ".join(tests)


def _describe_identical(stored_mean: Tensor, new_mean: Tensor, changed: Tensor, std: Tensor) -> str:
    moved = ((new_mean - stored_mean).abs() / std.clamp_min(torch.finfo(torch.float64).tiny))[changed]
    largest = float(moved.max()) if moved.numel() else 0.0
    return (
        f"the identical test failed: the fit read every image twice and got the same image (a deterministic "
        f"pipeline), but {int(changed.sum())} of {changed.numel()} images read now differ from their stored "
        f"moments (image means up to {largest:.3g} of the channel's std apart)"
    )
