"""Float percentiles: within 0.1% in rank after one pass, exact after a second one (asked for, or needed).

Every expected number is numpy's ``np.percentile(..., method="linear")`` over the kept pixels' float32 values
in float64; real passes, real DataLoader workers, real cache files.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ranks import on_ranks
from torch.utils.data import Dataset

from torchnormfit import FitNormalize
from torchnormfit.reduce import batch_stats
from torchnormfit.statistics import MAX_RANK_ERROR
from torchnormfit.values import ValueCounts

Q = (0.5, 99.5)


class Narrow(Dataset):
    """Float32 images around 5 with a spread of 1e-4: nearly every pixel in one bucket of 2**-11 relative
    width, so one pass cannot place a percentile within 0.1% in rank. The first two rows are nodata (-1)."""

    def __init__(self, n: int = 24, seed: int = 0, noisy: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.images = 5 + 1e-4 * torch.randn(n, 3, 12, 12, generator=g)
        self.images[:, :, :2] = -1.0
        self.noisy = noisy

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.noisy:  # a random transform: the second pass sees other pixels
            image = image + 1e-4 * torch.randn(image.shape)
        return image


def numpy_percentiles(images: torch.Tensor, ignore: float | None = None) -> list[list[float]]:
    """``[[low per channel], [high per channel]]`` of numpy over each channel's kept float32 values."""
    out: list[list[float]] = [[], []]
    for c in range(images.shape[1]):
        pixels = images[:, c].double().numpy().ravel()
        if ignore is not None:
            pixels = pixels[pixels != ignore]
        for row, q in enumerate(Q):
            out[row].append(float(np.percentile(pixels, q)))
    return out


