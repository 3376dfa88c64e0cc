"""Fits of nodata, masks, percentiles, integer images and volumes through real passes, against numpy.

Real DataLoader workers, real gloo ranks, real cache files; every expected number from numpy on the kept pixels.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import on_ranks
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision import tv_tensors

from torchnormfit import FitNormalize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from ct import Cases  # noqa: E402 - the examples' generated data
from sentinel2 import Scenes  # noqa: E402

Q = (0.5, 99.5)


def numpy_truth(pixels: list[np.ndarray], q=Q) -> dict[str, list[float]]:
    return {"count": [float(p.size) for p in pixels], "mean": [float(p.mean()) for p in pixels],
            "std": [float(p.std()) for p in pixels],
            "low": [float(np.percentile(p, q[0])) for p in pixels], "high": [float(np.percentile(p, q[1])) for p in pixels]}


def scene_pixels(scenes: Scenes) -> list[np.ndarray]:
    stack = np.stack([scenes[i]["image"].numpy().astype(np.float64) for i in range(len(scenes))])
    return [stack[:, c][stack[:, c] != 0] for c in range(stack.shape[1])]


def case_pixels(cases: Cases) -> list[np.ndarray]:
    plain = Cases(cases.n, cases.depth, cases.size, cases.seed)
    kept = [plain[i][0].numpy()[plain[i][1].numpy() != 0] for i in range(len(plain))]
    return [np.concatenate(kept).astype(np.float64)]


def assert_fitted(norm: FitNormalize, want: dict[str, list[float]], clip: bool = True) -> None:
    assert norm.stats.count.tolist() == want["count"]
    np.testing.assert_allclose(norm.mean, want["mean"], rtol=1e-12)
    np.testing.assert_allclose(norm.std, want["std"], rtol=1e-12)
    if clip:
        assert norm.clip_low == want["low"] and norm.clip_high == want["high"]  # exact: counts per value


# --- multi-band uint16 with nodata -----------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_uint16_scenes_with_nodata_any_worker_count(workers):
    scenes = Scenes(n=10, size=24)
    norm = FitNormalize(ignore=0, clip=Q, cache=None).fit(scenes, num_workers=workers, batch_size=3, progress=False)
    assert_fitted(norm, numpy_truth(scene_pixels(scenes)))
    assert norm.integer_input
    out = norm(scenes[3]["image"])
    assert out.dtype == torch.float32 and bool((out[:, scenes[3]["image"][0] == 0] == 0).all())


def test_partial_fit_of_datasets_merges_counts_exactly():
    a, b = Scenes(n=4, size=16, seed=1), Scenes(n=5, size=16, seed=2)
    norm = FitNormalize(ignore=0, clip=Q, cache=None)
    norm.partial_fit(a, num_workers=0, progress=False).partial_fit(b, num_workers=2, progress=False)
    pixels = [np.concatenate([p, q]) for p, q in zip(scene_pixels(a), scene_pixels(b))]
    assert_fitted(norm, numpy_truth(pixels))
    assert norm.num_samples == 9


# --- CT volumes, a foreground mask, clip -------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_ct_volumes_with_the_mask_in_the_pipeline(workers):
    norm = FitNormalize(clip=Q, spatial_dims=3, cache=None)
    cases = Cases(n=5, depth=6, size=20, transform=norm)
    norm.fit(cases, mask=tv_tensors.Mask, num_workers=workers, progress=False)
    want = numpy_truth(case_pixels(cases))
    assert_fitted(norm, want)
    image, label = cases[1]
    raw = Cases(n=5, depth=6, size=20)[1][0].numpy().astype(np.float64)
    expected = (np.clip(raw, want["low"][0], want["high"][0]) - want["mean"][0]) / want["std"][0]
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_mask_function_and_a_dictionary_key_give_the_same_numbers():
    cases = Cases(n=4, depth=4, size=16)
    want = numpy_truth(case_pixels(cases))
    by_function = FitNormalize(clip=Q, spatial_dims=3, cache=None)
    by_function.fit(cases, mask=lambda sample: sample[1], num_workers=0, progress=False)
    assert_fitted(by_function, want)

    class AsDicts(Dataset):
        def __len__(self):
            return len(cases)

        def __getitem__(self, i):
            image, label = cases[i]
            return {"mask": label.as_subclass(torch.Tensor), "image": image.as_subclass(torch.Tensor)}

    by_key = FitNormalize(clip=Q, spatial_dims=3, cache=None).fit(AsDicts(), mask="mask", num_workers=2,
                                                                  progress=False)
    assert_fitted(by_key, want)
    with pytest.raises(KeyError, match="mask='labels'.*'mask', 'image'"):
        FitNormalize(spatial_dims=3, cache=None).fit(AsDicts(), mask="labels", num_workers=0, progress=False)


# --- float images with NaN, a stream over workers ------------------------------------------------------


class NanStream(IterableDataset):
    """12 float images with NaN holes, each DataLoader worker yielding its own part."""

    def __iter__(self):
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, 12, step):
            yield nan_image(i)


def nan_image(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x = 0.2 + 0.5 * torch.rand(3, 10, 10, generator=g)
    x[torch.rand(3, 10, 10, generator=g) < 0.3] = float("nan")
    return x


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_of_float_images_with_nan_pixels(workers):
    norm = FitNormalize(ignore=float("nan"), clip=(1, 99), cache=None)
    norm.fit(NanStream(), num_workers=workers, progress=False)
    stack = torch.stack([nan_image(i) for i in range(12)]).double().numpy()
    pixels = [stack[:, c][~np.isnan(stack[:, c])] for c in range(3)]
    want = numpy_truth(pixels, (1, 99))
    assert norm.stats.count.tolist() == want["count"]
    np.testing.assert_allclose(norm.mean, want["mean"], rtol=1e-6)
    np.testing.assert_allclose(norm.std, want["std"], rtol=1e-6)
    np.testing.assert_allclose(norm.clip_low, want["low"], rtol=2**-10)  # float data: within 2**-11 per bucket
    np.testing.assert_allclose(norm.clip_high, want["high"], rtol=2**-10)
    out = norm(nan_image(0))
    assert torch.isnan(out).sum() == torch.isnan(nan_image(0)).sum()  # NaN in, NaN out


# --- the cache --------------------------------------------------------------------------------------------


def test_the_cache_keeps_percentiles_and_units_and_the_options_change_the_key(tmp_path):
    scenes = Scenes(n=6, size=16)
    cache = tmp_path / "stats.h5"
    first = FitNormalize(ignore=0, clip=Q, cache=cache).fit(scenes, num_workers=0, progress=False)
    again = FitNormalize(ignore=0, clip=Q, cache=cache).fit(scenes, num_workers=0, progress=False)
    assert first.fit_record.source == "pass" and again.fit_record.source == "cache"
    assert again.fit_record.verification is not None and again.fit_record.verification.passed
    assert again.clip_low == first.clip_low and again.clip_high == first.clip_high and again.integer_input
    assert torch.equal(again(scenes[0]["image"]), first(scenes[0]["image"]))
    plain = FitNormalize(cache=cache).fit(scenes, num_workers=0, progress=False)
    other = FitNormalize(ignore=0, clip=(1, 99), cache=cache).fit(scenes, num_workers=0, progress=False)
    assert plain.fit_record.source == "pass" and plain.cache_key != first.cache_key  # nodata counted: another entry
    assert other.fit_record.source == "cache"  # clip percentiles come from the same counts: one entry serves both
    assert other.clip_low == numpy_truth(scene_pixels(scenes), (1, 99))["low"]
    loaded = FitNormalize.from_cache(cache, first.cache_key)
    assert loaded.stats.values is not None and loaded.integer_input


# --- two gloo ranks -----------------------------------------------------------------------------------------


def _rank_fit(rank, world_size, workdir):
    sys.path.insert(0, str(ROOT / "examples"))
    norm = FitNormalize(clip=Q, spatial_dims=3, cache=None)
    cases = Cases(n=5, depth=4, size=16, transform=norm)
    norm.fit(cases, mask=tv_tensors.Mask, num_workers=0, batch_size=2, progress=False)
    return {"count": norm.stats.count.tolist(), "mean": norm.mean, "std": norm.std, "low": norm.clip_low,
            "high": norm.clip_high}


def test_two_gloo_ranks_merge_counts_exactly(tmp_path):
    results = on_ranks(tmp_path, _rank_fit)
    assert results[0] == results[1]
    want = numpy_truth(case_pixels(Cases(n=5, depth=4, size=16)))
    assert results[0]["count"] == want["count"]
    assert results[0]["low"] == want["low"] and results[0]["high"] == want["high"]
    np.testing.assert_allclose(results[0]["mean"], want["mean"], rtol=1e-12)
    np.testing.assert_allclose(results[0]["std"], want["std"], rtol=1e-12)


# --- the examples ---------------------------------------------------------------------------------------------


def test_the_sentinel2_example_runs(capsys):
    norm = runpy.run_path(str(ROOT / "examples" / "sentinel2.py"))["main"](["--scenes", "6", "--size", "24",
                                                                            "--workers", "0"])
    assert "nodata pixels set to 0" in capsys.readouterr().out
    assert norm.stats.count.tolist() == numpy_truth(scene_pixels(Scenes(6, 24)))["count"]


def test_the_ct_example_runs(capsys):
    norm = runpy.run_path(str(ROOT / "examples" / "ct.py"))["main"](["--cases", "3", "--depth", "4", "--size", "16",
                                                                     "--workers", "0"])
    assert "0.5 / 99.5 percentiles" in capsys.readouterr().out
    assert_fitted(norm, numpy_truth(case_pixels(Cases(3, 4, 16))))


class CaseStream(IterableDataset):
    """The CT cases as a stream whose pipeline ends in the FitNormalize (split across workers)."""

    def __init__(self, transform):
        self.cases = Cases(n=5, depth=4, size=16, transform=transform)

    def __iter__(self):
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, len(self.cases), step):
            yield self.cases[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_with_the_mask_in_its_pipeline(workers):
    """A stream's sample cannot be stopped: FitNormalize hands over the image and the Mask beside it and lets
    the sample go on; the numbers are numpy's of the foreground."""
    norm = FitNormalize(clip=Q, spatial_dims=3, cache=None)
    norm.fit(CaseStream(norm), mask=tv_tensors.Mask, num_workers=workers, progress=False)
    assert_fitted(norm, numpy_truth(case_pixels(Cases(n=5, depth=4, size=16))))
