"""The check of a cache hit (verification.py): the paired tests, and reading the images in two stages."""

import math

import pytest
import torch

from torchnormfit.verification import (
    EARLY_PASS_T, FALSE_ALARM_BOUND, FIRST_STAGE_SHARE, compare, image_moments, stages, threshold,
    verify_in_stages,
)

C = 3
POOLED_MEAN, POOLED_VAR = torch.full((C,), 0.5, dtype=torch.float64), torch.full((C,), 0.04, dtype=torch.float64)


def stored(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = 0.5 + 0.1 * torch.randn(n, C, generator=gen, dtype=torch.float64)
    var = 0.03 + 0.01 * torch.rand(n, C, generator=gen, dtype=torch.float64)
    return mean, var


def reader(mean, var, calls):
    def measure(start, stop):
        calls.append((start, stop))
        return mean[start:stop], var[start:stop]
    return measure


def test_stages_split_from_48_images_on():
    assert stages(16) == (16,) and stages(47) == (47,)
    assert stages(48) == (24, 48) and stages(64) == (32, 64) and stages(256) == (128, 256)


def test_unchanged_images_pass_after_the_first_stage():
    mean, var = stored(64)
    calls = []
    result = verify_in_stages(mean, var, reader(mean, var, calls), POOLED_MEAN, POOLED_VAR)
    assert result.passed and result.samples == 32 and calls == [(0, 32)]


@pytest.mark.parametrize("shift", [0.02, -0.1])
def test_a_shift_of_every_image_fails_in_the_first_stage(shift):
    mean, var = stored(64)
    calls = []
    result = verify_in_stages(mean, var, reader(mean + shift, var, calls), POOLED_MEAN, POOLED_VAR)
    assert not result.passed and result.samples == 32 and calls == [(0, 32)]
    direction = "higher" if shift > 0 else "lower"
    assert f"channel 0: the image means are {direction} than stored in 32 of 32" in result.detail


def test_a_first_stage_near_its_limit_reads_the_second_and_decides_on_all():
    mean, var = stored(64)
    noise = torch.randn(64, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-3
    suspicious = noise + 6e-4  # a small shift: T ~ 3.4 on 32 images, beyond the early pass, within the limit
    calls = []
    result = verify_in_stages(mean, var, reader(mean + suspicious, var, calls), POOLED_MEAN, POOLED_VAR)
    first = compare(mean[:32], var[:32], mean[:32] + suspicious[:32], var[:32], POOLED_MEAN, POOLED_VAR,
                    bound=FALSE_ALARM_BOUND * FIRST_STAGE_SHARE)
    assert first.passed and first.score > EARLY_PASS_T  # the premise: stage one neither passes nor fails
    assert calls == [(0, 32), (32, 64)] and result.samples == 64
    whole = compare(mean, var, mean + suspicious, var, POOLED_MEAN, POOLED_VAR,
                    bound=FALSE_ALARM_BOUND * (1 - FIRST_STAGE_SHARE))
    assert (result.passed, result.score) == (whole.passed, whole.score)


def test_the_stages_share_the_false_alarm_bound():
    mean, var = stored(64)
    first = verify_in_stages(mean, var, reader(mean, var, []), POOLED_MEAN, POOLED_VAR)
    assert first.samples == 32
    assert first.threshold == pytest.approx(threshold(C, FALSE_ALARM_BOUND * FIRST_STAGE_SHARE))
    noisy = mean + 1e-3 * torch.randn(64, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 6e-4
    both = verify_in_stages(mean, var, reader(noisy, var, []), POOLED_MEAN, POOLED_VAR)
    assert both.samples == 64
    assert both.threshold == pytest.approx(threshold(C, FALSE_ALARM_BOUND * (1 - FIRST_STAGE_SHARE)))
    assert threshold(C, FALSE_ALARM_BOUND * FIRST_STAGE_SHARE) > threshold(C, FALSE_ALARM_BOUND * 0.9) > threshold(C)
    single = verify_in_stages(mean[:40], var[:40], reader(mean, var, []), POOLED_MEAN, POOLED_VAR)
    assert single.threshold == pytest.approx(threshold(C))


def test_a_stream_that_ran_dry_is_tested_on_what_it_gave_and_an_empty_one_fails():
    mean, var = stored(64)
    short = verify_in_stages(mean, var, lambda a, b: (mean[a:min(b, 20)], var[a:min(b, 20)]), POOLED_MEAN, POOLED_VAR)
    assert short.passed and short.samples == 20
    empty = verify_in_stages(mean, var, lambda a, b: (mean[:0], var[:0]), POOLED_MEAN, POOLED_VAR)
    assert not empty.passed and empty.samples == 0 and empty.detail == "no image could be read again"
    assert math.isinf(empty.score)


def test_image_moments_are_the_float64_population_moments():
    image = torch.rand(3, 17, 9, dtype=torch.float32) * 255
    mean, var = image_moments(image)
    exact = image.double().reshape(3, -1)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, exact.mean(dim=1), rtol=1e-15, atol=0)
    torch.testing.assert_close(var, exact.var(dim=1, correction=0), rtol=1e-12, atol=0)
    channels_last = image_moments(image.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    torch.testing.assert_close(channels_last[0], mean, rtol=1e-15, atol=0)


def test_part_of_the_data_changed_under_a_deterministic_pipeline_reads_the_second_stage():
    """7 of the first 32 images moved by a whole std, the rest identical: T is sqrt(7) and the sign test's p
    0.016 on the first stage, which would pass there on those alone; identical and changed images side by side
    do not."""
    mean, var = stored(64)
    moved = torch.zeros(64, C, dtype=torch.float64)
    moved[:7] = moved[32:57] = POOLED_VAR.sqrt()  # 32 of 64 images: the channel mean moves by half a std
    calls = []
    result = verify_in_stages(mean, var, reader(mean + moved, var, calls), POOLED_MEAN, POOLED_VAR)
    first = compare(mean[:32], var[:32], mean[:32] + moved[:32], var[:32], POOLED_MEAN, POOLED_VAR,
                    bound=FALSE_ALARM_BOUND * FIRST_STAGE_SHARE)
    assert first.passed and first.score == pytest.approx(7**0.5) and first.sign_p > 0.01 and first.mixed  # premise
    assert calls == [(0, 32), (32, 64)] and not result.passed and result.samples == 64


def test_the_first_stage_never_fails_by_the_unanimous_rule():
    """With 64 channels that rule is only safe from 26 images on; a first stage of 24 must not use it."""
    channels = 64
    mean = 0.5 + 0.1 * torch.randn(48, channels, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    var = torch.full((48, channels), 0.03, dtype=torch.float64)
    pooled = torch.full((channels,), 0.5, dtype=torch.float64), torch.full((channels,), 0.04, dtype=torch.float64)
    noise = 1e-3 * torch.randn(48, channels, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise[:24, 0] = noise[:24, 0].abs() + 1e-4  # 24 differences of one sign on channel 0, the rest symmetric
    noise[24:, 0] = torch.randn(24, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1e-3
    alone = compare(mean[:24], var[:24], mean[:24] + noise[:24], var[:24], *pooled,
                    bound=FALSE_ALARM_BOUND * FIRST_STAGE_SHARE)
    assert not alone.passed  # the premise: with the rule, the first stage would fail
    calls = []
    result = verify_in_stages(mean, var, reader(mean + noise, var, calls), *pooled)
    assert calls == [(0, 24), (24, 48)] and result.samples == 48
