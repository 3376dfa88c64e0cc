"""The cache key: deterministic across processes, sensitive to what changes the statistics."""

import importlib.util
import os
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets_for_tests import CountingDataset, FileList, Holder, Store
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import ConcatDataset, Subset, TensorDataset
from torchvision import transforms as v1
from torchvision.datasets import FakeData, ImageFolder
from torchvision.transforms import v2

from torchnormfit import FitNormalize
from torchnormfit.key import describe_pipeline, fingerprint
from torchnormfit.key.describe import FileStates
from torchnormfit.key.fingerprint import _Walk

SETTINGS = {"image": None}
TO_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def key(dataset, norm):
    return fingerprint(dataset, norm, SETTINGS).key


def make_folder(root: Path, n=4):
    for i in range(n):
        (root / "a").mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((4, 4, 3), i * 10, dtype=np.uint8)).save(root / "a" / f"{i}.png")
    return root


def test_same_dataset_same_key_different_length_or_root_different_key(tmp_path):
    norm = FitNormalize(cache=None)
    a = ImageFolder(make_folder(tmp_path / "a"), transform=v1.Compose([v1.ToTensor(), norm]))
    b = ImageFolder(make_folder(tmp_path / "b"), transform=v1.Compose([v1.ToTensor(), norm]))
    a_again = ImageFolder(tmp_path / "a", transform=v1.Compose([v1.ToTensor(), norm]))
    assert key(a, norm) == key(a_again, norm)
    assert key(a, norm) != key(b, norm)  # same size, other folder
    assert key(FakeData(size=10), norm) != key(FakeData(size=11), norm)
    assert key(FakeData(size=10, image_size=(3, 8, 8)), norm) != key(FakeData(size=10, image_size=(3, 9, 9)), norm)


def test_changed_preceding_transform_changes_key_but_later_ones_and_fitted_state_do_not():
    norm = FitNormalize(cache=None)
    base = FakeData(size=10, transform=v2.Compose([TO_FLOAT, norm]))
    resized = FakeData(size=10, transform=v2.Compose([v2.Resize(16), TO_FLOAT, norm]))
    float64 = FakeData(size=10, transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float64, scale=True), norm]))
    later = FakeData(size=10, transform=v2.Compose([TO_FLOAT, norm, v2.RandomErasing()]))
    assert key(base, norm) != key(resized, norm)
    assert key(base, norm) != key(float64, norm)  # ToDtype's repr hides the dtype; the key does not
    keys = [fingerprint(FakeData(size=10, transform=v2.Compose([v2.ToImage(), v2.ToDtype(dtype), norm])), norm, {})
            for dtype in (torch.float32, torch.float64, torch.uint8)]
    assert len({k.key for k in keys}) == 3 and not any(k.gaps for k in keys)  # torch.dtype was a gap
    assert key(base, norm) == key(later, norm)
    before = key(base, norm)
    norm.partial_fit(torch.rand(2, 3, 4, 4))  # fitted state changes; the key must not
    assert key(base, norm) == before


def test_pipeline_description_stops_at_the_transform():
    norm = FitNormalize(cache=None)
    dataset = FakeData(size=2, transform=v2.Compose([v2.Resize(8), v2.Compose([TO_FLOAT, norm, v2.RandomErasing()])]))
    described = describe_pipeline(dataset, norm)
    assert "Resize" in described and "ToDtype" in described and "RandomErasing" not in described
    assert "FitNormalize" not in described


def test_tensor_dataset_key_follows_content_cheaply():
    norm = FitNormalize(cache=None)
    x = torch.rand(100, 3, 4, 4)
    changed = x.clone()
    changed[0, 0, 0, 0] += 1.0
    assert key(TensorDataset(x), norm) == key(TensorDataset(x.clone()), norm)
    assert key(TensorDataset(x), norm) != key(TensorDataset(changed), norm)
    assert key(TensorDataset(x), norm) != key(TensorDataset(x[:50]), norm)


