"""A cache hit never hands back another dataset's statistics (issue 10).

Two real processes share one cache file; between them the data or the pipeline changes as users change them.
The second run must return the new data's true statistics (by a new key, or by a hit that verification refused),
and a third run on unchanged data must be a verified hit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from _trust_worker import STALE
from datasets_for_tests import CountingDataset, FileList, Holder
from torch import nn
from torch.utils.data import Dataset, StackDataset
from torchvision.datasets import FakeData, ImageFolder
from torchvision.transforms import v2

from torchnormfit import CacheWarning, FitNormalize, list_entries
from torchnormfit.key import fingerprint

TESTS = Path(__file__).parent
SCENARIOS = ["numpy_subset", "pipeline_elsewhere", "wrapped_folder", "reexported_folder", "one_of_130_swapped",
             "image_lambda", "image_itemgetter", "hf_map", "pandas_csv", "csv_files_reexported", "invisible_change"]
KEY_SEES_IT = set(SCENARIOS) - {"invisible_change"}
TO_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def png(path, value, size=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(0, 20, (size, size, 3))
    PIL.Image.fromarray(np.clip(value + noise, 0, 255).astype(np.uint8)).save(path)


def make_work(work: Path):
    for name, value in (("dark", 20), ("bright", 220)):
        for i in range(6):
            png(work / name / "c" / f"{i}.png", value, seed=i)
    for i in range(6):
        png(work / "reexported" / "c" / f"{i}.png", 30, seed=i)
    for i in range(130):
        png(work / "many" / "c" / f"{i:03d}.png", 40, seed=i)
    for i in range(8):
        png(work / "csv_images" / f"{i}.png", 30 + 25 * i, seed=i)
    (work / "list_a.csv").write_text("file,label\n" + "".join(f"{i}.png,0\n" for i in range(4)))
    (work / "list_b.csv").write_text("file,label\n" + "".join(f"{i}.png,0\n" for i in range(4, 8)))
    (work / "list_r.csv").write_text("file,label\n" + "".join(f"{i}.png,1\n" for i in range(4)))
    import datasets

    rng = np.random.default_rng(0)
    datasets.Dataset.from_dict({"pixels": rng.random((10, 3, 4, 4)).tolist()}).save_to_disk(str(work / "hf"))


def run(cache, work, variant, level="1.0", names=SCENARIOS):
    """One run of the user's script (tests/_trust_worker.py) in ``work``, no bytecode written (a module edited
    within the second of its import must be read again)."""
    result = subprocess.run(
        [sys.executable, str(TESTS / "_trust_worker.py"), str(cache), str(work), variant, *names],
        capture_output=True, text=True, timeout=600, cwd=work, check=False,
        env={**os.environ, "TNF_LEVEL": level, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    make_work(work)
    cache = work / "shared.h5"
    first = run(cache, work, "a", level="1.0")
    for i in range(6):  # re-exported under the same names
        png(work / "reexported" / "c" / f"{i}.png", 200, seed=i)
    png(work / "many" / "c" / "077.png", 255, seed=1)  # one file of 130 swapped
    for i in range(4):  # the files list_r.csv names (it does not change), re-exported
        png(work / "csv_images" / f"{i}.png", 250, seed=i)
    second = run(cache, work, "b", level="0.5")
    third = run(cache, work, "b", level="0.5")
    return first, second, third


@pytest.mark.parametrize("name", SCENARIOS)
def test_second_process_gets_the_changed_datas_statistics(runs, name):
    first, second, _ = runs
    a, b = first[name], second[name]
    assert a["source"] == "pass" and a["mean"] == pytest.approx(a["true_mean"], rel=1e-9)
    assert b["true_mean"] != pytest.approx(a["true_mean"], rel=1e-6)  # the change is one the statistics see
    assert b["mean"] == pytest.approx(b["true_mean"], rel=1e-9) and b["std"] == pytest.approx(b["true_std"], rel=1e-9)
    assert b["source"] == "pass"
    if name in KEY_SEES_IT:
        assert b["key"] != a["key"] and b["verified"] is None
    else:  # same key: the hit was refused by verification, with a warning that names the key
        assert b["key"] == a["key"] and b["verified"] is False
        assert any(a["key"] in w and "does not match the data" in w for w in b["warnings"])


@pytest.mark.parametrize("name", SCENARIOS)
def test_third_process_on_unchanged_data_is_a_verified_hit(runs, name):
    _, second, third = runs
    assert third[name]["source"] == "cache" and third[name]["key"] == second[name]["key"]
    assert third[name]["verified"] is True and third[name]["mean"] == second[name]["mean"]
    assert not third[name]["warnings"]


# --- the key, in one process -----------------------------------------------------------------------------


def key(dataset, norm=None, **settings):
    return fingerprint(dataset, norm, {"image": None, **settings})


class Slotted(Dataset):
    __slots__ = ("level",)

    def __init__(self, level):
        self.level = level

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.full((3, 4, 4), self.level)


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(factor)))

    def forward(self, x):
        return x * self.weight


def loader_a(path):
    return PIL.Image.open(path).convert("RGB")


def loader_b(path):
    return PIL.Image.open(path).convert("L").convert("RGB")


def test_key_sees_state_kept_anywhere(tmp_path):
    big = {f"k{i}": i for i in range(100)}
    changed_big = {**big, "k57": -1}
    matrix = torch.eye(3 * 32 * 32)
    changed_matrix = matrix.clone()
    changed_matrix[1500, 1501] = 0.5  # in the middle: str() of the transform would hide it
    png(tmp_path / "c" / "0.png", 100)
    pairs = [
        (Holder(table=big), Holder(table=changed_big)),
        (Holder(levels={1, 2, 3}), Holder(levels={1, 2, 4})),
        (StackDataset(Holder(x=1), Holder(x=2)), StackDataset(Holder(x=1), Holder(x=3))),
        (ImageFolder(tmp_path, loader=loader_a), ImageFolder(tmp_path, loader=loader_b)),
        (Holder(transform=Scale(2.0)), Holder(transform=Scale(3.0))),
        (Holder(_private=1), Holder(_private=2)),
        (Slotted(0.1), Slotted(0.2)),
        (Holder(transform=v2.LinearTransformation(matrix, torch.zeros(3 * 32 * 32))),
         Holder(transform=v2.LinearTransformation(changed_matrix, torch.zeros(3 * 32 * 32)))),
        (Holder(values=np.arange(10, dtype=">f8")), Holder(values=np.arange(10, dtype=">f8") + 1)),
    ]
    for before, after in pairs:
        assert key(before).key != key(after).key, type(before).__name__


WEIRD_NUMPY = [
    np.array(["a", "b"]),
    np.array([{"x": 1}, None], dtype=object),
    np.array(["2020-01-01", "2021-01-01"], dtype="datetime64[D]"),
    np.array([1.5, 2.5], dtype=np.longdouble),
    np.arange(10)[::-1],
    np.arange(10, dtype=">i4"),
    np.float64(3.0),
    np.datetime64("2020-01-01"),
]


@pytest.mark.parametrize("value", WEIRD_NUMPY, ids=[repr(v)[:30] for v in WEIRD_NUMPY])
def test_numpy_attributes_of_any_dtype_and_layout_are_keyed_without_error(value):
    first = key(Holder(v=value))
    assert first.key == key(Holder(v=value.copy())).key and not first.gaps
    assert first.key != key(Holder(v=None)).key


def test_numpy_attributes_do_not_break_a_fit_with_or_without_a_key(tmp_path):
    for cache, given in ((None, None), (tmp_path / "c.h5", "named")):
        norm = FitNormalize(cache=cache, key=given)
        dataset = CountingDataset(n=6, transform=norm)
        dataset.extra = [np.array(["x"]), np.array([1.5], dtype=np.longdouble), np.arange(4)[::-1]]
        norm.fit(dataset, num_workers=0, progress=False)
        assert norm.fit_record.source == "pass" and (cache is None or norm.fit_record.written)


def test_a_dataset_that_refers_to_itself_is_keyed():
    inner = Holder(x=1)
    outer = Holder(inner=inner)
    inner.parent = outer
    assert key(outer).key == key(outer).key and not key(outer).gaps


def test_a_key_that_is_not_valid_unicode_is_refused_before_any_pass():
    with pytest.raises(ValueError, match="valid Unicode"):
        FitNormalize(key="stats-\udc80")


def test_opaque_state_is_a_gap_recorded_in_the_entry(tmp_path):
    import threading

    norm = FitNormalize(cache=tmp_path / "c.h5")
    dataset = CountingDataset(n=5, transform=norm)
    dataset.lock = threading.Lock()  # no attributes to describe
    norm.fit(dataset, num_workers=0, progress=False)
    assert norm.fit_record.key_gaps and "lock" in norm.fit_record.key_gaps[0]
    (entry,) = list_entries(tmp_path / "c.h5")
    assert "lock" in json.loads(entry.attrs["key_gaps"])[0]


KEY_SCRIPT = """
import sys, random; sys.path.insert(0, {tests!r})
from test_trust import Holder
from torchnormfit.key import fingerprint
files = [f"/data/img{{i}}.png" for i in range(500)]
random.shuffle(files)
print(fingerprint(Holder(files=files, classes={{"cat", "dog", "bird", "fish"}}), None, {{}}).key)
"""


def test_key_is_stable_across_hash_seeds_and_unseeded_shuffles():
    keys = {
        subprocess.run([sys.executable, "-c", KEY_SCRIPT.format(tests=str(TESTS))], capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
        for seed in (1, 2)
    }
    assert len(keys) == 1


class UsesAGlobalPipeline(Dataset):
    """A dataset whose pipeline is a module global, not something it holds: no key can find it."""

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return GLOBAL_PIPELINE(torch.rand(3, 4, 4))


GLOBAL_PIPELINE = None


def test_warns_when_the_fit_captured_through_a_transform_the_key_could_not_find(tmp_path, monkeypatch):
    norm = FitNormalize(cache=tmp_path / "c.h5")
    monkeypatch.setattr(sys.modules[__name__], "GLOBAL_PIPELINE", v2.Compose([norm]))
    with pytest.warns(UserWarning, match="could not find it there"):
        norm.fit(UsesAGlobalPipeline(), num_workers=0, progress=False)


# --- memoizing datasets -----------------------------------------------------------------------------------


class Memoizing(Dataset):
    """The 'RAM cache' pattern: transformed samples kept after their first read."""

    def __init__(self, transform, n=10):
        self.transform, self.n, self.memo = transform, n, {}

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if index not in self.memo:
            self.memo[index] = self.transform(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(index)) + 2)
        return self.memo[index]


@pytest.mark.parametrize("workers", [0, 2])
def test_no_sample_is_served_unnormalized_after_a_fit(workers):
    norm = FitNormalize(cache=None)
    dataset = Memoizing(v2.Compose([norm]))
    norm.fit(dataset, num_workers=workers, progress=False)
    served = torch.stack([dataset[i] for i in range(len(dataset))])
    assert abs(float(served.mean())) < 1e-5 and float(served.std()) == pytest.approx(1.0, rel=0.05)


def test_a_dataset_that_swallows_the_stop_gets_right_statistics_and_a_warning():
    norm = FitNormalize(cache=None)

    class Swallowing(Memoizing):
        def __getitem__(self, index):
            while True:
                try:
                    return super().__getitem__(index)
                except:  # noqa: E722 -- the pattern this test is about
                    continue

    dataset = Swallowing(v2.Compose([norm]))
    with pytest.warns(UserWarning, match="caught the signal"):
        norm.fit(dataset, num_workers=0, progress=False)
    truth = FitNormalize(cache=None).partial_fit(torch.stack([torch.rand(3, 4, 4, generator=torch.Generator()
                                                                          .manual_seed(i)) + 2 for i in range(10)]))
    assert norm.mean == pytest.approx(truth.mean, rel=1e-12)


# --- verification -----------------------------------------------------------------------------------------


def test_a_random_augmentation_on_a_small_dataset_stays_a_hit(tmp_path):
    cache = tmp_path / "c.h5"
    sources = []
    for _ in range(8):
        norm = FitNormalize(cache=cache)
        pipeline = v2.Compose([*TO_FLOAT.transforms, v2.RandomResizedCrop(16, antialias=True), norm])
        norm.fit(FakeData(size=40, image_size=(3, 24, 24), transform=pipeline), num_workers=0, progress=False)
        sources.append(norm.fit_record.source)
    assert sources == ["pass"] + ["cache"] * 7


def test_hit_records_what_it_checked(tmp_path):
    cache = tmp_path / "c.h5"
    norm = FitNormalize(cache=cache)
    norm.fit(CountingDataset(n=100, transform=norm), num_workers=0, progress=False)
    assert norm.fit_record.written and norm.fit_record.cache_path == cache
    again = FitNormalize(cache=cache)
    again.fit(CountingDataset(n=100, transform=again), num_workers=0, progress=False, verify=40)
    record = again.fit_record
    assert record.source == "cache" and record.verification.samples == 40 and record.verification.passed
    assert record.key == norm.fit_record.key and not record.written
    default = FitNormalize(cache=cache)
    default.fit(CountingDataset(n=100, transform=default), num_workers=0, progress=False)
    assert default.fit_record.verification.samples == 32  # the first stage of 64 was clearly unchanged


def test_changed_data_under_an_unchanged_key_refits_with_a_warning(tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    norm = FitNormalize(cache=cache)
    norm.fit(CountingDataset(n=60, transform=norm), num_workers=0, progress=False)
    monkeypatch.setenv("TNF_TEST_SHIFT", "0.1")
    again = FitNormalize(cache=cache)
    with pytest.warns(CacheWarning, match=r"does not match the data.*channel 0: the image means are higher"):
        again.fit(CountingDataset(n=60, transform=again), num_workers=0, progress=False)
    assert again.fit_record.source == "pass" and again.mean == pytest.approx([m + 0.1 for m in norm.mean])
    assert again.fit_record.written and again.fit_record.verification.passed is False
    assert again.fit_record.verification.samples == 30  # every image moved: the first stage (30 of 60) fails


def test_an_explicit_key_is_not_verified_unless_asked(tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    norm = FitNormalize(cache=cache, key="train")
    norm.fit(CountingDataset(n=30, transform=norm), num_workers=0, progress=False)
    monkeypatch.setenv("TNF_TEST_SHIFT", "0.3")  # another dataset, the train statistics on purpose
    shared = FitNormalize(cache=cache, key="train")
    shared.fit(CountingDataset(n=30, transform=shared), num_workers=0, progress=False)
    assert shared.mean == norm.mean and shared.fit_record.verification is None
    asked = FitNormalize(cache=cache, key="train")
    with pytest.warns(CacheWarning, match="does not match"):
        asked.fit(CountingDataset(n=30, transform=asked), num_workers=0, progress=False, verify=30)
    assert asked.mean != norm.mean


@pytest.mark.parametrize("bad", [-1, 257, 2.5, True])
def test_verify_must_be_a_count(bad):
    norm = FitNormalize(cache=None)
    with pytest.raises(ValueError, match="verify must be an int from 0"):
        norm.fit(CountingDataset(n=3, transform=norm), verify=bad)


def test_cli_refits_when_one_file_of_130_was_swapped(tmp_path, capsys):
    from torchnormfit.cli import main

    for i in range(130):
        png(tmp_path / "photos" / "c" / f"{i:03d}.png", 40, seed=i)

    def fit():
        code = main(["fit", str(tmp_path / "photos"), "--cache", str(tmp_path / "c.h5"), "--workers", "0",
                     "--no-progress", "--json"])
        assert code == 0
        return json.loads(capsys.readouterr().out)

    first = fit()
    assert fit()["cached"] is True
    png(tmp_path / "photos" / "c" / "077.png", 255, seed=1)  # same name, same count, new pixels
    swapped = fit()
    assert swapped["cached"] is False and swapped["saved"] is True and swapped["key"] != first["key"]
    assert swapped["mean"][0] > first["mean"][0] + 0.5 / 130


class _ChannelsFromEnv(Dataset):
    """Images whose channel count changes where no key can see it ($TNF_TEST_CHANNELS)."""

    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 50

    def __getitem__(self, index):
        channels = int(os.environ.get("TNF_TEST_CHANNELS", "3"))
        return self.transform(torch.rand(channels, 4, 4, generator=torch.Generator().manual_seed(index))), 0


def test_a_hit_whose_images_now_have_other_channels_refits(tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    norm = FitNormalize(cache=cache)
    norm.fit(_ChannelsFromEnv(norm), num_workers=0, progress=False)
    monkeypatch.setenv("TNF_TEST_CHANNELS", "1")
    again = FitNormalize(cache=cache)
    with pytest.warns(CacheWarning, match=r"does not match the data.*the images have \[1\] channels, the entry 3"):
        again.fit(_ChannelsFromEnv(again), num_workers=0, progress=False)
    assert again.fit_record.source == "pass" and len(again.mean) == 1 and len(norm.mean) == 3
    assert again.fit_record.verification.samples == 25  # the first stage of 50 read, then it stopped


# --- the length of a map-style dataset (issue 18, item 2) -------------------------------------------------


class _LengthFromEnv(Dataset):
    """Image i is flat at i / 200; the length comes from $TNF_TEST_LENGTH, where no key can see it."""

    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return int(os.environ["TNF_TEST_LENGTH"])

    def __getitem__(self, index):
        images = [torch.full((3, 4, 4), i / 200) for i in range(len(self))]  # a list: an IndexError past the end
        return self.transform(images[index])


def _fit_length(cache, length, monkeypatch):
    monkeypatch.setenv("TNF_TEST_LENGTH", str(length))
    norm = FitNormalize(cache=cache)
    norm.fit(_LengthFromEnv(v2.Compose([norm])), num_workers=0, progress=False)
    truth = torch.arange(length, dtype=torch.float64) / 200
    assert norm.mean == pytest.approx([float(truth.mean())] * 3, rel=1e-6)
    return norm.fit_record


def test_a_dataset_that_grew_or_shrank_under_the_same_key_is_a_miss_with_a_note(tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    first = _fit_length(cache, 120, monkeypatch)
    grew = _fit_length(cache, 160, monkeypatch)
    assert grew.key == first.key and grew.source == "pass" and grew.written
    assert "the dataset has 160 samples now, the entry was fitted on 120" in grew.note
    shrank = _fit_length(cache, 110, monkeypatch)  # read the entry's index 110+ before: an IndexError
    assert shrank.source == "pass" and "has 110 samples now, the entry was fitted on 160" in shrank.note
    again = _fit_length(cache, 110, monkeypatch)
    assert again.source == "cache" and again.verification.passed and again.num_samples == 110


def test_a_train_entry_named_by_hand_is_used_for_a_dataset_of_another_length(tmp_path, monkeypatch):
    monkeypatch.setenv("TNF_TEST_LENGTH", "50")
    train = FitNormalize(cache=tmp_path / "c.h5", key="train")
    train.fit(_LengthFromEnv(v2.Compose([train])), num_workers=0, progress=False)
    monkeypatch.setenv("TNF_TEST_LENGTH", "20")
    test = FitNormalize(cache=tmp_path / "c.h5", key="train")
    test.fit(_LengthFromEnv(v2.Compose([test])), num_workers=0, progress=False)
    assert test.fit_record.source == "cache" and test.mean == train.mean


def test_a_sample_that_fails_when_read_again_names_its_index():
    from torchnormfit.passes import read_images

    dataset = _LengthFromEnv(lambda x: x)
    os.environ["TNF_TEST_LENGTH"] = "3"
    try:
        with pytest.raises(IndexError) as raised:
            read_images(dataset, [1, 7])
    finally:
        del os.environ["TNF_TEST_LENGTH"]
    assert str(raised.value) == "Sample 7: reading the dataset failed: list index out of range"


# --- issue 18: the changes the key must see, in two processes sharing one cache ----------------------------

STALE_NO_CHANGE = {"concat_reordered", "relative_root"}
USER_MODULE = """import torch
from torch.utils.data import Dataset


