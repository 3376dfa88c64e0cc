"""torchnormfit.sampling: seeded subsets, jackknife standard errors, subset fits and pixel samples."""

from __future__ import annotations

import math

import pytest
import torch

from test_folder import tree  # noqa: F401 (a fixture)
from torchnormfit import ChannelStats
from torchnormfit.folder import ImageFiles, to_float_pipeline
from torchnormfit.sampling import fit_subset, jackknife, sample_pixels, subset_indices


def test_subset_indices_are_seeded_uniform_and_nested():
    first = subset_indices(1000, 100, seed=5)
    assert first == subset_indices(1000, 100, seed=5) != subset_indices(1000, 100, seed=6)
    assert len(set(first)) == 100 and all(0 <= i < 1000 for i in first)
    assert subset_indices(1000, 150, seed=5)[:100] == first
    assert sorted(subset_indices(10, 50, seed=0)) == list(range(10))
    with pytest.raises(ValueError):
        subset_indices(0, 5)


def test_jackknife_equals_the_closed_form_for_equal_groups():
    """For the mean of equal-size groups the jackknife is exactly sd(group means) / sqrt(G)."""
    groups = torch.rand(12, 3, 50, dtype=torch.float64) + torch.linspace(0, 1, 12, dtype=torch.float64)[:, None, None]
    errors = jackknife([ChannelStats.from_pixels(g) for g in groups])
    group_means = groups.mean(dim=2)
    expected = group_means.std(dim=0, unbiased=True) / math.sqrt(12)
    torch.testing.assert_close(errors.mean, expected, rtol=1e-10, atol=0)
    assert bool((errors.std > 0).all())
    assert bool(jackknife([ChannelStats.from_pixels(groups[0])]).mean.isnan().all())


def test_fit_subset_of_everything_has_zero_error(tree):
    dataset = ImageFiles(tree["root"] / "cat", transform=to_float_pipeline())
    (stats, num_samples, _, _), errors = fit_subset(dataset, 100, seed=0, num_workers=0, progress=False)
    assert num_samples == 3 and bool((errors.mean == 0).all()) and bool((errors.std == 0).all())
    pixels = sample_pixels(dataset, max_pixels=90, max_images=3)
    assert pixels.shape == (3, 90) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