def test_one_pass_states_a_rank_error_above_the_promise_on_narrow_data():
    """The data has teeth: one pass's buckets hold far more than 0.1% of the pixels around each percentile."""
    data = Narrow()
    stats = batch_stats(data.images, ignore=-1.0, values=True)
    assert float(stats.values.rank_error(Q).min()) > MAX_RANK_ERROR
    low, high = stats.percentiles(Q).tolist()
    assert [low, high] != numpy_percentiles(data.images, ignore=-1.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_second_pass_makes_them_exact_where_one_pass_cannot_promise(tmp_path, workers):
    data = Narrow()
    norm = FitNormalize(cache=tmp_path, ignore=-1.0, clip=Q)
    norm.fit(data, batch_size=5, num_workers=workers, progress=False)
    assert [norm.clip_low, norm.clip_high] == numpy_percentiles(data.images, ignore=-1.0)
    assert float(norm.stats.values.rank_error(Q).max()) == 0.0
    # The refined counts are cached: the next run is a hit with the same exact numbers, and so is from_cache.
    again = FitNormalize(cache=tmp_path, ignore=-1.0, clip=Q).fit(data, num_workers=0, progress=False)
    assert again.fit_record.source == "cache"
    assert [again.clip_low, again.clip_high] == [norm.clip_low, norm.clip_high]
    loaded = FitNormalize.from_cache(tmp_path, norm.fit_record.key)
    assert loaded.stats.percentiles(Q).tolist() == [norm.clip_low, norm.clip_high]


def test_exact_percentiles_on_request_even_where_one_pass_is_within_the_promise(tmp_path):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(40, 2, 16, 16, generator=g) * 3

    class Smooth(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, index: int) -> torch.Tensor:
            return images[index]

    one_pass = FitNormalize(cache=None, clip=Q).fit(Smooth(), batch_size=7, num_workers=0, progress=False)
    assert float(one_pass.stats.values.rank_error(Q).max()) <= MAX_RANK_ERROR
    assert [one_pass.clip_low, one_pass.clip_high] != numpy_percentiles(images)  # interpolated in a bucket
    exact = FitNormalize(cache=tmp_path, clip=Q, exact_percentiles=True)
    exact.fit(Smooth(), batch_size=7, num_workers=0, progress=False)
    assert [exact.clip_low, exact.clip_high] == numpy_percentiles(images)
    assert "exact_percentiles=True" in repr(exact)
    kept = FitNormalize(cache=None, clip=Q, exact_percentiles=False).fit(Smooth(), num_workers=0, progress=False)
    assert [kept.clip_low, kept.clip_high] == [one_pass.clip_low, one_pass.clip_high]
    plain = FitNormalize(cache=tmp_path, clip=Q).fit(Smooth(), batch_size=7, num_workers=0, progress=False)
    assert plain.fit_record.source == "pass"  # another key: a cached exact fit is not a one-pass one


def test_window_counts_merge_to_the_same_whatever_the_batches():
    data = Narrow(n=10, seed=5)
    whole = batch_stats(data.images, values=True).values
    windows = whole.windows(Q)
    at_once = batch_stats(data.images, windows=(windows, whole.shift)).values
    pieces = [batch_stats(piece, windows=(windows, whole.shift)).values for piece in data.images.split(3)]
    merged = pieces[0]
    for piece in pieces[1:]:
        merged = merged.merge(piece)
    assert torch.equal(at_once.counts, merged.counts)
    low, high = data.images.amin(dim=(0, 2, 3)).double(), data.images.amax(dim=(0, 2, 3)).double()
    assert whole.refined(windows, merged).percentiles(Q, low, high).tolist() == numpy_percentiles(data.images)


def test_exact_percentiles_false_keeps_one_pass_and_states_its_rank_error():
    data = Narrow()
    norm = FitNormalize(cache=None, ignore=-1.0, clip=Q, exact_percentiles=False)
    norm.fit(data, num_workers=0, progress=False)
    assert float(norm.stats.values.rank_error(Q).max()) > MAX_RANK_ERROR
    truth = numpy_percentiles(data.images, ignore=-1.0)
    assert [norm.clip_low, norm.clip_high] != truth
    np.testing.assert_allclose([norm.clip_low, norm.clip_high], truth, rtol=2**-11)


def test_a_random_transform_keeps_the_one_pass_numbers_and_says_why():
    data = Narrow(noisy=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = FitNormalize(cache=None, ignore=-1.0, clip=Q).fit(data, num_workers=0, progress=False)
    assert any("did not give the same pixels twice" in str(w.message) for w in caught)
    assert norm.clip_low is not None and float(norm.stats.values.rank_error(Q).max()) > MAX_RANK_ERROR


def test_refined_counts_survive_pickling_and_arrays():
    data = Narrow(n=6)
    whole = batch_stats(data.images, values=True).values
    windows = whole.windows(Q)
    refined = whole.refined(windows, batch_stats(data.images, windows=(windows, whole.shift)).values)
    attrs, arrays = refined.to_arrays()
    back = ValueCounts.from_arrays(attrs, arrays)
    assert back.detail is not None and torch.equal(back.detail[1], refined.detail[1])
    low, high = data.images.amin(dim=(0, 2, 3)).double(), data.images.amax(dim=(0, 2, 3)).double()
    assert back.percentiles(Q, low, high).tolist() == refined.percentiles(Q, low, high).tolist()


def test_exact_percentiles_need_clip():
    with pytest.raises(ValueError, match="clip="):
        FitNormalize(exact_percentiles=True)


def _rank_fit(rank: int, world_size: int, workdir: str) -> list:
    norm = FitNormalize(cache=None, ignore=-1.0, clip=Q)
    norm.fit(Narrow(n=9), batch_size=2, num_workers=0, progress=False)
    return [norm.clip_low, norm.clip_high]


def test_two_gloo_ranks_get_the_exact_percentiles(tmp_path):
    """Each rank reads its shard in both passes; the window counts merge across ranks like the first ones."""
    results = on_ranks(tmp_path, _rank_fit)
    assert results[0] == results[1] == numpy_percentiles(Narrow(n=9).images, ignore=-1.0)


def test_float64_images_whose_values_round_to_minus_zero():
    """-1e-50 is -0.0 in float32: both passes put it where 0.0 is, so the second pass agrees with the first."""
    x = torch.tensor([0.0] * 10 + [-1e-50] * 10 + [1.0] * 10 + [-1.0] * 10, dtype=torch.float64).view(1, 1, 40, 1)
    first = batch_stats(x, values=True).values
    windows = first.windows([50.0])
    refined = first.refined(windows, batch_stats(x, windows=(windows, first.shift)).values)
    assert refined.percentiles([50.0], torch.tensor([-1.0]), torch.tensor([1.0])).tolist() == [[0.0]]


def test_too_many_channels_for_a_second_pass_say_so_before_it():
    images = 5 + 1e-4 * torch.randn(2, 1100, 4, 4, generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="in groups"):
        FitNormalize(cache=None, clip=Q, exact_percentiles=True).fit(list(images), num_workers=0, progress=False)
    with pytest.warns(UserWarning, match="in groups"):
        norm = FitNormalize(cache=None, clip=Q).fit(list(images), num_workers=0, progress=False)
    assert norm.clip_low is not None and len(norm.clip_low) == 1100


def test_an_empty_batch_in_the_second_pass_counts_nothing():
    windows = torch.tensor([[3, 4]])
    empty = batch_stats(torch.empty(0, 1, 4, 4), windows=(windows, 12))
    assert empty.values.kind == "window" and empty.values.counts.shape == (1, 2 << 12)
    full = batch_stats(torch.rand(2, 1, 4, 4), windows=(windows, 12))
    assert torch.equal(full.merge(empty).values.counts, full.values.counts)


def test_exact_percentiles_survive_the_state_dict_and_partial_fit_says_it_cannot():
    norm = FitNormalize(cache=None, clip=Q, exact_percentiles=True)
    with pytest.warns(UserWarning, match="not made exact"):
        norm.partial_fit(Narrow(n=4).images)
    copy = FitNormalize(cache=None, clip=Q)
    copy.load_state_dict(norm.state_dict())
    assert copy.exact_percentiles is True and copy.clip_low == norm.clip_low
