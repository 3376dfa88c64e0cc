"""torchnormfit.cli.folder: an image folder as a dataset, and finding its unreadable files.

The ``tree`` fixture and the image writers here are shared with test_cli.py
and test_mapped.py, which import them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from torchnormfit.cli.folder import (
    BadImageError,
    ImageFiles,
    find_unreadable,
    to_float_pipeline,
    unreadable_file_message,
)


def random_image(rng: np.random.Generator, size: tuple[int, int], channels: int, brightness: float) -> np.ndarray:
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
    values = brightness + 0.25 * rng.standard_normal(shape)
    return (np.clip(values, 0, 1) * 255).round().astype(np.uint8)


def write_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array, mode=mode).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path



@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """An ImageFolder tree: 7 good images (5 formats, 6 sizes, gray and RGBA among them), a corrupt JPEG, junk."""
    root = tmp_path_factory.mktemp("images") / "pets"
    rng = np.random.default_rng(0)
    good = [
        write_image(root / "cat" / "a.png", random_image(rng, (20, 16), 3, 0.2)),
        write_image(root / "cat" / "b.jpg", random_image(rng, (31, 17), 3, 0.8)),
        write_image(root / "cat" / "gray.png", random_image(rng, (10, 10), 1, 0.5)),
        write_image(root / "dog" / "c.webp", random_image(rng, (12, 12), 3, 0.4)),
        write_image(root / "dog" / "deep" / "d.bmp", random_image(rng, (9, 22), 3, 0.6)),
        write_image(root / "dog" / "e.tiff", random_image(rng, (15, 15), 3, 0.3)),
        write_image(root / "dog" / "f.png", random_image(rng, (13, 11), 4, 0.7), mode="RGBA"),
    ]
    bad = write_image(root / "dog" / "bad.jpg", random_image(rng, (64, 64), 3, 0.5))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "._a.jpg").write_bytes(b"AppleDouble junk")  # hidden: ignored
    return {"root": root, "good": sorted(good), "bad": bad}



def test_image_files_layouts_and_order(tree):
    dataset = ImageFiles(tree["root"], transform=to_float_pipeline())
    assert dataset.layout == "imagefolder" and dataset.classes == ["cat", "dog"]
    assert [Path(dataset.path(i)) for i in range(len(dataset))] == sorted(tree["good"] + [tree["bad"]])
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and target == 0
    bad = [Path(dataset.path(i)) for i in range(len(dataset))].index(tree["bad"])
    with pytest.raises(BadImageError, match="bad.jpg") as caught:
        dataset[bad]
    assert unreadable_file_message(RuntimeError(f"worker text\nBadImageError: {caught.value}\n")) == str(caught.value)
    assert "Layout: imagefolder" in repr(dataset)


def test_find_unreadable_and_without_leave_the_readable_files(tree):
    dataset = ImageFiles(tree["root"], transform=to_float_pipeline())
    bad = find_unreadable(dataset, batch_size=3, num_workers=0, progress=False)
    assert [Path(dataset.path(index)) for index, _ in bad] == [tree["bad"]] and "bad.jpg" in bad[0][1]
    readable = dataset.without(index for index, _ in bad)
    assert [Path(readable.path(i)) for i in range(len(readable))] == tree["good"]
    assert readable.classes == dataset.classes and len(dataset) == len(tree["good"]) + 1  # the original is kept
    assert [readable[i][1] for i in range(len(readable))] == [0, 0, 0, 1, 1, 1, 1]


# --- folders read as stored: 16-bit PNG, TIFF ---------------------------------------------------


@pytest.mark.parametrize("dtype, low, high", [(np.int8, -128, 128), (np.int16, -1024, 3001)])
def test_signed_tiffs_are_read_as_stored(tmp_path, dtype, low, high):
    """int8 and int16 (CT-like Hounsfield values) come back bit for bit, as (1, H, W) tensors of their dtype."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(20)
    arrays = [rng.integers(low, high, size=(h, w), dtype=dtype) for h, w in ((32, 32), (48, 40))]
    for i, array in enumerate(arrays):
        tifffile.imwrite(tmp_path / f"{i}.tif", array)
    dataset = ImageFiles(tmp_path, transform=to_float_pipeline(integers=True))
    name = np.dtype(dtype).name
    assert dataset.integers and dataset.mode is None and dataset.values == f"{name} as stored"
    assert f"Values: {name} as stored" in repr(dataset) and "Mode" not in repr(dataset)
    for i, array in enumerate(arrays):
        image, target = dataset[i]
        assert image.dtype == getattr(torch, name) and target == -1
        np.testing.assert_array_equal(image.numpy(), array[None])


def test_a_tiff_whose_pages_differ_in_shape_is_unreadable_with_its_shapes(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffWriter(tmp_path / "a.tif") as tif:
        for shape in ((8, 8), (6, 8)):
            tif.write(np.zeros(shape, dtype=np.uint16), photometric="minisblack", contiguous=False)
    dataset = ImageFiles(tmp_path)
    with pytest.raises(BadImageError, match=r"a\.tif: its pages differ in shape \(\(8, 8\), \(6, 8\)\)"):
        dataset.load(0)
