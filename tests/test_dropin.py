"""FitNormalize side by side with v2.Normalize wherever a Normalize goes: compile, export, checkpoints,
registered kernels, positional arguments, broadcasting, old pickles."""

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from torchnormfit import FitNormalize

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
DATA = Path(__file__).parent / "data"


def given_stats():
    return FitNormalize(MEAN, STD, cache=None)


def fitted_stats():
    return FitNormalize(cache=None).partial_fit(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.2)


BOTH = [given_stats, fitted_stats]


def twin(norm):
    return v2.Normalize(norm.mean, norm.std)


@pytest.mark.parametrize("make", BOTH)
def test_compile_fullgraph_without_graph_breaks_gives_v2s_output(make):
    norm = make()
    x = torch.rand(2, 3, 8, 8)
    explained = torch._dynamo.explain(lambda t: norm(t))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(lambda t: norm(t), fullgraph=True, backend="aot_eager")
    for dtype in (torch.float32, torch.float64):  # a second dtype recompiles; still no break
        x = torch.rand(2, 3, 8, 8, dtype=dtype)
        torch.testing.assert_close(compiled(x), twin(norm)(x), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("make", BOTH)
def test_export_strict_and_not_like_v2(make, strict):
    norm = make()  # never called before export
    x = torch.rand(2, 3, 8, 8)
    for module in (nn.Sequential(twin(norm)), nn.Sequential(norm)):
        exported = torch.export.export(module, (x,), strict=strict)
        torch.testing.assert_close(exported.module()(x), twin(norm)(x), rtol=0, atol=0)


def test_v2_checkpoint_loads_strictly_into_a_fitnormalize_model():
    net = nn.Conv2d(3, 4, 1)
    source = nn.Sequential(v2.Normalize(MEAN, STD), net)
    target = nn.Sequential(FitNormalize(MEAN, STD, cache=None), nn.Conv2d(3, 4, 1))
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(target[1].weight, net.weight)
    assert target[0].mean == MEAN  # the v2 checkpoint carries no statistics; these stay


def test_fitnormalize_checkpoint_carries_its_statistics_and_loads_into_v2_with_strict_false():
    norm = fitted_stats()
    state = nn.Sequential(norm, nn.Conv2d(3, 4, 1)).state_dict()
    fresh = nn.Sequential(FitNormalize(cache=None), nn.Conv2d(3, 4, 1))
    fresh.load_state_dict(state, strict=True)
    assert fresh[0].mean == norm.mean and fresh[0].stats.count.tolist() == norm.stats.count.tolist()
    plain = nn.Sequential(v2.Normalize(norm.mean, norm.std), nn.Conv2d(3, 4, 1))
    with pytest.raises(RuntimeError, match="Unexpected key.*0._extra_state"):
        plain.load_state_dict(state, strict=True)
    assert plain.load_state_dict(state, strict=False).unexpected_keys == ["0._extra_state"]


class Spectrum(tv_tensors.TVTensor):
    """A user's own TVTensor with a normalize kernel registered for it."""

    @classmethod
    def __new__(cls, *args, **kwargs):
        raise NotImplementedError


def make_spectrum(data):
    return data.as_subclass(Spectrum)


@F.register_kernel(F.normalize, Spectrum)
def _normalize_spectrum(inpt, mean, std, inplace=False):
    return (inpt.as_subclass(torch.Tensor) * 0 + 7.0).as_subclass(Spectrum)


@pytest.mark.parametrize("make", BOTH)
def test_a_registered_kernel_is_called_as_v2_calls_it(make):
    norm = make()
    sample = {"spectrum": make_spectrum(torch.rand(3, 4, 4)), "image": tv_tensors.Image(torch.rand(3, 4, 4))}
    ours, theirs = norm(sample), twin(norm)(sample)
    assert type(ours["spectrum"]) is Spectrum and bool((ours["spectrum"] == 7.0).all())
    torch.testing.assert_close(ours["spectrum"], theirs["spectrum"])
    torch.testing.assert_close(ours["image"], theirs["image"], rtol=0, atol=0)
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0, 0, 2, 2]]), format="XYXY", canvas_size=(4, 4))
    assert norm(boxes) is boxes and twin(norm)(boxes) is boxes


def test_during_a_fit_every_tvtensor_passes_through_untouched():
    norm = FitNormalize(cache=None)
    spectrum = make_spectrum(torch.rand(3, 4, 4))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0, 0, 2, 2]]), format="XYXY", canvas_size=(4, 4))
    with norm._capturing():
        assert norm(spectrum) is spectrum and norm(boxes) is boxes


def test_positional_arguments_match_v2():
    ours, theirs = FitNormalize(MEAN, STD, True), v2.Normalize(MEAN, STD, True)
    assert ours.inplace is theirs.inplace is True
    x = torch.rand(3, 4, 4)
    y = x.clone()
    ours(x), theirs(y)
    torch.testing.assert_close(x, y, rtol=0, atol=0)  # both changed their input in place


def test_hand_given_statistics_broadcast_like_v2_and_companions_follow():
    norm, plain = FitNormalize([0.5, 0.4, 0.3], [0.5], cache=None), v2.Normalize([0.5, 0.4, 0.3], [0.5])
    x = torch.rand(3, 4, 4)
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(norm.inverse()(norm(x)), x)
    bn = norm.to_batchnorm()
    torch.testing.assert_close(bn(x[None]).float()[0], plain(x), rtol=1e-6, atol=1e-6)
    one = FitNormalize([0.5], [0.5], cache=None)  # the common idiom on RGB images
    torch.testing.assert_close(one(x), v2.Normalize([0.5], [0.5])(x), rtol=0, atol=0)
    exported = torch.export.export(nn.Sequential(norm), (x[None],))
    torch.testing.assert_close(exported.module()(x[None])[0], plain(x), rtol=0, atol=0)


def test_zero_std_error_matches_torchvision():
    with pytest.raises(ValueError, match=r"^std evaluated to zero, leading to division by zero\.$"):
        v2.Normalize([0.5], [0.0])(torch.rand(1, 2, 2))
    with pytest.raises(ValueError, match=r"^std evaluated to zero, leading to division by zero\.$"):
        FitNormalize([0.5], [0.0], cache=None)(torch.rand(1, 2, 2))


def test_std_reassigned_after_construction_is_still_checked_for_underflow():
    norm = FitNormalize([0.0], [1.0], cache=None)
    norm(torch.rand(1, 2, 2, dtype=torch.float16))
    norm.std = [1e-10]
    with pytest.raises(ValueError, match="std evaluated to zero after conversion to torch.float16"):
        norm(torch.rand(1, 2, 2, dtype=torch.float16))


def test_objects_pickled_by_release_0_1_0_load_and_run():
    with open(DATA / "fitnormalize_0.1.0.pkl", "rb") as file:
        saved = pickle.load(file)
    x = torch.rand(3, 4, 4)
    fitted, given = saved["fitted"], saved["given"]
    assert fitted.mean == saved["mean"] and fitted.stats is not None and fitted.fit_record is None
    torch.testing.assert_close(fitted(x), v2.Normalize(saved["mean"], saved["std"])(x), rtol=0, atol=0)
    torch.testing.assert_close(given(x), v2.Normalize([0.5, 0.4, 0.3], [0.2, 0.2, 0.2])(x), rtol=0, atol=0)
    refit = fitted.partial_fit(torch.rand(2, 3, 4, 4))
    assert refit.num_samples == 4 + 2
