"""FitNormalize as a transform: parity with Normalize, tv_tensors, state, companions, errors."""

import pickle

import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision import transforms as v1
from torchvision import tv_tensors
from torchvision.transforms import v2

from torchnormfit import ChannelStats, FitNormalize, NotFittedError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def fitted(mean=MEAN, std=STD, **kwargs):
    return FitNormalize(mean, std, cache=None, **kwargs)


# --- parity with Normalize -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(1, 4),
    leading=st.lists(st.integers(1, 3), max_size=2),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_output_equals_v2_normalize_bit_for_bit(channels, leading, hw, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mean = (torch.rand(channels, generator=g) * 2 - 1).tolist()
    std = (torch.rand(channels, generator=g) * 2 + 0.01).tolist()
    x = (torch.randn(*leading, channels, *hw, generator=g) * 3).to(dtype)
    assert torch.equal(fitted(mean, std)(x), v2.Normalize(mean, std)(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_output_equals_v1_normalize(dtype):
    x = torch.rand(2, 3, 5, 7).to(dtype)
    assert torch.equal(fitted()(x), v1.Normalize(MEAN, STD)(x))


def test_inplace_matches_normalize_inplace():
    x = torch.rand(3, 4, 4)
    expected = v2.Normalize(MEAN, STD)(x.clone())
    y = x.clone()
    out = fitted(inplace=True)(y)
    assert torch.equal(out, expected) and torch.equal(y, expected)


@pytest.mark.parametrize("kind", [tv_tensors.Image, tv_tensors.Video])
def test_tv_tensor_types_are_kept(kind):
    x = kind(torch.rand(2, 3, 4, 4))
    out = fitted()(x)
    assert type(out) is kind
    assert torch.equal(out.as_subclass(torch.Tensor), v2.Normalize(MEAN, STD)(x).as_subclass(torch.Tensor))


def test_targets_pass_through_untouched():
    image = tv_tensors.Image(torch.rand(3, 8, 8))
    target = {
        "boxes": tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(8, 8)),
        "labels": torch.tensor([7]),
        "masks": tv_tensors.Mask(torch.ones(1, 8, 8, dtype=torch.uint8)),
    }
    out_image, out_target = fitted()(image, target)
    assert torch.equal(out_image, v2.Normalize(MEAN, STD)(image))
    for name in target:
        assert out_target[name] is target[name]


def test_plain_tensor_target_passes_through_with_plain_image():
    image, label = torch.rand(3, 4, 4), torch.tensor([1.0, 2.0])
    out_image, out_label = fitted()(image, label)
    assert torch.equal(out_image, v2.Normalize(MEAN, STD)(image)) and out_label is label


@pytest.mark.parametrize("compose", [v1.Compose, v2.Compose])
def test_works_inside_v1_and_v2_compose(compose):
    pil = PIL.Image.new("RGB", (6, 5), color=(10, 128, 250))
    to_tensor = v1.ToTensor() if compose is v1.Compose else v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    out = compose([to_tensor, fitted()])(pil)
    assert torch.equal(out.as_subclass(torch.Tensor), v1.Normalize(MEAN, STD)(v1.ToTensor()(pil)))


def test_repr_reads_like_normalize():
    assert repr(fitted()) == f"FitNormalize(mean={MEAN}, std={STD}, inplace=False)"
    assert repr(FitNormalize(cache=None)) == "FitNormalize(mean=None, std=None, inplace=False)"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jit_script_turns_into_v1_normalize():
    scripted = torch.jit.script(fitted())
    x = torch.rand(3, 4, 4)
    assert torch.equal(scripted(x), v1.Normalize(MEAN, STD)(x))
    with pytest.raises(NotFittedError):
        torch.jit.script(FitNormalize(cache=None))


# --- before it has statistics ----------------------------------------------------------------


def test_unfitted_raises_not_fitted_error_with_the_fix():
    norm = FitNormalize(cache=None)
    assert norm.mean is None and norm.std is None and norm.stats is None
    with pytest.raises(NotFittedError, match=r"\.fit\(dataset\).*mean="):
        norm(torch.rand(3, 4, 4))
    assert issubclass(NotFittedError, ValueError) and not issubclass(NotFittedError, AttributeError)


def test_mean_without_std_is_rejected():
    with pytest.raises(ValueError, match="both mean and std"):
        FitNormalize(mean=MEAN)


# --- errors Normalize has, and gaps v2 leaves -------------------------------------------------


def test_pil_image_error_names_the_fix():
    with pytest.raises(TypeError, match=r"does not support PIL images.*ToTensor\(\)"):
        fitted()(PIL.Image.new("RGB", (4, 4)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.bool, torch.complex64])
def test_non_float_tensor_error_names_the_fix(dtype):
    with pytest.raises(TypeError, match=rf"should be a float tensor. Got {dtype}.*ToDtype"):
        fitted()(torch.zeros(3, 4, 4, dtype=dtype))


@pytest.mark.parametrize("shape", [(4,), (4, 4)])
def test_low_dimensional_tensor_error(shape):
    with pytest.raises(ValueError, match=r"size \(\.\.\., C, H, W\)"):
        fitted()(torch.rand(shape))


def test_fitted_statistics_refuse_another_channel_count_where_v2_broadcasts():
    one_channel = torch.rand(1, 4, 4)
    v2.Normalize(MEAN, STD)(one_channel)  # v2 silently broadcasts to 3 channels
    fitted_norm = FitNormalize(cache=None).partial_fit(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="statistics for 3 channels, but the input has 1"):
        fitted_norm(one_channel)


def test_std_that_underflows_in_the_input_dtype_raises_like_v1():
    norm = fitted(mean=[0.0], std=[1e-10])
    norm(torch.rand(1, 2, 2))  # float32 holds 1e-10
    with pytest.raises(ValueError, match="std evaluated to zero after conversion to torch.float16"):
        norm(torch.rand(1, 2, 2, dtype=torch.float16))


# --- state, pickling, companions ---------------------------------------------------------------


def fitted_from_stats():
    pixels = torch.rand(3, 500, dtype=torch.float64) * torch.tensor([[1.0], [0.5], [2.0]])
    norm = FitNormalize(cache=None, key="demo")
    norm._use_stats(ChannelStats.from_pixels(pixels), num_samples=1)
    return norm


def test_state_dict_round_trips_into_an_unfitted_instance(tmp_path):
    norm = fitted_from_stats()
    torch.save(norm.state_dict(), tmp_path / "norm.pt")
    other = FitNormalize(cache=None)
    other.load_state_dict(torch.load(tmp_path / "norm.pt", weights_only=True))
    assert other.mean == norm.mean and other.std == norm.std
    for name, value in norm.stats.to_dict().items():
        assert torch.equal(other.stats.to_dict()[name], value)
    x = torch.rand(3, 4, 4)
    assert torch.equal(other(x), norm(x))


def test_state_dict_works_nested_in_a_module():
    model = nn.Sequential(fitted_from_stats())
    fresh = nn.Sequential(FitNormalize(cache=None))
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].mean == model[0].mean


@pytest.mark.parametrize("norm", [fitted(), FitNormalize(cache=None)], ids=["fitted", "unfitted"])
def test_pickle_round_trip(norm):
    clone = pickle.loads(pickle.dumps(norm))
    assert clone.mean == norm.mean and clone.std == norm.std
    assert not any("h5py" in type(v).__module__ for v in vars(clone).values())


def test_inverse_undoes_the_normalization():
    norm = fitted()
    x = torch.rand(3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(norm.inverse()(norm(x)), x)


def test_to_normalize_is_a_plain_v2_normalize_with_the_same_output():
    norm = fitted()
    plain = norm.to_normalize()
    assert type(plain) is v2.Normalize and plain.mean == MEAN and plain.std == STD
    x = torch.rand(2, 3, 5, 5)
    assert torch.equal(plain(x), norm(x))


def test_to_batchnorm_is_a_frozen_eval_batchnorm_with_the_stats():
    norm = fitted_from_stats()
    bn = norm.to_batchnorm()
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training and not bn.affine
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(bn(x), norm(x), rtol=1e-5, atol=1e-6)
    nn.Sequential(bn).train()  # a model put in train mode keeps this layer frozen
    assert not bn.training
    bn(torch.rand(4, 3, 5, 5) + 10)
    torch.testing.assert_close(bn.running_mean, torch.tensor(norm.mean, dtype=torch.float32))
    torch.testing.assert_close(bn(x), norm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["inverse", "to_normalize", "to_batchnorm"])
def test_companions_need_statistics(method):
    with pytest.raises(NotFittedError):
        getattr(FitNormalize(cache=None), method)()
