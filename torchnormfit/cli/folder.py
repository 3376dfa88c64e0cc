"""A folder of image files as a dataset of float tensors: ImageFolder layout or a flat tree.

This is what ``torchnormfit fit DIR`` measures. Files are found once, sorted by
their path relative to the root, so the dataset (and its cache key) is the same
in every run on the same files.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import VisionDataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..passes import DEFAULT_BATCH_SIZE, default_num_workers
from . import MODES

__all__ = [
    "IMAGE_EXTENSIONS",
    "MODES",
    "BadImageError",
    "ConvertMode",
    "TIFF_EXTRA",
    "ImageFiles",
    "find_unreadable",
    "to_float_pipeline",
    "unreadable_file_message",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
"""File name endings read as images (any case): JPEG, PNG, WebP, BMP, TIFF."""

_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_TIFF_EXTENSIONS = (".tif", ".tiff")
TIFF_EXTRA = 'pip install "torchnormfit[tiff]"'
"""The install line that adds tifffile, which reads TIFF files beyond 8 bits a channel, multi-band or multi-page."""
_BAD_IMAGE = re.compile(r"BadImageError: (.+)")


class BadImageError(OSError):
    """An image file that cannot be decoded: corrupt, truncated or not an image. The message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"Cannot read the image file {self.path}: {reason}".replace("\n", " "))

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class ConvertMode:
    """Convert a PIL image to a PIL mode (``"RGB"``, ``"L"``, ...); tensors pass through.

    A small class rather than a lambda, so it pickles into DataLoader workers
    and its repr (part of the cache key) is stable.
    """

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        if isinstance(image, PIL.Image.Image) and image.mode != self.mode:
            return image.convert(self.mode)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def to_float_pipeline(
    mode: str | None = None, resize: int | None = None, center_crop: int | None = None, *, integers: bool = False
) -> v2.Compose:
    """The usual pipeline up to Normalize: [mode] -> [Resize] -> [CenterCrop] -> float32 in [0, 1].

    Resize and crop act on the PIL image, as in ``Compose([Resize(n), CenterCrop(m), ToTensor()])``,
    and the result equals ``ToTensor()``'s. With ``integers=True`` (an :class:`ImageFiles` of 16-bit or
    TIFF images, whose samples are integer tensors) the values are not scaled: they stay in their own units,
    as integers, or as float32 with ``resize`` (interpolated values are not integers).
    """
    steps: list[Callable[[Any], Any]] = [] if mode is None else [ConvertMode(mode)]
    if integers and resize is not None:  # interpolation makes new values: float32 in the same units (torchvision
        steps += [v2.ToImage(), v2.ToDtype(torch.float32)]  # would truncate them back to uint16, not round)
    if resize is not None:
        steps.append(v2.Resize(resize, antialias=True))
    if center_crop is not None:
        steps.append(v2.CenterCrop(center_crop))
    steps += [v2.ToImage()] if integers else [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


class ImageFiles(VisionDataset):
    """Every image file under ``root``, decoded with PIL and converted to ``mode``, or read as integers.

    The first file (in sorted order) decides how the folder is read. If it has 8 bits a channel (JPEG,
    PNG, WebP, BMP, a one-page 8-bit TIFF), every file is a PIL image converted to ``mode``, as
    ``ImageFolder`` does. If it is a 16-bit PNG, or a TIFF that PIL cannot read as 8 bits a channel
    (uint16, float, multi-band, multi-page), every file is an integer or float tensor (C, H, W) in its
    own units: ``integers`` is True, ``mode`` is None (not applied) and ``values`` names the first file's
    dtype, as ``"uint16 as stored"``. A 16-bit PNG is read with torchvision as uint16, a channel a sample
    (gray 1, gray and alpha 2, RGB 3, RGBA 4: alpha is a channel, as in a TIFF). TIFF files are read with
    tifffile (``pip install "torchnormfit[tiff]"``): an (H, W) array is 1 channel, (H, W, S) with S <= 4
    samples per pixel is S channels, any other 3-D array (C, H, W: planar bands or pages) is C channels;
    4-D or more is refused. A file of the other kind than the first, or read as stored with another dtype
    than the first, is unreadable (:class:`BadImageError`).

    Two layouts are recognized. ImageFolder: all images sit in subfolders of
    ``root`` (at any depth), and each top-level subfolder is a class, as in
    ``torchvision.datasets.ImageFolder``. Flat: any other tree (images in
    ``root`` itself, at any depth); the target is then -1. Hidden files and
    folders (names starting with ``.``) are ignored.

    Parameters
    ----------
    root : str or Path
        The folder to read.
    mode : str
        PIL mode every image is converted to; one of :data:`MODES`.
    transform : callable, optional
        Applied to the converted PIL image, for example :func:`to_float_pipeline`.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder, or holds no image file.

    Examples
    --------
    >>> ds = ImageFiles("photos", transform=to_float_pipeline())  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, mode: str = "RGB", transform: Callable[[Any], Any] | None = None):
        root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.isdir(root):
            what = "does not exist" if not os.path.exists(root) else "is a file, not a folder"
            raise FileNotFoundError(f"Expected a folder of images. {root} {what}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}. Got {mode!r}.")
        super().__init__(root, transform=transform)
        self.mode: str | None = mode
        files = _find_images(root)
        if not files:
            raise FileNotFoundError(
                f"Found no image files under {root}. Expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                "(any case), in the folder or in subfolders."
            )
        self.layout = "imagefolder" if all("/" in name for name in files) else "flat"
        self.classes = sorted({name.split("/", 1)[0] for name in files}) if self.layout == "imagefolder" else []
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(name, class_to_idx.get(name.split("/", 1)[0], -1)) for name in files]
        if _is_wide(self.path(0)):  # set only here: an 8-bit folder's dataset (and cache key) is as before
            self.integers = True
            self.mode = None  # no PIL mode is applied: the provenance must not claim one
            self._dtype = _stored_dtype(self.path(0))
            self.values = "as stored" if self._dtype is None else f"{self._dtype} as stored"

    integers = False
    """True when the files are read as integer tensors in their own units (the first file is 16-bit or a TIFF)."""
    values: str | None = None
    """With ``integers``, what the values are: the first file's dtype, as ``"uint16 as stored"`` (``mode`` is None)."""
    _dtype: str | None = None  # with ``integers``, the first file's dtype name (every file must hold it), if known

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        """The absolute path of sample ``index``."""
        return os.path.join(self.root, *self.samples[index][0].split("/"))

    def load(self, index: int) -> Any:
        """Decode sample ``index`` completely: a PIL image in ``mode``, or a (C, H, W) tensor if ``integers``.

        Raises
        ------
        BadImageError
            The file cannot be read or decoded, or is of the other kind than the first
            file (8 bits a channel or not, or another dtype); the message names the file.
        """
        path = self.path(index)
        if self.integers:
            return _read_wide(path, self.path(0), self._dtype)
        try:
            with PIL.Image.open(path) as image:
                wide = _wide_mode(image)
                image.load()
                mode = wide or image.mode
                converted = image.convert(self.mode) if wide is None else None
        except Exception as error:
            raise BadImageError(path, f"{type(error).__name__}: {error}") from error
        if converted is None:
            raise BadImageError(
                path,
                f"it is {mode} (not one page of 8 bits a channel), and converting it to {self.mode} would clip it, "
                f"while the folder's first file {self.path(0)} has 8 bits a channel. "
                "Keep files of one kind in a folder",
            )
        return converted

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]

    def without(self, indices: Iterable[int]) -> ImageFiles:
        """A copy without the samples at ``indices`` (for example the unreadable ones); classes are kept."""
        drop = set(indices)
        kept = copy.copy(self)
        kept.samples = [sample for i, sample in enumerate(self.samples) if i not in drop]
        return kept

    def extra_repr(self) -> str:
        read = f"Values: {self.values}" if self.integers else f"Mode: {self.mode}"
        return f"{read}\nLayout: {self.layout}"


