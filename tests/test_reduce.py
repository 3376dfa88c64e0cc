"""batch_stats with masks, ignored values, integer images, volumes, many bands, and percentiles.

Every expected number comes from numpy in float64 on the kept pixels (``np.percentile(..., method="linear")``
for percentiles), never from the library.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchnormfit import ChannelStats
from torchnormfit.reduce import batch_stats
from torchnormfit.values import MAX_BINS, ValueCounts

Q = (0.0, 0.5, 1.0, 25.0, 50.0, 99.5, 100.0)


def kept_pixels(x: torch.Tensor, *, ignore=None, mask=None, spatial_dims: int = 2) -> list[np.ndarray]:
    """Per channel, the float64 pixels numpy keeps: mask true, not the ignored value, not NaN if NaN is."""
    a = x.double().numpy()
    channels = a.shape[-spatial_dims - 1]
    a = a.reshape(-1, channels, int(np.prod(a.shape[a.ndim - spatial_dims:])))
    m = np.ones_like(a, dtype=bool)
    if mask is not None:
        mm = np.asarray(mask).astype(bool)
        mm = np.broadcast_to(mm.reshape((-1,) + mm.shape[-spatial_dims - 1:]), (a.shape[0], mm.shape[-spatial_dims - 1])
                             + mm.shape[mm.ndim - spatial_dims:])
        m &= np.broadcast_to(mm.reshape(a.shape[0], -1, a.shape[2]), a.shape)
    if ignore is not None:
        values = np.broadcast_to(np.asarray(ignore, dtype=np.float64).reshape(-1), (channels,))
        for c, v in enumerate(values):
            m[:, c] &= ~np.isnan(a[:, c]) if math.isnan(v) else a[:, c] != v
    return [a[:, c][m[:, c]] for c in range(channels)]


def assert_stats(stats: ChannelStats, pixels: list[np.ndarray], tol: float) -> None:
    """Count, min and max exactly; mean (relative to |mean| + std) and std within ``tol``; numpy float64."""
    for c, p in enumerate(pixels):
        assert stats.count[c].item() == p.size, c
        if p.size == 0:
            continue
        mean, std = p.mean(), p.std()
        assert abs(stats.mean[c].item() - mean) <= tol * (abs(mean) + std), (c, stats.mean[c].item(), mean)
        assert abs(stats.std[c].item() - std) <= tol * std + 1e-300, (c, stats.std[c].item(), std)
        assert stats.min[c].item() == p.min() and stats.max[c].item() == p.max()


def merged(parts) -> ChannelStats:
    total = None
    for part in parts:
        total = part if total is None else total.merge(part)
    return total


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def integers(dtype: torch.dtype, shape, seed: int, low=None, high=None) -> torch.Tensor:
    info = torch.iinfo(dtype)
    low = info.min if low is None else low
    high = info.max if high is None else high
    return torch.randint(low, high + 1, shape, generator=gen(seed), dtype=torch.int64).to(dtype)


# --- integers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32])
def test_integer_images_in_their_own_units_are_exact(dtype):
    low, high = (-3000, 3000) if dtype == torch.int32 else (None, None)
    x = integers(dtype, (6, 3, 9, 11), seed=1, low=low, high=high)
    stats = batch_stats(x)
    assert_stats(stats, kept_pixels(x), tol=1e-13)
    assert stats.values is None
    counted = batch_stats(x, values=True)
    assert counted.values.exact
    got = counted.percentiles(Q)
    for c, p in enumerate(kept_pixels(x)):
        assert got[:, c].tolist() == [float(np.percentile(p, q, method="linear")) for q in Q]


def test_integer_counts_merge_exactly_at_any_split():
    """Batches, workers, ranks and partial_fit all merge ValueCounts: the result is the same bits."""
    x = integers(torch.int16, (20, 4, 8, 8), seed=2, low=-1024, high=3071)
    whole = batch_stats(x, values=True)
    for split in ([1] * 20, [7, 13], [3, 3, 14]):
        parts = [batch_stats(piece, values=True) for piece in torch.split(x, split)]
        together = merged(parts[::-1])  # any order
        assert torch.equal(together.percentiles(Q), whole.percentiles(Q))
        assert together.count.tolist() == whole.count.tolist()
        torch.testing.assert_close(together.mean, whole.mean, rtol=1e-14, atol=0)
        torch.testing.assert_close(together.m2, whole.m2, rtol=1e-13, atol=0)
    reference = kept_pixels(x)
    for c, p in enumerate(reference):
        assert whole.percentiles(Q)[:, c].tolist() == [float(np.percentile(p, q)) for q in Q]


@pytest.mark.parametrize("channels", [13, 224])
def test_many_bands_uint16_with_nodata(channels):
    x = integers(torch.uint16, (2, channels, 16, 16), seed=3, low=0, high=12000)
    x[:, :, :4] = 0  # nodata rows
    stats = batch_stats(x, ignore=0, values=True)
    pixels = kept_pixels(x, ignore=0)
    assert_stats(stats, pixels, tol=1e-13)
    got = stats.percentiles((0.5, 99.5))
    for c in (0, channels // 2, channels - 1):
        assert got[:, c].tolist() == [float(np.percentile(pixels[c], q)) for q in (0.5, 99.5)]


def test_wide_int32_pools_counts_but_keeps_exact_moments():
    x = integers(torch.int32, (4, 2, 64, 64), seed=4)  # the full int32 range: too wide to count per value
    stats = batch_stats(x, values=True)
    assert not stats.values.exact
    assert stats.values.counts.numel() <= MAX_BINS
    assert_stats(stats, kept_pixels(x), tol=1e-12)
    stats = batch_stats(x, ignore=[int(x[0, 0, 0, 0]), 7], values=True)
    assert_stats(stats, kept_pixels(x, ignore=[int(x[0, 0, 0, 0]), 7]), tol=1e-12)


def test_per_channel_ignore_values_on_integers():
    x = integers(torch.uint8, (5, 3, 10, 10), seed=5, low=0, high=20)
    ignore = [0, 255, 3]  # 255 never occurs
    assert_stats(batch_stats(x, ignore=ignore), kept_pixels(x, ignore=ignore), tol=1e-13)


# --- masks and ignored values on float images ------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("mask_channels", [1, 3])
def test_masks_keep_only_their_pixels(dtype, tol, mask_channels):
    x = (0.7 + 0.01 * torch.rand(8, 3, 12, 12, generator=gen(6), dtype=torch.float64)).to(dtype)  # bright, narrow
    mask = torch.rand(8, mask_channels, 12, 12, generator=gen(7)) > 0.6
    stats = batch_stats(x, mask=mask)
    assert_stats(stats, kept_pixels(x, mask=mask.numpy()), tol=tol)
    parts = merged(batch_stats(x[i : i + 3], mask=mask[i : i + 3]) for i in range(0, 8, 3))
    assert_stats(parts, kept_pixels(x, mask=mask.numpy()), tol=tol)


def test_nan_pixels_are_left_out_with_ignore_nan():
    x = torch.rand(4, 3, 10, 10, generator=gen(8)) * 100 + 1000
    x[x < 1030] = float("nan")
    stats = batch_stats(x, ignore=float("nan"))
    assert_stats(stats, kept_pixels(x, ignore=float("nan")), tol=1e-6)
    assert torch.isnan(batch_stats(x).mean).all()  # not ignored: NaN statistics (the pass names the sample)


def test_ignore_a_value_and_nan_per_channel_with_a_mask():
    x = torch.rand(4, 3, 10, 10, generator=gen(9))
    x[:, 0, :3] = -1.0
    x[:, 1, 5:] = float("nan")
    mask = torch.rand(4, 1, 10, 10, generator=gen(10)) > 0.2
    ignore = [-1.0, float("nan"), 0.5]
    stats = batch_stats(x, ignore=ignore, mask=mask)
    assert_stats(stats, kept_pixels(x, ignore=ignore, mask=mask.numpy()), tol=1e-6)


def test_a_channel_with_nothing_kept_counts_zero():
    x = torch.rand(2, 3, 4, 4, generator=gen(11))
    mask = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    mask[:, 1] = False
    stats = batch_stats(x, mask=mask)
    assert stats.count.tolist() == [32.0, 0.0, 32.0]
    assert stats.min[1] == math.inf and stats.max[1] == -math.inf
    whole = stats.merge(batch_stats(x))
    assert_stats(whole, [np.concatenate([p, q]) for p, q in zip(kept_pixels(x, mask=mask.numpy()), kept_pixels(x))],
                 tol=1e-6)


def test_a_single_image_with_a_mask_of_its_own_shape():
    x = torch.rand(3, 6, 7, generator=gen(12))  # (C, H, W)
    mask = torch.rand(6, 7, generator=gen(13)) > 0.5  # (H, W): broadcast over channels
    assert_stats(batch_stats(x, mask=mask), kept_pixels(x[None], mask=mask.numpy()[None, None]), tol=1e-6)


# --- volumes ---------------------------------------------------------------------------------------


def test_volumes_with_spatial_dims_3():
    x = integers(torch.int16, (2, 2, 5, 6, 7), seed=14, low=-1024, high=2000)
    mask = torch.rand(2, 1, 5, 6, 7, generator=gen(15)) > 0.5
    stats = batch_stats(x, mask=mask, spatial_dims=3, values=True)
    pixels = kept_pixels(x, mask=mask.numpy(), spatial_dims=3)
    assert_stats(stats, pixels, tol=1e-13)
    for c, p in enumerate(pixels):
        assert stats.percentiles((0.5, 99.5))[:, c].tolist() == [float(np.percentile(p, q)) for q in (0.5, 99.5)]
    single = batch_stats(x[0].float(), spatial_dims=3)  # (C, D, H, W)
    assert_stats(single, kept_pixels(x[:1], spatial_dims=3), tol=1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., C, D, H, W\)"):
        batch_stats(torch.rand(4, 5, 6), spatial_dims=3)


# --- float percentiles --------------------------------------------------------------------------------


def rank_of(value: float, pixels: np.ndarray) -> tuple[float, float]:
    s = np.sort(pixels)
    return np.searchsorted(s, value, side="left") / s.size, np.searchsorted(s, value, side="right") / s.size


@pytest.mark.parametrize("seed", [16, 17])
def test_float_percentiles_within_the_stated_rank_error(seed):
    """Float data are counted per bucket of 2**-11 relative width: each percentile lies within the stated
    rank error of numpy's (at most 0.1% on smooth data), and within 2**-11 of its magnitude."""
    g = gen(seed)
    x = torch.cat([0.5 + 0.2 * torch.randn(40, 3, 32, 32, generator=g), torch.rand(40, 3, 32, 32, generator=g) * 1000])
    stats = merged(batch_stats(piece, values=True) for piece in x.split(7))
    errors = stats.values.rank_error(Q)
    assert float(errors.max()) <= 1e-3
    got = stats.percentiles(Q)
    for c, p in enumerate(kept_pixels(x)):
        for row, q in enumerate(Q):
            want = float(np.percentile(p, q))
            low, high = rank_of(got[row, c].item(), p)
            target = q / 100
            assert low - errors[row, c] - 1 / p.size <= target <= high + errors[row, c] + 1 / p.size
            assert abs(got[row, c].item() - want) <= 2**-10 * abs(want) + 1e-12
    assert got[0].tolist() == stats.min.tolist() and got[-1].tolist() == stats.max.tolist()