def test_large_tensor_key_follows_content_at_both_ends_and_in_any_slice():
    """A large tensor is digested from evenly spaced runs of bytes that start at its first byte and end at its last."""
    norm = FitNormalize(cache=None)
    x = torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8)  # 6 MB: sampled, not hashed whole
    base = key(TensorDataset(x), norm)
    assert key(TensorDataset(x.clone()), norm) == base
    for where in (0, -1):
        changed = x.clone()
        changed.view(-1)[where] ^= 1
        assert key(TensorDataset(changed), norm) != base, where
    for start in range(0, 2000, 200):  # any 1% of the images replaced
        changed = x.clone()
        changed[start : start + 20] = 255 - changed[start : start + 20]
        assert key(TensorDataset(changed), norm) != base, start
    assert key(TensorDataset(x.transpose(-1, -2)), norm) != base  # the same bytes in another layout


def test_wrappers_describe_what_they_wrap():
    norm = FitNormalize(cache=None)
    base = FakeData(size=10)
    assert key(Subset(base, [0, 1]), norm) != key(Subset(base, [0, 2]), norm)
    assert key(ConcatDataset([base, base]), norm) != key(ConcatDataset([base, FakeData(size=11)]), norm)


def test_settings_change_the_key():
    norm = FitNormalize(cache=None)
    assert fingerprint(FakeData(size=3), norm, {"image": None}).key != fingerprint(FakeData(size=3), norm, {"image": "f"}).key


def test_key_is_the_same_in_another_process_and_reads_no_sample(tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from datasets_for_tests import CountingDataset, FileList, Holder, Store\n"
        "from torchnormfit import FitNormalize\n"
        "from torchnormfit.key import fingerprint\n"
        "norm = FitNormalize(cache=None)\n"
        "print(fingerprint(CountingDataset(n=7, transform=norm), norm, {'image': None}).key)\n"
    )
    tests = str(Path(__file__).parent)
    keys = {
        subprocess.run([sys.executable, "-c", code, tests], capture_output=True, text=True, check=True,
                       env={"NO_READS": "1", "PYTHONHASHSEED": str(seed), "PATH": ""}).stdout.strip()
        for seed in (1, 2)
    }
    norm = FitNormalize(cache=None)
    assert keys == {key(CountingDataset(n=7, transform=norm), norm)}


def test_an_empty_dict_has_the_digest_of_any_described_mapping():
    walk = _Walk(None)
    described = walk._describe({}, "x", data=False)
    assert walk.of({}, "x") == walk.of(OrderedDict(), "x") == described != walk.of({"a": 1}, "x")


# --- file lists: every file's size and modification time, in one text of lines --------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A root with two files and a folder; names absolute, relative to the root, missing, not names."""
    root = tmp_path_factory.mktemp("files")
    (root / "sub").mkdir()
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"bb")
    existing = [str(root / "a.png"), str(root / "sub" / "b.png"), str(root / "sub")]
    names = [*existing, str(root / "missing.png"), "a.png", "sub/b.png", "x.png", "/a\x00b", "plain"]
    return str(root), existing, names


def cell(value, root):
    """One value's spelling (a string naming a file: its absolute path) and the state of the file ("" if none)."""
    if type(value) is not str:
        return value, ""
    for candidate in ([value] if os.path.isabs(value) or "/" in value or "." in value else []) + [os.path.join(root, value)]:
        if "\x00" in candidate or not os.path.exists(candidate):
            continue
        info = os.stat(candidate)
        kind = " folder" if os.path.isdir(candidate) else f" file {info.st_size} {info.st_mtime_ns}"
        return os.path.abspath(candidate), kind
    return value, ""


def one_by_one(items, root):
    """The lines' definition: the repr of the item with its files spelled absolute, then each file's state."""
    if any(type(item) is tuple for item in items) and any(type(item) is not tuple for item in items):
        items = [item if type(item) is tuple else (item,) for item in items]

    def line(item):
        cells = [cell(v, root) for v in (item if type(item) is tuple else (item,))]
        spelled = tuple(text for text, _ in cells) if type(item) is tuple else cells[0][0]
        return repr(spelled) + "".join(state for _, state in cells)

    return [line(item) for item in items]


def lines(items, root):
    states = FileStates()
    states.roots.append(root)
    return states.lines(items)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_file_list_lines_match_their_item_by_item_definition(files, data):
    root, existing, names = files
    plain = st.one_of(st.sampled_from(names), st.integers(), st.floats(allow_nan=False), st.booleans())
    item = st.one_of(plain, st.tuples(plain, plain), st.tuples(plain), st.tuples())
    items = data.draw(st.one_of(st.lists(item, max_size=30), st.lists(st.tuples(st.sampled_from(existing), plain))))
    assert lines(items, root) == one_by_one(items, root)


