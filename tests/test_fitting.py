"""The fit pass: exact statistics through real DataLoaders, in-pipeline capture, bad input."""

import multiprocessing
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from datasets_for_tests import CountingDataset, FailingDataset
from reference import truth
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as v1
from torchvision import tv_tensors
from torchvision.datasets import FakeData, ImageFolder
from torchvision.transforms import v2

from torchnormfit import FitNormalize, NotFittedError
from torchnormfit.passes import SampleMismatch, default_batch_size

TO_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def assert_exact(norm, images):
    """Float64 images: within 1e-12 relative of the float64 truth; lower precisions: the README's 1e-6."""
    rtol = 1e-12 if images[0].dtype == torch.float64 else 1e-6
    want = truth(images)
    torch.testing.assert_close(torch.tensor(norm.mean, dtype=torch.float64), want["mean"], rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(norm.std, dtype=torch.float64), want["std"], rtol=rtol, atol=0)


def fit(dataset, norm=None, **kwargs):
    norm = norm if norm is not None else FitNormalize(cache=None)
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("progress", False)
    return norm.fit(dataset, **kwargs)


# --- exactness ---------------------------------------------------------------------------------


def adversarial_images():
    """Sorted by class, batches of very different brightness, mean 0.5 / std 0.05 overall."""
    g = torch.Generator().manual_seed(0)
    classes = []
    for level in (0.42, 0.58, 0.45, 0.55):
        classes.append(torch.randn(37, 3, 6, 6, generator=g) * 0.02 + level)
    return torch.cat(classes)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_on_adversarial_orders_and_short_last_batch(batch_size, dtype):
    images = adversarial_images().to(dtype)
    norm = fit(TensorDataset(images, torch.zeros(len(images))), batch_size=batch_size)
    assert_exact(norm, list(images))
    assert norm.stats.count.tolist() == [len(images) * 36.0] * 3


def test_order_does_not_matter():
    images = adversarial_images()
    forward = fit(TensorDataset(images), batch_size=10)
    backward = fit(TensorDataset(images.flip(0)), batch_size=13)
    torch.testing.assert_close(torch.tensor(forward.mean), torch.tensor(backward.mean), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(forward.std), torch.tensor(backward.std), rtol=1e-9, atol=0)


def test_mixed_size_png_folder_weighs_every_pixel_the_same(tmp_path):
    rng = np.random.default_rng(1)
    for index, (w, h) in enumerate([(5, 7), (16, 3), (9, 9), (31, 17), (5, 7), (2, 40)]):
        folder = tmp_path / f"class{index % 2}"
        folder.mkdir(exist_ok=True)
        array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // (index + 1)
        PIL.Image.fromarray(array).save(folder / f"img{index}.png")
    norm = FitNormalize(cache=None)
    dataset = ImageFolder(tmp_path, transform=v1.Compose([v1.ToTensor(), norm]))
    fit(dataset, norm, batch_size=4)
    reference = ImageFolder(tmp_path, transform=v1.ToTensor())
    assert_exact(norm, [reference[i][0] for i in range(len(reference))])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_processes_give_the_same_exact_result(context):
    norm = FitNormalize(cache=None)
    dataset = CountingDataset(n=30, transform=norm)
    torch.multiprocessing.set_start_method(context, force=True)
    try:
        fit(dataset, norm, num_workers=2, batch_size=4)
    finally:
        torch.multiprocessing.set_start_method(None, force=True)
    assert_exact(norm, [dataset.image(i) for i in range(30)])
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(("shape", "dtype", "expected"), [
    ((3, 32, 32), torch.float32, 256),  # small images: at most 256
    ((3, 224, 224), torch.float32, 111),  # 64 MiB of images
    ((3, 224, 224), torch.float16, 222),
    ((3, 1024, 1024), torch.float32, 5),
    ((3, 4096, 4096), torch.float32, 1),  # one image is more than 64 MiB: one at a time
    ((1, 1, 1), torch.float64, 256),
])
def test_default_batch_size_holds_64_mib_of_images(shape, dtype, expected):
    assert default_batch_size(torch.empty(shape, dtype=dtype)) == expected
    assert default_batch_size(torch.empty(shape, dtype=dtype), num_samples=100_000, num_workers=8) == expected


@pytest.mark.parametrize(("num_samples", "num_workers", "expected"), [
    (1000, 2, 32),  # 16 batches per worker
    (1001, 2, 32),  # rounded up
    (1000, 0, 63),  # the main process counts as one worker
    (10, 4, 1),
    (50_000, 2, 111),  # enough samples: the size decides
])
def test_default_batch_size_gives_each_worker_16_batches(num_samples, num_workers, expected):
    image = torch.empty(3, 224, 224)
    assert default_batch_size(image, num_samples=num_samples, num_workers=num_workers) == expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_without_batch_size_every_sample_is_read_once(tmp_path, num_workers):
    """The first sample, read to choose the batch size, is the first batch: no sample is read twice."""
    log = tmp_path / "reads.txt"
    norm = FitNormalize(cache=None)
    dataset = CountingDataset(n=45, transform=norm, log=log)
    fit(dataset, norm, num_workers=num_workers)
    assert sorted(int(line) for line in log.read_text().split()) == list(range(45))
    assert_exact(norm, [dataset.image(i) for i in range(45)])


