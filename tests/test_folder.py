"""torchnormfit.cli.folder: an image folder as a dataset, and finding its unreadable files.

The ``tree`` fixture and the image writers here are shared with test_cli.py
and test_mapped.py, which import them.
"""

from __future__ import annotations

import struct
import zlib
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


_PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG color type: gray, gray + alpha, RGB, RGBA


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG of a uint16 (H, W) or (H, W, C) array, C = 2 (gray + alpha), 3 (RGB) or 4 (RGBA).

    Written by hand from the PNG spec because nothing installed here writes one: PIL and torchvision's
    encode_png write 8-bit RGB only, and cv2, imageio and pypng are not installed. A test fixture only: the
    library reads PNGs through PIL and torchvision.
    """
    height, width = array.shape[:2]
    color_type = _PNG_COLOR_TYPES[1 if array.ndim == 2 else array.shape[2]]
    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 (None) on each scanline

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
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


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_are_read_bit_for_bit_with_every_channel(tmp_path, channels):
    """Gray, gray + alpha, RGB and RGBA 16-bit PNGs: uint16 (C, H, W), alpha a channel, values as written (PIL
    opens the RGB and RGBA ones as 8-bit modes: they were fitted as 8 bits, 1000 read as 232)."""
    rng = np.random.default_rng(21)
    shape = [(6, 5), (4, 7)]
    arrays = [rng.integers(0, 65_536, size=(h, w) if channels == 1 else (h, w, channels), dtype=np.uint16)
              for h, w in shape]
    arrays[0].reshape(-1)[0] = 1000
    for i, array in enumerate(arrays):
        write_png16(tmp_path / f"{i}.png", array)
    dataset = ImageFiles(tmp_path, transform=to_float_pipeline(integers=True))
    assert dataset.integers and dataset.mode is None and dataset.values == "uint16 as stored"
    for i, array in enumerate(arrays):
        image, _ = dataset[i]
        assert image.dtype == torch.uint16 and image.shape == (channels, *shape[i])
        np.testing.assert_array_equal(image.numpy(), array[None] if channels == 1 else array.transpose(2, 0, 1))


@pytest.mark.parametrize("first_bits", [8, 16])
def test_a_png_of_the_other_bit_depth_than_the_first_is_unreadable_by_name(tmp_path, first_bits):
    """8-bit RGB then 16-bit RGB, or the other way round: never converted (and clipped) to the first's kind."""
    rng = np.random.default_rng(22)
    eight = random_image(rng, (5, 4), 3, 0.5)
    sixteen = rng.integers(0, 65_536, size=(4, 5, 3), dtype=np.uint16)
    if first_bits == 8:
        write_image(tmp_path / "a.png", eight)
        write_png16(tmp_path / "b.png", sixteen)
        reason = r"b\.png: it is a 16-bit RGB PNG \(not one page of 8 bits a channel\)"
    else:
        write_png16(tmp_path / "a.png", sixteen)
        write_image(tmp_path / "b.png", eight)
        reason = r"b\.png: it has 8 bits a channel, while the folder's first file .*a\.png is read as integers"
    dataset = ImageFiles(tmp_path)
    assert dataset.integers == (first_bits == 16)
    dataset.load(0)
    with pytest.raises(BadImageError, match=reason):
        dataset.load(1)


def test_a_tiff_of_another_dtype_than_the_first_is_unreadable_by_name(tmp_path):
    """uint16 then uint8 (or int16) TIFFs: both read as stored would mix units; the odd file is named."""
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "a.tif", np.full((4, 4), 40_000, dtype=np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.full((4, 4, 3), 200, dtype=np.uint8), photometric="rgb")
    dataset = ImageFiles(tmp_path)
    assert dataset.values == "uint16 as stored"
    dataset.load(0)
    with pytest.raises(BadImageError, match=r"b\.tif: its samples are uint8, while those of the folder's first file "
                                            r".*a\.tif are uint16"):
        dataset.load(1)


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