@pytest.mark.parametrize("ignore", [0.0, -9999.0, float("nan"), [0.0, float("nan"), 0.5]])
def test_float_nodata_in_some_rows_of_a_batch(ignore):
    """Only the rows whose range can hold the ignored value are reduced again without it, and the value
    counts are taken without a mask: both must equal numpy and the masked counting on every kind of row
    (no nodata, a little, all of it, -0.0 under ignore=0.0, a value below every kept pixel, NaN)."""
    g = gen(31)
    x = 0.3 + 0.4 * torch.rand(12, 3, 16, 16, generator=g)
    x[0, :, :4] = 0.0  # a nodata border
    x[1, 0] = 0.0  # a whole channel of nodata
    x[2, :, 0, :5] = -0.0  # -0.0 equals 0.0
    x[3, :, 5] = -9999.0  # nodata far below the data
    x[4, 1, ::2] = float("nan")
    x[5, 2, 3, 3] = 0.5  # the per-channel ignored value of channel 2, inside the data's range
    x[6] = 0.5
    x[7] -= 0.6  # data below 0.0 too: the value 0.0 inside the kept range, its bucket counted then emptied
    x[8, :, :2], x[9, :, 0, :3] = 0.0, -0.0
    nan = not isinstance(ignore, list) and math.isnan(ignore)
    if not nan:  # NaN only where it is ignored; the far nodata only where it is the ignored value
        x[4, 1, ::2] = float("nan") if isinstance(ignore, list) else 0.0
        x[3, :, 5] = -9999.0 if ignore == -9999.0 else 0.0
    pixels = kept_pixels(x, ignore=ignore)
    for batch in (x, x[:3], x[5:]):  # the same rows, alone or among others
        assert_stats(batch_stats(batch, ignore=ignore), kept_pixels(batch, ignore=ignore), 1e-6)
    stats = merged(batch_stats(piece, ignore=ignore, values=True) for piece in x.split(5))
    assert_stats(stats, pixels, 1e-6)
    masked = merged(ValueCounts.count(piece.reshape(piece.shape[0], 3, -1), kept_mask(piece, ignore))
                    for piece in x.split(5))
    assert torch.equal(stats.values.counts, masked.counts) and torch.equal(stats.values.offset, masked.offset)
    assert stats.values.total.tolist() == [p.size for p in pixels]