def test_file_list_lines_of_existing_files_name_their_state(files):
    root, existing, _ = files
    items = [(path, i) for i, path in enumerate(existing * 30)]
    got = lines(items, root)
    assert got == one_by_one(items, root)
    assert got[1] == f"({existing[1]!r}, 1) file 2 {os.stat(existing[1]).st_mtime_ns}"
    assert got[2] == f"({existing[2]!r}, 2) folder"
    assert lines([(existing[0], [1])], root) is None and lines([object()], root) is None


def test_a_long_file_list_key_follows_each_files_state(tmp_path):
    norm = FitNormalize(cache=None)
    (tmp_path / "a").mkdir()
    for i in range(70):  # more than 64: a multiset of lines
        (tmp_path / "a" / f"{i}.png").write_bytes(b"x")
    base = key(ImageFolder(tmp_path, loader=open), norm)
    os.utime(tmp_path / "a" / "37.png", ns=(1, 1))  # re-exported: same name and size, another time
    changed = key(ImageFolder(tmp_path, loader=open), norm)
    (tmp_path / "a" / "37.png").write_bytes(b"yy")
    os.utime(tmp_path / "a" / "37.png", ns=(1, 1))  # another size, the same time
    assert len({base, changed, key(ImageFolder(tmp_path, loader=open), norm)}) == 3


# --- issue 18: what the key sees -----------------------------------------------------------------------------


def pngs(folder: Path, n, value=10):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        PIL.Image.fromarray(np.full((4, 4, 3), value + i, dtype=np.uint8)).save(folder / f"{i}.png")
    return sorted(str(p) for p in folder.glob("*.png"))


def reexport(path, value=200):
    """The same name, new pixels, a new modification time (the size may stay the same)."""
    PIL.Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)
    info = os.stat(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))


def test_every_part_of_a_concat_dataset_counts_and_their_order_does_not(tmp_path):
    norm = FitNormalize(cache=None)
    pipeline = v2.Compose([TO_FLOAT, norm])
    a, b, c = (ImageFolder(make_folder(tmp_path / name), transform=pipeline) for name in "abc")
    assert len(b) == len(c)
    base = key(ConcatDataset([a, b]), norm)
    assert key(ConcatDataset([a, c]), norm) != base  # the second part replaced, same length
    assert key(ConcatDataset([b, a]), norm) == base  # reordered: the same samples
    assert key(ConcatDataset([a, b, c]), norm) != key(ConcatDataset([a, b, b]), norm)
    assert fingerprint(ConcatDataset([a, b]), norm, SETTINGS).found_norm


class FileStream(torch.utils.data.IterableDataset):
    def __init__(self, path):
        self.path = path

    def __iter__(self):
        yield from torch.from_numpy(np.load(self.path))


def test_every_part_of_a_chain_dataset_counts_and_their_order_does_not(tmp_path):
    for name in "xyz":
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(ord(name)).random((4, 3, 2, 2)))
    x, y, z = (FileStream(str(tmp_path / f"{name}.npy")) for name in "xyz")
    chain = torch.utils.data.ChainDataset
    assert key(chain([x, y]), None) != key(chain([x, z]), None)
    assert key(chain([x, y]), None) == key(chain([y, x]), None)


def test_a_numpy_string_array_of_files_is_keyed_by_the_files_states(tmp_path):
    files = pngs(tmp_path / "img", 8)
    norm = FitNormalize(cache=None)
    for array in (np.array(files, dtype=str), np.array(files, dtype=object)):
        base = key(FileList(array, transform=TO_FLOAT), norm)
        assert key(FileList(array.copy(), transform=TO_FLOAT), norm) == base
        reexport(files[3], value=100 + array.dtype.kind.__len__() * 10 + len(str(array.dtype)))
        assert key(FileList(array, transform=TO_FLOAT), norm) != base


def test_bare_names_beside_any_folder_attribute_are_keyed_by_the_files_states(tmp_path):
    pngs(tmp_path / "img", 8)
    names = [f"{i}.png" for i in range(8)]
    dataset = FileList(names, folder=str(tmp_path / "img"), transform=TO_FLOAT)
    dataset.__dict__["folder_of_images"] = dataset.__dict__.pop("folder")  # no root/dir in the attribute's name
    base = key(dataset, None)
    reexport(tmp_path / "img" / "5.png")
    assert key(dataset, None) != base
    by_path = FileList(names, folder=tmp_path / "img", transform=TO_FLOAT)  # a pathlib.Path folder
    assert key(by_path, None) == key(FileList(names, folder=str(tmp_path / "img"), transform=TO_FLOAT), None)