class Scaled(Dataset):
    def __init__(self, n, transform):
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.transform(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(index)) * {}), 0
"""


def in_place(path, write):
    """Rewrite a file in place (same name and size), its modification time moved on."""
    before = os.stat(path)
    write(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))


def make_stale_work(work: Path):
    for letter, value, n in (("A", 30, 8), ("B", 90, 8), ("C", 200, 8), ("P", 40, 9), ("Q", 120, 9), ("D", 250, 3),
                             ("E", 10, 3)):
        for i in range(n):
            png(work / "parts" / letter / "c" / f"{i}.png", value, seed=i)
    for name, level in (("x", 0.2), ("y", 0.4), ("z", 0.9)):
        np.save(work / f"{name}.npy", (np.random.default_rng(0).random((5, 3, 4, 4)) * 0.1 + level).astype(np.float32))
    for i in range(12):
        png(work / "nfiles" / f"{i:02d}.png", 60, seed=i)
        png(work / "bare" / f"{i}.png", 60, seed=i)
        png(work / "relroot" / "c" / f"{i}.png", 60, seed=i)
    (work / "store").mkdir()
    for i in range(12):
        np.save(work / "store" / f"{i}.npy", np.full((3, 4, 4), 0.2 + i / 100, dtype=np.float32))
    (work / "usermod").mkdir()
    (work / "usermod" / "datasets.py").write_text(USER_MODULE.format("1.0"))
    for i in range(120):
        png(work / "lazy" / f"{i:03d}.png", 50, size=4, seed=i)
    import h5py

    with h5py.File(work / "images.h5", "w") as f:
        f["images"] = np.random.default_rng(1).random((12, 3, 4, 4)).astype(np.float32) * 0.3


def change_stale_work(work: Path):
    """What the user changed between the runs (variant b picks the replaced parts, seeds and spellings)."""
    for i in range(3):  # 25% of the 12 images re-exported
        png(work / "nfiles" / f"{i:02d}.png", 220, seed=i)
        png(work / "bare" / f"{i}.png", 220, seed=i)
        in_place(work / "store" / f"{i}.npy", lambda p: np.save(p, np.full((3, 4, 4), 0.9, dtype=np.float32)))
    (work / "usermod" / "datasets.py").write_text(USER_MODULE.format("0.25"))
    for i in range(120, 160):
        png(work / "lazy" / f"{i:03d}.png", 230, size=4, seed=i)
    import h5py

    def edit(path):
        with h5py.File(path, "r+") as f:
            f["images"][:3] = 0.95

    in_place(work / "images.h5", edit)


@pytest.fixture(scope="module")
def stale_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("stale")
    make_stale_work(work)
    cache = work / "shared.h5"
    first = run(cache, work, "a", names=STALE)
    change_stale_work(work)
    second = run(cache, work, "b", names=STALE)
    third = run(cache, work, "b", names=STALE)
    for path in sorted((work / "lazy").glob("*.png"))[110:]:  # the lazily listed folder shrinks to 110 images
        path.unlink()
    shrank = run(cache, work, "b", names=["lazy_file_list"])
    return first, second, third, shrank


def assert_true_statistics(run):
    assert run["mean"] == pytest.approx(run["direct_mean"], rel=1e-6, abs=1e-7)
    assert run["std"] == pytest.approx(run["direct_std"], rel=1e-5, abs=1e-7)
    assert run["mean"] == pytest.approx(run["true_mean"], rel=1e-9)


@pytest.mark.parametrize("name", STALE)
def test_issue_18_second_process_refits_or_hits_a_correct_entry(stale_runs, name):
    first, second, third, _ = stale_runs
    a, b = first[name], second[name]
    assert a["source"] == "pass" and not a["warnings"]
    assert_true_statistics(a)
    assert_true_statistics(b)
    if name in STALE_NO_CHANGE:  # the same samples: one key, a verified hit
        assert b["source"] == "cache" and b["key"] == a["key"] and b["verified"] is True
        assert b["mean"] == a["mean"]
    else:  # the key saw the change: a pass, no entry to check
        assert b["true_mean"] != pytest.approx(a["true_mean"], rel=1e-6)
        assert b["source"] == "pass" and b["key"] != a["key"] and b["verified"] is None
    assert third[name]["source"] == "cache" and third[name]["verified"] is True
    assert third[name]["mean"] == b["mean"] and not third[name]["warnings"]


def test_issue_18_a_lazily_listed_folder_that_shrank_refits(stale_runs):
    _, second, _, shrank = stale_runs
    run = shrank["lazy_file_list"]
    assert run["source"] == "pass" and run["key"] != second["lazy_file_list"]["key"]
    assert_true_statistics(run)


def test_a_cache_file_inside_the_data_folder_does_not_change_the_key(tmp_path):
    for i in range(4):
        png(tmp_path / "data" / f"{i}.png", 40 + i)
    sources = []
    for _ in range(3):  # the entry written inside the folder the dataset's key lists
        norm = FitNormalize(cache=tmp_path / "data" / "stats.h5")
        dataset = FileList([f"{i}.png" for i in range(4)], folder=str(tmp_path / "data"),
                           transform=v2.Compose([TO_FLOAT, norm]))
        norm.fit(dataset, num_workers=0, progress=False)
        sources.append(norm.fit_record.source)
    assert sources == ["pass", "cache", "cache"]
    png(tmp_path / "data" / "new.png", 200)  # anything else added there still changes the key
    norm = FitNormalize(cache=tmp_path / "data" / "stats.h5")
    norm.fit(FileList([f"{i}.png" for i in range(4)], folder=str(tmp_path / "data"),
                      transform=v2.Compose([TO_FLOAT, norm])), num_workers=0, progress=False)
    assert norm.fit_record.source == "pass"