def kept_mask(x: torch.Tensor, ignore) -> torch.Tensor:
    """``(N, C, P)`` booleans: the pixels numpy keeps (see kept_pixels)."""
    values = np.broadcast_to(np.asarray(ignore, dtype=np.float64).reshape(-1), (x.shape[1],))
    a = x.reshape(x.shape[0], x.shape[1], -1).double()
    keep = torch.ones(a.shape, dtype=torch.bool)
    for c, v in enumerate(values):
        keep[:, c] = ~a[:, c].isnan() if math.isnan(v) else a[:, c] != v
    return keep


def test_float_counts_pool_to_fit_memory_and_say_so():
    x = torch.cat([torch.full((1, 8, 8, 8), -1e38), torch.full((1, 8, 8, 8), 1e38), torch.rand(1, 8, 8, 8)])
    stats = batch_stats(x, values=True)
    assert stats.values.counts.numel() <= MAX_BINS
    assert stats.values.shift > 12
    errors = stats.values.rank_error((50.0,))
    assert float(errors.max()) > 0


# --- ValueCounts --------------------------------------------------------------------------------------


def test_value_counts_pickle_and_store_as_arrays():
    x = integers(torch.uint16, (3, 2, 5, 5), seed=18, low=100, high=400)
    counts = batch_stats(x, values=True).values
    again = pickle.loads(pickle.dumps(counts))
    assert torch.equal(again.counts, counts.counts) and torch.equal(again.offset, counts.offset)
    attrs, arrays = counts.to_arrays()
    back = ValueCounts.from_arrays(attrs, arrays)
    assert torch.equal(back.counts, counts.counts) and back.kind == "int" and back.shift == 0
    assert ValueCounts.from_arrays({}, {}) is None
    with pytest.raises(ValueError, match="float data into counts of int"):
        counts.merge(batch_stats(x.float(), values=True).values)