def test_a_store_folder_edited_in_place_changes_the_key(tmp_path):
    (tmp_path / "store").mkdir()
    for i in range(5):
        np.save(tmp_path / "store" / f"{i}.npy", np.full((3, 2, 2), i, dtype=np.float32))
    base = key(Store(str(tmp_path / "store"), 5), None)
    assert key(Store(tmp_path / "store", 5), None) == base
    path = tmp_path / "store" / "2.npy"
    before = os.stat(path)
    np.save(path, np.full((3, 2, 2), 9, dtype=np.float32))  # the same size, in place
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert os.stat(path).st_size == before.st_size and key(Store(str(tmp_path / "store"), 5), None) != base


def test_a_relative_and_an_absolute_spelling_of_one_folder_give_one_key(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", n=20)
    norm = FitNormalize(cache=None)
    absolute = key(ImageFolder(str(tmp_path / "data"), transform=v2.Compose([TO_FLOAT, norm])), norm)
    monkeypatch.chdir(tmp_path)
    for spelling in ("data", "./data", "data/", Path("data"), "../" + tmp_path.name + "/data"):
        assert key(ImageFolder(spelling, transform=v2.Compose([TO_FLOAT, norm])), norm) == absolute, spelling
    names = [f"{i}.png" for i in range(20)] * 4  # a long list: a multiset
    relative = FileList([os.path.join("data", "a", n) for n in names], transform=TO_FLOAT)
    assert key(relative, None) == key(FileList([str(tmp_path / "data" / "a" / n) for n in names],
                                                 transform=TO_FLOAT), None)


def test_installed_code_is_known_by_where_its_file_lives(tmp_path, monkeypatch):
    from torchnormfit.key.describe import is_library_module

    assert is_library_module("torch") and is_library_module("json") and is_library_module("builtins")
    assert not is_library_module(__name__) and not is_library_module("a module nobody imported")
    source = tmp_path / "datasets.py"  # a user's module named like Hugging Face's library
    code = ("import torch\nclass Mine(torch.utils.data.Dataset):\n    def __len__(self):\n        return 4\n"
            "    def __getitem__(self, index):\n        return torch.full((3, 2, 2), {})\n")
    keys = []
    for level in ("0.25", "0.75"):
        source.write_text(code.format(level))
        spec = importlib.util.spec_from_file_location("datasets", source)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "datasets", module)
        spec.loader.exec_module(module)
        assert not is_library_module("datasets")
        keys.append(key(module.Mine(), None))
    assert keys[0] != keys[1]


def test_random_generators_are_keyed_by_their_state():
    pairs = {
        "torch": lambda seed: torch.Generator().manual_seed(seed),
        "numpy": np.random.default_rng,
        "legacy numpy": np.random.RandomState,
        "python": random.Random,
    }
    for name, make in pairs.items():
        one = key(Holder(generator=make(0)), None)
        assert one == key(Holder(generator=make(0)), None), name
        assert one != key(Holder(generator=make(1)), None), name
        assert not fingerprint(Holder(generator=make(0)), None, SETTINGS).gaps, name
    advanced = torch.Generator().manual_seed(0)
    torch.rand(3, generator=advanced)
    assert key(Holder(generator=advanced), None) != key(Holder(generator=torch.Generator().manual_seed(0)), None)


def test_open_h5py_files_and_datasets_are_keyed_by_their_files_state(tmp_path):
    import h5py

    path = tmp_path / "images.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((4, 3, 2, 2), dtype=np.float32)
    with h5py.File(path, "r") as f:
        file_key, images_key = key(Holder(file=f), None), key(Holder(images=f["images"]), None)
        assert not fingerprint(Holder(images=f["images"]), None, SETTINGS).gaps
        assert key(Holder(images=f["images"]), None) == images_key
    before = os.stat(path)
    with h5py.File(path, "r+") as f:  # edited in place
        f["images"][1] = 1.0
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    with h5py.File(path, "r") as f:
        assert key(Holder(file=f), None) != file_key and key(Holder(images=f["images"]), None) != images_key
    closed = h5py.File(path, "r")
    closed.close()
    assert fingerprint(Holder(file=closed), None, SETTINGS).gaps  # a closed handle says nothing: a gap


