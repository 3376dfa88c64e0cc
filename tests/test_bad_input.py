"""Every bad input tried, and what the user sees: a table (mirrored in the README's "Errors you may see")."""

import warnings

import PIL.Image
import pytest
import torch
from torch.utils.data import Dataset

from torchnormfit import FitNormalize, NotFittedError

FIX = r"Add ToTensor\(\) or v2.ToDtype\(torch.float32, scale=True\)"


class Items(Dataset):
    """A dataset of the given samples; ``length`` may lie."""

    def __init__(self, items, length=None):
        self.items, self.length = items, length

    def __len__(self):
        return len(self.items) if self.length is None else self.length

    def __getitem__(self, index):
        return self.items[index]


def images(n=6, channels=3, scale=1.0):
    return [torch.rand(channels, 4, 4) * scale for _ in range(n)]


def with_pixel(value, at=4):
    items = images()
    items[at][1, 2, 3] = value
    return items


FIT_ERRORS = [
    ("PIL image", [PIL.Image.new("RGB", (4, 4))], TypeError, "Sample 0: FitNormalize\\(\\) does not support PIL images. " + FIX),
    # uint8, int8, int16, uint16 and int32 images are fitted in their own units (tests/test_scientific.py)
    ("uint32 tensor", [torch.zeros(3, 4, 4, dtype=torch.uint32)], TypeError, "Sample 0: Input tensor should be a float tensor or an integer tensor .*Got torch.uint32. " + FIX),
    ("int tensor", [torch.zeros(3, 4, 4, dtype=torch.int64)], TypeError, "Got torch.int64. " + FIX),
    ("bool tensor", [torch.zeros(3, 4, 4, dtype=torch.bool)], TypeError, "Got torch.bool. " + FIX),
    ("complex tensor", [torch.zeros(3, 4, 4, dtype=torch.complex64)], TypeError, "Got torch.complex64. " + FIX),
    ("1-D tensor", [torch.rand(16)], ValueError, r"Sample 0: Expected tensor to be a tensor image of size \(\.\.\., C, H, W\). Got \(16,\)"),
    ("2-D tensor", [torch.rand(4, 4)], ValueError, r"Got \(4, 4\)"),
    ("NaN pixel", with_pixel(float("nan")), ValueError, "Sample 4 contains NaN or Inf pixel values"),
    ("Inf pixel", with_pixel(float("inf")), ValueError, "Sample 4 contains NaN or Inf pixel values"),
    ("mixed channel counts", images() + images(1, channels=1), ValueError, r"Sample 6 has 1 channels, but sample \d has 3"),
    ("empty dataset", [], ValueError, "is empty: there are no pixels"),
    ("__len__ lies", Items(images(3), length=5), IndexError, "Sample 3: reading the dataset failed"),
    ("dataset yields None", [None], TypeError, "Sample 0: found no image tensor .* pass image="),
    ("dataset yields a string", ["image.png"], TypeError, "Sample 0: found no image tensor in a sample of type str"),
]


@pytest.mark.parametrize("name, items, error, message", FIT_ERRORS, ids=[row[0] for row in FIT_ERRORS])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_rejects_bad_input_naming_what_and_the_fix(name, items, error, message, num_workers, tmp_path):
    dataset = items if isinstance(items, Dataset) else Items(items)
    norm = FitNormalize(cache=tmp_path / "cache")
    with pytest.raises(error, match=message):
        norm.fit(dataset, num_workers=num_workers, batch_size=4, progress=False)
    assert norm.mean is None
    assert not (tmp_path / "cache").exists()


FIT_WARNINGS = [
    ("0-255 float data", images(scale=255.0), "the data looks scaled to 0-255, not 0-1"),
    ("0-255 whole numbers", [torch.randint(0, 256, (3, 4, 4)).float() for _ in range(6)],
     r"reach \d+ and \d+% of those checked are above 1, all whole numbers: the data looks scaled to 0-255"),
    ("constant channel", [torch.stack([im[0], torch.full((4, 4), 0.3), im[2]]) for im in images()],
     r"Channel\(s\) \[1\] have \(near\) zero variance: their std is set to 1.0"),
]


@pytest.mark.parametrize("name, items, message", FIT_WARNINGS, ids=[row[0] for row in FIT_WARNINGS])
def test_fit_warns_on_suspicious_data_and_still_gives_finite_stats(name, items, message):
    with pytest.warns(UserWarning, match=message):
        norm = FitNormalize(cache=None).fit(Items(items), num_workers=0, progress=False)
    assert all(torch.isfinite(torch.tensor(norm.mean + norm.std))) and min(norm.std) > 0


NOT_0_255 = [
    ("floats up to 2.99", images(scale=2.99)),
    ("whole numbers mostly 0 and 1", [torch.randint(0, 2, (3, 4, 4)).float() + (i == 0) for i in range(6)]),
    ("0-1 data", images()),
]


@pytest.mark.parametrize("name, items", NOT_0_255, ids=[row[0] for row in NOT_0_255])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_above_1_that_is_not_plausibly_0_255_fits_without_a_warning(name, items, num_workers):
    """The 0-255 warning needs most pixels above 1 and whole numbers (or a maximum far above 1)."""
    assert max(float(im.max()) for im in items) > 1 or name == "0-1 data"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FitNormalize(cache=None).fit(Items(items), num_workers=num_workers, batch_size=2, progress=False)


def test_constant_channel_keeps_its_true_statistics():
    items = [torch.stack([im[0], torch.full((4, 4), 0.3), im[2]]) for im in images()]
    with pytest.warns(UserWarning):
        norm = FitNormalize(cache=None).fit(Items(items), num_workers=0, progress=False)
    assert norm.std[1] == 1.0 and norm.stats.std[1] == 0.0 and norm.stats.mean[1] == torch.tensor(0.3).item()


CALL_ERRORS = [
    ("PIL image", PIL.Image.new("RGB", (4, 4)), TypeError, "does not support PIL images. " + FIX),
    ("uint8 tensor", torch.zeros(3, 4, 4, dtype=torch.uint8), TypeError, "Got torch.uint8. " + FIX),
    ("complex tensor", torch.zeros(3, 4, 4, dtype=torch.complex64), TypeError, "Got torch.complex64"),
    ("1-D tensor", torch.rand(16), ValueError, r"size \(\.\.\., C, H, W\)"),
    ("wrong channel count", torch.rand(1, 4, 4), ValueError, "statistics for 3 channels, but the input has 1"),
]


@pytest.mark.parametrize("name, inpt, error, message", CALL_ERRORS, ids=[row[0] for row in CALL_ERRORS])
def test_transform_rejects_bad_input(name, inpt, error, message):
    fitted = FitNormalize(cache=None).partial_fit(torch.rand(2, 3, 4, 4))  # fitted: its channel count is known
    with pytest.raises(error, match=message):
        fitted(inpt)


def test_transform_before_fit_says_what_to_do():
    with pytest.raises(NotFittedError, match=r"Call \.fit\(dataset\) first, or pass mean=\[\.\.\.\] and std=\[\.\.\.\]"):
        FitNormalize(cache=None)(torch.rand(3, 4, 4))
