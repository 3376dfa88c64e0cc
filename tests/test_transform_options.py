"""FitNormalize(ignore=, clip=, spatial_dims=) and integer images: fitted numbers and output against numpy."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from test_reduce import kept_pixels
from torchvision import tv_tensors
from torchvision.transforms import v2

from torchnormfit import FitNormalize


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scenes(n=6, channels=13, seed=0) -> torch.Tensor:
    """uint16 multi-band scenes, a nodata (0) border."""
    x = torch.randint(200, 9000, (n, channels, 12, 12), generator=gen(seed), dtype=torch.int32).to(torch.uint16)
    x[:, :, :, :3] = 0
    return x


def volumes(n=3, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 CT-like volumes (N, 1, D, H, W) in Hounsfield units and a foreground mask."""
    g = gen(seed)
    x = torch.randint(-1024, 3071, (n, 1, 6, 8, 8), generator=g, dtype=torch.int32).to(torch.int16)
    mask = torch.rand(n, 1, 6, 8, 8, generator=g) > 0.4
    return x, mask


# --- nodata ------------------------------------------------------------------------------------


def test_ignore_fits_the_kept_pixels_and_zeroes_nodata_in_the_output():
    x = scenes()
    norm = FitNormalize(cache=None, ignore=0).partial_fit(x)
    pixels = kept_pixels(x, ignore=0)
    assert norm.stats.count.tolist() == [float(p.size) for p in pixels]
    np.testing.assert_allclose(norm.mean, [p.mean() for p in pixels], rtol=1e-13)
    np.testing.assert_allclose(norm.std, [p.std() for p in pixels], rtol=1e-12)
    out = norm(x[0])
    assert out.dtype == torch.float32
    want = (x[0].double() - torch.tensor(norm.mean)[:, None, None]) / torch.tensor(norm.std)[:, None, None]
    want[x[0] == 0] = 0
    torch.testing.assert_close(out, want.float(), rtol=1e-6, atol=1e-6)
    assert (out[:, :, :3] == 0).all()


def test_per_channel_nodata_and_nan():
    x = torch.rand(4, 3, 8, 8, generator=gen(2))
    x[:, 0, 0] = -9999.0
    x[:, 2, 1] = float("nan")
    ignore = [-9999.0, 5.0, float("nan")]
    norm = FitNormalize(cache=None, ignore=ignore).partial_fit(x)
    pixels = kept_pixels(x, ignore=ignore)
    np.testing.assert_allclose(norm.mean, [p.mean() for p in pixels], rtol=1e-6)
    out = norm(x[0])
    assert (out[0, 0] == 0).all()  # a nodata value: 0
    assert torch.isnan(out[2, 1]).all()  # NaN in, NaN out
    assert torch.isfinite(out[:, 2:]).all()


def test_a_nodata_value_float32_cannot_hold_is_the_same_one_or_per_channel():
    """ignore=0.1 and ignore=[0.1, 0.1] fit and normalize alike: both compare in the images' dtype."""
    x = torch.rand(4, 2, 8, 8, generator=gen(3)) + 0.5
    x[:, :, 0] = 0.1
    one, each = (FitNormalize(cache=None, ignore=v).partial_fit(x) for v in (0.1, [0.1, 0.1]))
    assert one.stats.count.tolist() == each.stats.count.tolist() == [4 * 7 * 8.0] * 2
    assert torch.equal(one(x[0]), each(x[0])) and (one(x[0])[:, 0] == 0).all()


def test_nan_that_is_not_ignored_names_the_image():
    x = torch.rand(4, 3, 8, 8)
    x[2, 1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"Sample 2 .*ignore=float\('nan'\)"):
        FitNormalize(cache=None).partial_fit(x)


# --- integer units -------------------------------------------------------------------------------


def test_fitted_on_integers_normalizes_integers_to_float32():
    x = scenes(channels=4)
    norm = FitNormalize(cache=None).partial_fit(x)
    assert norm.integer_input
    out = norm(tv_tensors.Image(x[1]))
    assert type(out) is tv_tensors.Image and out.dtype == torch.float32
    torch.testing.assert_close(out.as_subclass(torch.Tensor), v2.Normalize(norm.mean, norm.std)(x[1].float()))
    torch.testing.assert_close(norm(x[1].float()), out.as_subclass(torch.Tensor))  # float input in the same units


@pytest.mark.parametrize("how", ["by hand", "fitted on floats"])
def test_integer_input_still_raises_where_units_are_ambiguous(how):
    x = scenes(channels=3)
    norm = (FitNormalize([0.5] * 3, [0.2] * 3, cache=None) if how == "by hand"
            else FitNormalize(cache=None).partial_fit(x.float() / 65535))
    with pytest.raises(TypeError, match="float tensor"):
        norm(x[0])
    with pytest.raises(TypeError, match="float tensor"):
        v2.Normalize([0.5] * 3, [0.2] * 3)(x[0])


