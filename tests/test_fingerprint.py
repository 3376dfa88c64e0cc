"""The cache key: deterministic across processes, sensitive to what changes the statistics."""

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets_for_tests import CountingDataset
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
        "from datasets_for_tests import CountingDataset\n"
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
    """One value's text: a string naming a file as its absolute path and the file's state, else its repr."""
    if type(value) is not str:
        return repr(value)
    for candidate in ([value] if os.path.isabs(value) or "/" in value or "." in value else []) + [os.path.join(root, value)]:
        if "\x00" in candidate or not os.path.exists(candidate):
            continue
        info = os.stat(candidate)
        kind = f" folder {info.st_mtime_ns}" if os.path.isdir(candidate) else f" file {info.st_size} {info.st_mtime_ns}"
        return repr(os.path.abspath(candidate)) + kind
    return repr(value)


def one_by_one(items, root):
    """The lines' definition: a plain value's text; a tuple's values' texts in a tuple's spelling."""
    def line(item):
        if type(item) is not tuple:
            return cell(item, root)
        cells = [cell(v, root) for v in item]
        return "(" + ", ".join(cells) + ("," if len(cells) == 1 else "") + ")"
    if any(type(item) is tuple for item in items) and any(type(item) is not tuple for item in items):
        items = [item if type(item) is tuple else (item,) for item in items]
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
    assert got[1] == f"({existing[1]!r} file 2 {os.stat(existing[1]).st_mtime_ns}, 1)"
    assert got[2] == f"({existing[2]!r} folder {os.stat(existing[2]).st_mtime_ns}, 2)"
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