def test_zip_files_are_keyed_by_their_file_and_members(tmp_path):
    import zipfile

    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("0.bin", b"abcd")
    with zipfile.ZipFile(path) as archive:
        base = key(Holder(archive=archive), None)
        assert not fingerprint(Holder(archive=archive), None, SETTINGS).gaps
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("0.bin", b"abce")  # the same size and name, another CRC
    os.utime(path, ns=(1, 1))
    with zipfile.ZipFile(path) as archive:
        assert key(Holder(archive=archive), None) != base
    with open(path, "rb") as handle:
        opened = key(Holder(handle=handle), None)
        assert not fingerprint(Holder(handle=handle), None, SETTINGS).gaps
    os.utime(path, ns=(2, 2))
    with open(path, "rb") as handle:
        assert key(Holder(handle=handle), None) != opened


def test_an_unseeded_webdataset_shuffle_gives_one_key_in_every_process(tmp_path):
    code = (
        "import sys, warnings; sys.path.insert(0, sys.argv[1]); warnings.simplefilter('ignore')\n"
        "import streams_for_tests as st\n"
        "from torchnormfit.key import fingerprint\n"
        "print(fingerprint(st.webdataset(sys.argv[2:], shardshuffle=10), None, {}).key)\n"
    )
    tests = str(Path(__file__).parent)
    sys.path.insert(0, tests)
    import streams_for_tests

    shards = streams_for_tests.write_shards(tmp_path / "shards", 8, 2)
    keys = {
        subprocess.run([sys.executable, "-c", code, tests, *shards], capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
        for seed in (1, 2, 3)
    }
    assert len(keys) == 1


def test_a_folder_of_many_files_is_stated_once(tmp_path, monkeypatch):
    """No second walk over the files: an ImageFolder's key stats each image file once."""
    for c in range(3):
        pngs(tmp_path / "data" / f"c{c}", 40)
    dataset = ImageFolder(str(tmp_path / "data"), loader=open)
    stats, listed = [], []
    real_stat, real_scandir = os.stat, os.scandir

    class Listing:  # os.scandir, counting the entries it yields (each one's DirEntry.stat is one stat)
        def __init__(self, path):
            self.entries = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.entries.close()

        def __iter__(self):
            for entry in self.entries:
                listed.append(entry.path)
                yield entry

    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stats.append(os.fspath(path)) or real_stat(path, *a, **k))
    monkeypatch.setattr(os, "scandir", Listing)
    key(dataset, None)
    files = [s for s in stats + listed if s.endswith(".png") and os.path.isfile(s)]
    assert len(files) == len(set(files)) == 120


def test_the_summary_names_the_parts_and_the_absolute_folder(tmp_path, monkeypatch):
    from torchnormfit.key import describe_dataset

    make_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    summary = describe_dataset(ConcatDataset([ImageFolder("data"), FakeData(size=3)]))
    assert summary["length"] == 7 and summary["datasets"][0]["root"] == str(tmp_path.resolve() / "data")
    assert summary["datasets"][1]["size"] == 3


def test_handles_on_no_file_are_gaps_and_generator_states_keep_their_order():
    import io

    assert fingerprint(Holder(buffer=io.BytesIO(b"abc")), None, SETTINGS).gaps
    state = random.Random(0).getstate()
    shuffled = random.Random(0)
    numbers = list(state[1])
    numbers[5], numbers[6] = numbers[6], numbers[5]  # the same multiset of 625 numbers, in another order
    shuffled.setstate((state[0], tuple(numbers), state[2]))
    assert key(Holder(generator=random.Random(0)), None) != key(Holder(generator=shuffled), None)


def test_only_a_datasets_own_folders_are_listed(tmp_path):
    """A folder named elsewhere (a path in a transform or in code) may be written to at any time: its path only."""
    (tmp_path / "out").mkdir()
    elsewhere = Holder(transform=v2.Lambda(lambda x, where=str(tmp_path / "out"): x))
    owned = Holder(folder=str(tmp_path / "out"))
    before = key(elsewhere, None), key(owned, None)
    (tmp_path / "out" / "log.txt").write_text("a run wrote here")
    assert key(elsewhere, None) == before[0] and key(owned, None) != before[1]