def test_batches_larger_than_the_stacking_budget_stay_exact():
    """A batch of 40 images of 3x224x224 (24 MB) is stacked and reduced in pieces of at most 8 MiB."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(40, 3, 224, 224, generator=g) * 0.1 + torch.linspace(0, 0.9, 40)[:, None, None, None]
    norm = fit(TensorDataset(images), batch_size=40)
    assert_exact(norm, list(images))
    assert norm.stats.min.tolist() == images.amin(dim=(0, 2, 3)).double().tolist()
    assert norm.stats.max.tolist() == images.amax(dim=(0, 2, 3)).double().tolist()


def test_images_that_require_grad_are_measured_as_values():
    images = torch.rand(10, 3, 8, 8, requires_grad=True)

    class Grad(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            return images[index] * 1.0  # part of a graph

    norm = fit(Grad(), batch_size=4)
    assert_exact(norm, list(images.detach()))


def test_the_pass_leaves_the_thread_count_alone(tmp_path):
    """The reduction runs on one thread; the user's transforms and the caller keep their thread count."""
    seen = []

    class Threads(CountingDataset):
        def __getitem__(self, index):
            seen.append(torch.get_num_threads())
            return super().__getitem__(index)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit(Threads(n=20), batch_size=6)
        FitNormalize(cache=None).partial_fit(torch.rand(4, 3, 8, 8))
        assert torch.get_num_threads() == 2
        assert seen == [2] * 20
    finally:
        torch.set_num_threads(before)


def test_fakedata_through_v2_pipeline_matches_truth():
    norm = FitNormalize(cache=None)
    dataset = FakeData(size=50, image_size=(3, 10, 12), transform=v2.Compose([TO_FLOAT, norm]))
    fit(dataset, norm, batch_size=16, num_workers=2)
    plain = FakeData(size=50, image_size=(3, 10, 12), transform=TO_FLOAT)
    assert_exact(norm, [plain[i][0] for i in range(50)])


# --- the transform inside its own dataset -------------------------------------------------------


def test_in_pipeline_transform_passes_images_through_and_later_transforms_do_not_count():
    norm = FitNormalize(cache=None)
    erase = v2.RandomErasing(p=1.0, value=100.0)
    dataset = CountingDataset(n=24, transform=v2.Compose([norm, erase]))
    fit(dataset, norm, batch_size=5, num_workers=2)
    assert_exact(norm, [dataset.image(i) for i in range(24)])
    torch.manual_seed(0)  # the same erased box in both
    x, _ = dataset[3]  # after fitting: normalized, then erased
    torch.manual_seed(0)
    expected = erase(v2.Normalize(norm.mean, norm.std)(dataset.image(3)))
    assert torch.equal(x, expected) and (x == 100.0).any() and not (x == 100.0).all()


def test_in_place_transform_after_it_does_not_change_what_is_measured():
    norm = FitNormalize(cache=None)
    dataset = CountingDataset(n=10, transform=v1.Compose([norm, v1.Normalize([5.0] * 3, [2.0] * 3, inplace=True)]))
    fit(dataset, norm)
    assert_exact(norm, [dataset.image(i) for i in range(10)])


def test_refit_measures_raw_images_not_normalized_ones():
    norm = FitNormalize(cache=None)
    dataset = CountingDataset(n=10, transform=norm)
    fit(dataset, norm)
    first = list(norm.mean)
    fit(dataset, norm, refit=True)
    assert norm.mean == pytest.approx(first, rel=1e-12)


def test_samples_as_dicts_images_and_custom_extractor():
    images = adversarial_images()[:20]

    class Dicts(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"label": torch.tensor(i), "image": tv_tensors.Image(images[i])}

    assert_exact(fit(Dicts()), list(images))

    class Nested(Dicts):
        def __getitem__(self, i):
            return {"meta": torch.zeros(5, 5, 5), "pixels": images[i]}

    assert_exact(fit(Nested(), image=lambda sample: sample["pixels"]), list(images))


# --- bad input ---------------------------------------------------------------------------------


class ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_pil_images_through_the_pipeline_get_the_fix():
    norm = FitNormalize(cache=None)
    with pytest.raises(TypeError, match="does not support PIL images"):
        fit(FakeData(size=3, image_size=(3, 4, 4), transform=norm), norm)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_non_finite_pixel_names_the_sample(value, num_workers):
    images = [torch.rand(3, 4, 4) for _ in range(10)]
    images[6][1, 2, 3] = value
    with pytest.raises(ValueError, match="Sample 6 contains NaN or Inf"):
        fit(ListDataset(images), batch_size=4, num_workers=num_workers)