def test_stats_merge_keeps_values_only_when_both_have_them():
    x = integers(torch.uint8, (2, 3, 4, 4), seed=19)
    with_values, without = batch_stats(x, values=True), batch_stats(x)
    assert with_values.merge(with_values).values is not None
    assert with_values.merge(without).values is None
    assert ChannelStats.empty(3).merge(with_values).values is not None
    assert pickle.loads(pickle.dumps(with_values)).values is not None
    with pytest.raises(ValueError, match="clip="):
        without.percentiles([50.0])


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_masks_and_ignore_values_say_what_was_expected():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"1 or 3 channels"):
        batch_stats(x, mask=torch.ones(2, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"1 or 3 channels"):
        batch_stats(x, mask=torch.ones(2, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one per channel"):
        batch_stats(x, ignore=[0.0, 1.0])
    with pytest.raises(TypeError, match="int64"):
        batch_stats(x.long())


# --- property: any data, any split ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_integers_any_mask_any_split_match_numpy(data):
    dtype = data.draw(st.sampled_from([torch.uint8, torch.int16, torch.uint16, torch.int32]))
    n = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**31 - 1))
    span = data.draw(st.sampled_from([1, 5, 300, 70000]))
    info = torch.iinfo(dtype)
    low = min(max(info.min, data.draw(st.integers(-40000, 40000))), info.max)
    high = min(info.max, low + span)
    x = integers(dtype, (n, 2, 3, 5), seed=seed, low=low, high=high)
    mask = torch.rand(n, 1, 3, 5, generator=gen(seed + 1)) > data.draw(st.floats(0, 0.9))
    ignore = data.draw(st.sampled_from([None, low, [low, high]]))
    cut = data.draw(st.integers(0, n))
    parts = [batch_stats(x[a:b], mask=mask[a:b], ignore=ignore, values=True) for a, b in ((0, cut), (cut, n))]
    stats = parts[1].merge(parts[0])
    pixels = kept_pixels(x, mask=mask.numpy(), ignore=ignore)
    assert_stats(stats, pixels, tol=1e-12)
    got = stats.percentiles((0.5, 50.0, 99.5))
    for c, p in enumerate(pixels):
        if p.size:
            assert got[:, c].tolist() == [float(np.percentile(p, q)) for q in (0.5, 50.0, 99.5)]
        else:
            assert torch.isnan(got[:, c]).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_masked_rows_whose_sample_misleads_the_centre_are_redone(dtype, tol):
    """The centre of a masked row comes from its middle pixels; where they differ from the rest of the row by
    far more than its spread, the row is reduced again in float64 (a white-box case for that path)."""
    x = 0.01 * torch.rand(6, 2, 32, 32, generator=gen(30), dtype=torch.float64)
    x[:, :, 14:18] += 1000.0  # the middle rows of each image: the sample the centre comes from
    x = x.to(dtype)
    mask = torch.rand(6, 1, 32, 32, generator=gen(31)) > 0.3
    mask[0] = False  # an image with nothing kept
    stats = batch_stats(x, mask=mask, ignore=[float("nan"), 5.0])
    assert_stats(stats, kept_pixels(x, mask=mask.numpy()), tol=tol)


def test_a_channel_of_values_up_to_minus_zero_keeps_its_zeros_in_its_own_counts():
    """amax of [-1, -0.0, 0.0] is -0.0: its bucket is that of 0.0, so no zero lands in the next channel."""
    g = gen(41)
    x = torch.stack([-torch.relu(torch.randn(8, 32, 32, generator=g)), torch.rand(8, 32, 32, generator=g) + 1], 1)
    x[0, 0, 0, :4] = -0.0
    stats = batch_stats(x, values=True)
    assert stats.values.total.tolist() == [8 * 32 * 32] * 2
    got = stats.percentiles([50.0])[0]
    for c, p in enumerate(kept_pixels(x)):
        assert abs(got[c].item() - np.percentile(p, 50)) <= 2**-10 * abs(np.percentile(p, 50)) + 1e-30
    nodata = batch_stats(x, ignore=-1.0, values=True)  # the ignored path counts alike
    assert nodata.values.total.tolist() == [8 * 32 * 32] * 2


@pytest.mark.parametrize("value", [0.3, -3.4028234663852886e38])
def test_ignore_is_compared_in_the_images_dtype(value):
    """ignore=0.3 on float32 images drops the pixels that hold float32(0.3), as x == 0.3 does, also where the
    value is a row's min or max (GDAL prints float32 nodata as -3.4028234663852886e+38)."""
    g = gen(42)
    x = 0.5 + torch.rand(4, 2, 8, 8, generator=g)
    x[1, :, :2] = value
    x[2, 0] = value
    want = [(x[:, c] != value).sum().item() for c in range(2)]
    for stats in (batch_stats(x, ignore=value), batch_stats(x, ignore=[value, value]),
                  batch_stats(x, ignore=value, mask=torch.ones(4, 1, 8, 8))):
        assert stats.count.tolist() == want
        kept = [x[:, c][x[:, c] != value].double() for c in range(2)]
        assert stats.mean.tolist() == pytest.approx([k.mean().item() for k in kept], rel=1e-6)
    half = x.half()
    half[0, 0, 0, 0] = -9999.0  # float16 stores -10000
    assert batch_stats(half, ignore=-9999.0).count[0].item() == (half[:, 0] != -9999.0).sum().item()


def test_an_image_whose_channel_is_all_nan_under_ignore_nan():
    """A whole nodata tile: the channel keeps the other images' pixels; nothing becomes NaN."""
    x = torch.rand(3, 2, 4, 4, generator=gen(43))
    x[0, 0] = float("nan")
    stats = batch_stats(x, ignore=float("nan"), values=True)
    assert stats.count.tolist() == [32.0, 48.0]
    assert stats.mean[0].item() == pytest.approx(x[1:, 0].double().mean().item(), rel=1e-6)
    assert torch.isfinite(stats.mean).all() and torch.isfinite(stats.m2).all()
    assert stats.values.total.tolist() == [32, 48]
