"""The check of a cache hit (verification.py): the paired tests, and reading the images in two stages."""

import math

import pytest
import torch

from torchnormfit.verification import (
    EARLY_PASS_T,
    FALSE_ALARM_BOUND,
    FIRST_STAGE_SHARE,
    ROUNDING,
    compare,
    identical,
    image_moments,
    readings_per_image,
    stages,
    threshold,
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
    assert result.detail.startswith("of 32 images read again, ")
    assert f"channel 0's image means are {direction} than stored in 32," in result.detail


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


# --- the fit's second reading: deterministic entries and the noise test ------------------------------------------


def test_each_tracked_image_is_read_again_until_there_are_64_second_readings():
    assert readings_per_image(256) == readings_per_image(64) == 2
    assert readings_per_image(63) == 3 and readings_per_image(16) == 5 and readings_per_image(1) == 65


def test_readings_equal_up_to_rounding_make_a_deterministic_verdict():
    mean, var = stored(40)
    std = POOLED_VAR.sqrt()
    last_bits = (mean + 0.1 * ROUNDING * std, var * (1 + 0.1 * ROUNDING))
    assert identical([(mean, var), last_bits, (mean.clone(), var.clone())], POOLED_MEAN, POOLED_VAR)
    moved = mean.clone()
    moved[17, 2] += 3 * ROUNDING * std[2]  # one image, one channel
    assert not identical([(mean, var), (moved, var)], POOLED_MEAN, POOLED_VAR)
    spread = var.clone()
    spread[3, 0] *= 1 + 3 * ROUNDING
    assert not identical([(mean, var), (mean, var), (mean, spread)], POOLED_MEAN, POOLED_VAR)


def test_one_changed_image_fails_a_deterministic_entry_and_the_warning_names_the_test():
    mean, var = stored(64)
    new = mean.clone()
    new[40, 1] += 0.05  # one image of the first stage (44 on a deterministic entry)
    calls = []
    result = verify_in_stages(mean, var, reader(new, var, calls), POOLED_MEAN, POOLED_VAR, again=(mean, var),
                              deterministic=True)
    assert not result.passed and result.failed == ("identical",) and calls == [(0, 44)]
    assert result.detail.startswith("of 44 images read again, the identical test failed: ")
    assert "1 of 44 images read now differ" in result.detail
    assert "0.25 of the channel's std apart" in result.detail  # 0.05 / sqrt(0.04)
    entry_of_a_random_pipeline = verify_in_stages(mean, var, reader(new, var, []), POOLED_MEAN, POOLED_VAR,
                                                  again=(mean, var))
    assert entry_of_a_random_pipeline.passed  # the premise: only the verdict makes one image decisive


def test_a_deterministic_entry_reads_44_images_before_it_passes():
    """32 reads let a change of 10% of the images through in 3.4% of hits; 44 in at most 1% (0.9^44)."""
    assert stages(64, deterministic=True) == (44, 64) and stages(48, deterministic=True) == (44, 48)
    assert stages(256, deterministic=True) == (128, 256) and stages(40, deterministic=True) == (40,)
    mean, var = stored(64)
    calls = []
    rounded = (mean + 0.5 * ROUNDING * POOLED_VAR.sqrt(), var)  # last bits: a tie, not a change
    result = verify_in_stages(mean, var, reader(*rounded, calls), POOLED_MEAN, POOLED_VAR, again=(mean, var),
                              deterministic=True)
    assert result.passed and result.samples == 44 and calls == [(0, 44)]
    late = mean.clone()
    late[50, 0] += 0.05  # past the first stage: unseen by this hit, as the docs say
    assert verify_in_stages(mean, var, reader(late, var, []), POOLED_MEAN, POOLED_VAR, again=(mean, var),
                            deterministic=True).passed


def inverted(n, seed=0, noise=0.01):
    """Images read three times through a random crop (noise ``noise``), the third after every image was
    inverted (``x -> 1 - x``): the image means move both ways, by far more than the crop's noise."""
    gen = torch.Generator().manual_seed(seed)
    mean, var = stored(n, seed)

    def draw():
        return mean + noise * torch.randn(n, C, generator=gen, dtype=torch.float64)

    return (draw(), var), (draw(), var), (1.0 - draw(), var)


def test_inversion_passes_the_sum_and_sign_tests_but_fails_the_noise_test():
    first, second, now = inverted(64)
    today = verify_in_stages(*first, reader(*now, []), POOLED_MEAN, POOLED_VAR)
    assert today.passed  # the premise: the differences are symmetric about zero, so T and the sign test see nothing
    result = verify_in_stages(*first, reader(*now, []), POOLED_MEAN, POOLED_VAR, again=second)
    assert not result.passed and "noise" in result.failed
    assert "the noise test failed (32 of 32 images moved further from their stored value than the fit's own " \
           "second reading of them did" in result.detail


def test_the_noise_test_is_exact_under_no_change():
    """d = now - first and d0 = second - first are exchangeable: at a bound of 30% over 3 channels and 6 tests
    each (a level of 1.7%), unchanged data rejects about as often as that, not more."""
    gen = torch.Generator().manual_seed(7)
    rejected, trials = 0, 3000
    for _ in range(trials):
        noise = torch.distributions.StudentT(2.0).sample((3, 24, C)).double() * 0.01  # heavy tails, same law
        first = stored(24)[0]
        result = compare(first, POOLED_VAR.expand(24, C), first + noise[0], POOLED_VAR.expand(24, C),
                         POOLED_MEAN, POOLED_VAR, bound=0.3, unanimous=False,
                         again=(first + noise[1], POOLED_VAR.expand(24, C)))
        rejected += "noise" in result.failed
    del gen
    assert rejected / trials <= 0.3 / 6 * 1.3  # the noise tests' share of the bound, with room for sampling


def test_few_images_all_moved_one_way_fail_by_the_unanimous_rule_named_as_such():
    mean, var = stored(10)
    noise = 1e-3 * torch.rand(10, C, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 1e-4
    result = verify_in_stages(mean, var, reader(mean + noise, var, []), POOLED_MEAN, POOLED_VAR)
    assert not result.passed and result.failed == ("unanimous",)
    assert "the unanimous rule failed (all 10 images one way; with fewer than 21 images that fails)" in result.detail


def test_a_deterministic_entry_pairs_a_reordered_image_with_the_tracked_one_it_equals():
    """The parts of a ConcatDataset swapped: every image is still there, at another index."""
    mean, var = stored(64)
    order = torch.cat([torch.arange(32, 64), torch.arange(32)])
    reordered = reader(mean[order], var[order], [])
    plain = verify_in_stages(mean, var, reordered, POOLED_MEAN, POOLED_VAR, again=(mean, var), deterministic=True)
    assert not plain.passed and "identical" in plain.failed  # the premise: by index, every image changed
    paired = verify_in_stages(mean, var, reader(mean[order], var[order], []), POOLED_MEAN, POOLED_VAR,
                              again=(mean, var), deterministic=True, known=(mean, var))
    assert paired.passed and paired.samples == 44
    changed = mean[order].clone()
    changed[3] += 0.05  # one image that equals no tracked one
    caught = verify_in_stages(mean, var, reader(changed, var[order], []), POOLED_MEAN, POOLED_VAR,
                              again=(mean, var), deterministic=True, known=(mean, var))
    assert not caught.passed and "1 of 44 images read now differ" in caught.detail