def _is_wide(path: str) -> bool:
    """Whether ``path`` is read as integers: a 16-bit PNG (gray, RGB, with alpha), or a TIFF beyond one 8-bit page.

    Only the header is read. A file PIL cannot open is not wide, unless it is a TIFF (tifffile reads it).
    """
    try:
        with PIL.Image.open(path) as image:
            return _wide_mode(image) is not None
    except Exception:
        return path.lower().endswith(_TIFF_EXTENSIONS)


def _stored_dtype(path: str) -> str | None:
    """The dtype name of a file read as stored, from its header: ``"uint16"`` for any file but a TIFF (torchvision
    decodes more than 8 bits as uint16); None if the header does not tell, or tifffile is missing."""
    if not path.lower().endswith(_TIFF_EXTENSIONS):
        return "uint16"
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return np.dtype(tif.series[0].dtype).name
    except Exception:
        return None


def _wide_mode(image: PIL.Image.Image) -> str | None:
    """What makes an opened image more than one page of 8 bits a channel, or None.

    PIL opens a 16-bit RGB PNG or TIFF as 8-bit RGB: a PNG's bit depth is in the raw mode PIL parsed from its
    header (``"RGB;16B"``), a TIFF's in its tags. Call it before ``load()``, which clears the header's tiles.
    """
    if image.format == "PNG":
        tiles = getattr(image, "tile", None)  # an ImageFile's, before load()
        rawmode = tiles[0][3] if tiles else None  # args: "I;16B", "LA;16B", "RGB;16B", "RGBA;16B", "RGB", "P", ...
        if isinstance(rawmode, str) and ";16" in rawmode:
            return f"a 16-bit {rawmode.split(';')[0].replace('I', 'gray')} PNG"
        return None
    if image.mode in _WIDE_MODES:
        return image.mode
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    bits, formats = (value if isinstance(value, tuple) else (value,) for value in (tags.get(258, 8), tags.get(339, 1)))
    if any(b > 8 for b in bits) or any(f != 1 for f in formats):  # SampleFormat 1: unsigned integers
        return f"a TIFF of {max(bits)}-bit {'unsigned' if set(formats) == {1} else 'signed or float'} samples"
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        return f"a TIFF of {frames} pages"
    return None