@pytest.mark.parametrize("batch_size", [2, 8])
def test_channel_count_change_names_the_sample(batch_size):
    images = [torch.rand(3, 4, 4) for _ in range(6)] + [torch.rand(1, 4, 4)]
    with pytest.raises(ValueError, match=r"Sample 6 has 1 channels, but sample \d has 3"):
        fit(ListDataset(images), batch_size=batch_size)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 4])  # across batches (found here), or within one (found in a worker)
@pytest.mark.parametrize("kind", ["channels", "units"])
def test_a_sample_mismatch_carries_both_indices(num_workers, batch_size, kind):
    """SampleMismatch, a ValueError, names the two samples by index, however it crossed from a worker."""
    images = [torch.rand(3, 4, 4) for _ in range(6)]
    images.append(torch.rand(1, 4, 4) if kind == "channels" else torch.randint(0, 255, (3, 4, 4), dtype=torch.uint8))
    with pytest.raises(SampleMismatch) as caught:
        fit(ListDataset(images), batch_size=batch_size, num_workers=num_workers)
    error = caught.value
    got, expected = (1, 3) if kind == "channels" else ("integer", "float")
    assert isinstance(error, ValueError) and (error.kind, error.got, error.expected) == (kind, got, expected)
    assert error.index == 6 and error.first_index == (4 if batch_size == 4 else 0)
    assert str(error).startswith(f"Sample 6 {'has 1 channels' if kind == 'channels' else 'holds integer'}")


def test_a_sample_mismatch_pickles_and_is_built_from_its_message_alone():
    """Pickled (a worker's Failure) it keeps its indices; from the message alone (DataLoader's ExceptionWrapper
    re-raises as ``exc_type(message)``) it is still a SampleMismatch, with no indices."""
    error = SampleMismatch("Sample 6 has 1 channels, but sample 0 has 3.", 6, 0, "channels", 1, 3)
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.index, again.first_index, again.kind, again.got) == (str(error), 6, 0, "channels", 1)
    bare = SampleMismatch(str(error))
    assert str(bare) == str(error) and bare.index is None and bare.first_index is None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exception_mid_pass_leaves_it_unfitted_uncached_and_without_workers(tmp_path, num_workers):
    cache = tmp_path / "cache"
    norm = FitNormalize(cache=cache)
    dataset = FailingDataset(fail_at=13, n=30, transform=norm)
    with pytest.raises(RuntimeError, match="Sample 13: reading the dataset failed: broken sample 13"):
        fit(dataset, norm, batch_size=4, num_workers=num_workers)
    assert norm.mean is None and not cache.exists()
    assert multiprocessing.active_children() == []
    with pytest.raises(NotFittedError):
        norm(torch.rand(3, 8, 8))


def test_keyboard_interrupt_leaves_it_unfitted_and_uncached(tmp_path):
    cache = tmp_path / "cache"
    norm = FitNormalize(cache=cache)
    with pytest.raises(KeyboardInterrupt):
        fit(FailingDataset(fail_at=5, error=KeyboardInterrupt, n=12, transform=norm), norm, batch_size=4)
    assert norm.mean is None and not cache.exists() and norm._capture is None


def _peak_growth_mib(num_images: int, conn) -> None:
    """In a forked child: how far the peak RSS rises above the RSS before a fit of ``num_images`` 3x64x64 images."""
    def status(field):
        line = next(row for row in open("/proc/self/status") if row.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    norm = fit(CountingDataset(n=num_images, size=64), batch_size=10)
    assert norm.stats.count[0] == num_images * 64 * 64
    conn.send(status("VmHWM") - before)


def test_memory_stays_bounded_by_the_batch():
    """Images are reduced batch by batch: ten times the data (96 MB more of images) costs no more memory."""
    growth = {}
    for num_images in (200, 2000):
        parent, child = multiprocessing.Pipe()
        process = multiprocessing.get_context("fork").Process(target=_peak_growth_mib, args=(num_images, child))
        process.start()
        growth[num_images] = parent.recv()
        process.join()
        assert process.exitcode == 0
    assert growth[2000] - growth[200] < 8, growth  # a batch of 10 images is 1.5 MB


def _fit_large_images(conn):
    images = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))  # above torch's parallel grain
    norm = FitNormalize(cache=None).fit(TensorDataset(images), num_workers=0, batch_size=2, progress=False)
    conn.send(norm.mean)


def test_a_fit_in_a_process_forked_after_torch_used_threads_finishes():
    """A forked child inherits no usable OpenMP pool: a fit in it that ran a multi-threaded op would wait forever
    (as torch.distributed ranks and test harnesses fork). The pass reduces with one thread."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs torch to use 2 or more threads here")
    torch.rand(1000, 1000).round().sum()  # the parent's thread pool is started
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(target=_fit_large_images, args=(child,))
    process.start()
    process.join(timeout=60)
    if process.is_alive():
        process.kill()
        process.join()
    assert process.exitcode == 0 and parent.poll() and len(parent.recv()) == 3