def test_integer_and_float_batches_do_not_mix():
    norm = FitNormalize(cache=None).partial_fit(scenes(channels=2))
    with pytest.raises(ValueError, match="integer images; these are float"):
        norm.partial_fit(torch.rand(2, 2, 4, 4))


# --- clipping -------------------------------------------------------------------------------------


def test_clip_learns_exact_percentiles_and_clamps_before_normalizing():
    x, mask = volumes()
    norm = FitNormalize(cache=None, clip=(0.5, 99.5), spatial_dims=3)
    for i in range(len(x)):  # one volume at a time: counts per value merge exactly
        norm.partial_fit(x[i : i + 1], mask=mask[i : i + 1])
    (pixels,) = kept_pixels(x, mask=mask.numpy(), spatial_dims=3)
    assert norm.clip_low == [float(np.percentile(pixels, 0.5))]
    assert norm.clip_high == [float(np.percentile(pixels, 99.5))]
    np.testing.assert_allclose(norm.mean, [pixels.mean()], rtol=1e-13)  # before clipping (nnU-Net)
    np.testing.assert_allclose(norm.std, [pixels.std()], rtol=1e-12)
    out = norm(x[0])  # (C, D, H, W)
    want = (np.clip(x[0].numpy().astype(np.float64), norm.clip_low[0], norm.clip_high[0]) - norm.mean[0]) / norm.std[0]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32


def test_clip_on_float_data_is_within_the_stated_resolution():
    x = torch.randn(16, 2, 16, 16, generator=gen(3)) * 100 + 40
    norm = FitNormalize(cache=None, clip=(1, 99)).partial_fit(x)
    for c, p in enumerate(kept_pixels(x)):
        assert abs(norm.clip_low[c] - np.percentile(p, 1)) <= 2**-10 * abs(np.percentile(p, 1))
        assert abs(norm.clip_high[c] - np.percentile(p, 99)) <= 2**-10 * abs(np.percentile(p, 99))
    assert float(norm.stats.values.rank_error((1, 99)).max()) <= 1e-3


@pytest.mark.parametrize("clip", [(99.5, 0.5), (0.5,), (-1, 50), (1, 101), "a"])
def test_bad_clip_says_what_it_takes(clip):
    with pytest.raises(ValueError, match=r"clip= takes two percentiles"):
        FitNormalize(cache=None, clip=clip)


def test_clip_with_statistics_by_hand_is_refused():
    with pytest.raises(ValueError, match="clip= learns"):
        FitNormalize([0.0], [1.0], cache=None, clip=(1, 99))


# --- volumes ------------------------------------------------------------------------------------


def test_volumes_are_normalized_per_channel():
    x = torch.rand(2, 3, 4, 5, 6, generator=gen(4)) * torch.tensor([1.0, 10.0, 100.0])[:, None, None, None]
    norm = FitNormalize(cache=None, spatial_dims=3).partial_fit(x)
    for c, p in enumerate(kept_pixels(x, spatial_dims=3)):
        np.testing.assert_allclose(norm.mean[c], p.mean(), rtol=1e-6)
    out = norm(x)  # (N, C, D, H, W)
    mean = torch.tensor(norm.mean).view(-1, 1, 1, 1)
    std = torch.tensor(norm.std).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, (x - mean) / std)
    torch.testing.assert_close(norm(x[0]), out[0])  # (C, D, H, W)
    with pytest.raises(ValueError, match=r"\(\.\.\., C, D, H, W\)"):
        norm(x[0, 0, 0])
    with pytest.raises(ValueError, match="statistics for 3 channels"):
        norm(x[:, :2])
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        FitNormalize(cache=None, spatial_dims=4)


# --- state ---------------------------------------------------------------------------------------


def test_options_survive_state_dict_and_pickle():
    x, mask = volumes()
    norm = FitNormalize(cache=None, clip=(0.5, 99.5), ignore=-1024, spatial_dims=3).partial_fit(x, mask=mask)
    fresh = FitNormalize(cache=None, clip=(0.5, 99.5), ignore=-1024, spatial_dims=3)
    fresh.load_state_dict(norm.state_dict())
    again = pickle.loads(pickle.dumps(norm))
    for other in (fresh, again):
        assert other.clip_low == norm.clip_low and other.clip_high == norm.clip_high and other.integer_input
        assert torch.equal(other(x[0]), norm(x[0]))
    assert "clip=(0.5, 99.5)" in repr(norm) and "spatial_dims=3" in repr(norm)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_companions_that_cannot_carry_options_refuse():
    norm = FitNormalize(cache=None, ignore=0).partial_fit(scenes(channels=2))
    for companion in (norm.to_normalize, norm.to_batchnorm):
        with pytest.raises(ValueError, match="cannot carry"):
            companion()
    with pytest.raises(RuntimeError, match="cannot be JIT scripted"):
        torch.jit.script(norm)


def test_options_compile_without_graph_breaks():
    x = scenes(channels=3)
    norm = FitNormalize(cache=None, ignore=0, clip=(1, 99)).partial_fit(x)
    compiled = torch.compile(lambda t: norm(t), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x[0]), norm(x[0]), rtol=0, atol=0)