def _read_wide(path: str, first: str, dtype: str | None) -> torch.Tensor:
    """The (C, H, W) tensor of ``path`` in its own units: TIFF with tifffile, others (16-bit PNG) with torchvision.

    A file whose samples are not of ``dtype`` (the first file's) is unreadable: uint8 values beside uint16 ones
    are not in the same units.
    """
    if path.lower().endswith(_TIFF_EXTENSIONS):
        try:
            import tifffile
        except ImportError:
            raise ImportError(
                f"Reading the TIFF file {path} needs tifffile: {TIFF_EXTRA}"
            ) from None
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shapes = list(dict.fromkeys(tuple(s.shape) for s in tif.series))
                if len(shapes) > 1:
                    raise BadImageError(path, f"its pages differ in shape ({', '.join(map(str, shapes))}), while "
                                        "the pages of a file are read as its channels. Write pages of one shape, or "
                                        "one file a page")
                array, axes = np.asarray(series.asarray()), series.axes
                if len(tif.series) > 1:  # pages written one by one: every page, stacked
                    array, axes = np.asarray(tif.asarray(key=slice(None))), "I" + series.axes
        except BadImageError:
            raise
        except Exception as error:
            raise BadImageError(path, f"{type(error).__name__}: {error}") from error
        if array.ndim == 3 and axes.endswith("S"):  # (H, W, S): samples per pixel, as RGB
            array = array.transpose(2, 0, 1)
    else:
        try:  # (C, H, W): every channel (alpha too), uint16 for more than 8 bits, values as stored
            array = decode_image(path, mode=ImageReadMode.UNCHANGED).numpy()
        except Exception as error:
            raise BadImageError(path, f"{type(error).__name__}: {error}") from error
        if array.dtype == np.uint8:
            raise BadImageError(
                path, f"it has 8 bits a channel, while the folder's first file {first} is read as "
                "integers in their own units (16 bits or TIFF). Keep files of one kind in a folder",
            )
    if dtype is not None and array.dtype.name != dtype:
        raise BadImageError(
            path, f"its samples are {array.dtype.name}, while those of the folder's first file {first} are {dtype}, "
            "read as stored: values of two dtypes are not in the same units. Keep files of one kind in a folder",
        )
    if array.ndim == 2:
        array = array[None]
    elif array.ndim != 3:
        raise BadImageError(
            path, f"its array has {array.ndim} dimensions, shape {tuple(array.shape)}; expected (H, W), "
            "(H, W, S) with S samples a pixel, or (C, H, W) bands or pages",
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


def _find_images(root: str) -> list[str]:
    """Relative ``/``-separated paths of the image files under ``root``, sorted; symlink loops are cut."""
    found = []
    seen = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(os.path.relpath(folder, root))
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((relative / name).as_posix().removeprefix("./"))
    return sorted(found)


def unreadable_file_message(error: BaseException) -> str | None:
    """The :class:`BadImageError` message inside ``error``, or None.

    It looks through the exception chain, and through the text of errors that
    DataLoader workers send back (their type and chain are lost on the way).
    """
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, BadImageError):
            return str(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    match = _BAD_IMAGE.search(str(error))
    return match.group(1).strip() if match else None


class _Checker(Dataset):
    """``index`` -> ``(index, None or the reason the file cannot be read)``."""

    def __init__(self, dataset: ImageFiles):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        try:
            self.dataset.load(index)
        except BadImageError as error:
            return index, str(error)
        return index, None


def _bad_only(items: list[tuple[int, str | None]]) -> tuple[int, list[tuple[int, str]]]:
    return len(items), [(index, reason) for index, reason in items if reason is not None]


def find_unreadable(
    dataset: ImageFiles,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> list[tuple[int, str]]:
    """Decode every file; return ``(index, message)`` for each unreadable one, sorted by index.

    ``batch_size`` (default 64), ``num_workers`` (default: the usable CPUs, at most 8) and
    ``progress`` (default: on a terminal) are the DataLoader and tqdm settings of the check.

    Examples
    --------
    >>> ds = ImageFiles("photos")  # doctest: +SKIP
    >>> readable = ds.without(index for index, _ in find_unreadable(ds))  # doctest: +SKIP
    """
    num_workers = default_num_workers() if num_workers is None else num_workers
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    loader = DataLoader(_Checker(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_bad_only)
    bad: list[tuple[int, str]] = []
    disable = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    with tqdm(total=len(dataset), unit="img", desc="checking files", disable=disable) as bar:
        for checked, found in loader:
            bad += found
            bar.update(checked)
    return sorted(bad)
