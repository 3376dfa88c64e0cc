"""What an image is to FitNormalize, and where it is in a sample: the checks Normalize makes, with the fix."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import PIL.Image
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors

from .values import INTEGER_DTYPES

__all__ = ["INTEGER_DTYPES", "TO_FLOAT_FIX", "MaskSource", "check_image", "check_mask", "find_image", "find_mask",
           "layout", "moment_image", "planar", "validate_image"]

MaskSource = Any
"""``mask=`` of a fit: ``sample -> mask`` (a callable), ``tv_tensors.Mask`` (the sample's Mask), or a key (a
dictionary sample's entry, such as torchgeo's ``"mask"``); nonzero pixels are kept."""

TO_FLOAT_FIX = "Add ToTensor() or v2.ToDtype(torch.float32, scale=True) before it."


def find_image(sample: Any) -> Any:
    """The image in a sample, found the way v2 transforms find it.

    A dictionary's ``"image"`` (torchgeo's samples); else the first
    ``tv_tensors.Image`` or ``Video``; else a PIL image (to be rejected); else
    the first plain tensor. ``None`` if there is none.
    """
    if isinstance(sample, Mapping) and "image" in sample:
        return sample["image"]
    flat = _leaves(sample)
    for kind in ((tv_tensors.Image, tv_tensors.Video), PIL.Image.Image):
        for leaf in flat:
            if isinstance(leaf, kind):
                return leaf
    for leaf in flat:
        if isinstance(leaf, Tensor) and not isinstance(leaf, tv_tensors.TVTensor):
            return leaf
    return None


def _leaves(sample: Any) -> Sequence[Any]:
    """``tree_flatten(sample)``'s leaves; a tensor or a flat tuple or list without the call (35 us a sample)."""
    if isinstance(sample, Tensor):
        return [sample]
    if type(sample) in (tuple, list) and not any(isinstance(item, (tuple, list, dict)) for item in sample):
        return sample
    return tree_flatten(sample)[0]


_LAYOUTS = {1: "(..., C, L)", 2: "(..., C, H, W)", 3: "(..., C, D, H, W)"}


def layout(spatial_dims: int) -> str:
    """``"(..., C, H, W)"`` and its kin: the image layout for ``spatial_dims`` pixel dimensions."""
    return _LAYOUTS[spatial_dims]


def check_image(image: Any, where: str = "", *, integer: bool = False, spatial_dims: int = 2) -> Tensor:
    """Reject what Normalize rejects, with the fix; return the image as a plain tensor.

    ``where`` (for example ``"Sample 7: "``) starts each message. ``integer`` also accepts the integer dtypes of
    :data:`INTEGER_DTYPES` (statistics in the data's own units); ``spatial_dims=3`` wants volumes
    ``(..., C, D, H, W)``.
    """
    return validate_image(image, where, integer=integer, spatial_dims=spatial_dims).as_subclass(Tensor)


def validate_image(image: Any, where: str = "", *, integer: bool = False, spatial_dims: int = 2) -> Any:
    """:func:`check_image` without the conversion: returns ``image`` itself (no graph break under compile)."""
    if isinstance(image, PIL.Image.Image):
        raise TypeError(f"{where}FitNormalize() does not support PIL images. {TO_FLOAT_FIX}")
    if not isinstance(image, Tensor):
        raise TypeError(
            f"{where}Expected an image tensor of size {layout(spatial_dims)}, got {type(image).__name__}. "
            "If the image is elsewhere in the sample, pass image=lambda sample: ... to fit()."
        )
    if not image.is_floating_point() and not (integer and image.dtype in INTEGER_DTYPES):
        allowed = f" or an integer tensor ({', '.join(str(d) for d in INTEGER_DTYPES)})" if integer else ""
        raise TypeError(f"{where}Input tensor should be a float tensor{allowed}. Got {image.dtype}. {TO_FLOAT_FIX}")
    if image.ndim < spatial_dims + 1:
        raise ValueError(
            f"{where}Expected tensor to be a tensor image of size {layout(spatial_dims)}. Got {tuple(image.shape)}."
        )
    return image


def find_mask(sample: Any, source: MaskSource, where: str = "") -> Any:
    """The mask ``source`` names in ``sample`` (see :data:`MaskSource`); an error that says what was there."""
    if isinstance(source, type) and issubclass(source, tv_tensors.Mask):
        found = next((leaf for leaf in _leaves(sample) if isinstance(leaf, tv_tensors.Mask)), None)
        if found is None:
            raise TypeError(f"{where}mask=tv_tensors.Mask, but the sample ({type(sample).__name__}) holds no "
                            "tv_tensors.Mask. Wrap the mask with tv_tensors.Mask(...) or pass mask=lambda sample: ...")
        return found
    if isinstance(source, str):
        if not isinstance(sample, Mapping) or source not in sample:
            keys = list(sample) if isinstance(sample, Mapping) else type(sample).__name__
            raise KeyError(f"{where}mask={source!r}, but the sample has no such key (it has {keys}).")
        return sample[source]
    if callable(source):
        return source(sample)
    raise TypeError(f"mask= takes a function of the sample, tv_tensors.Mask or a key. Got {source!r}.")


def check_mask(mask: Any, image: Tensor, where: str = "", spatial_dims: int = 2) -> Tensor:
    """``mask`` as a boolean tensor ``(1, *spatial)`` of one image ``(C, *spatial)``, or an error naming both shapes."""
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask) if mask is not None else None
    if mask is None:
        raise TypeError(f"{where}the mask is None; expected a tensor shaped like the image's pixels.")
    mask = mask.as_subclass(Tensor).detach()
    spatial = tuple(image.shape[image.ndim - spatial_dims:])
    leading = math.prod(mask.shape[: mask.ndim - spatial_dims])
    if tuple(mask.shape[mask.ndim - spatial_dims:]) != spatial or leading != 1:
        raise ValueError(f"{where}the mask has shape {tuple(mask.shape)}; expected {spatial} or "
                         f"(1, {', '.join(map(str, spatial))}) for an image of shape {tuple(image.shape)}.")
    return (mask != 0).reshape(1, *spatial)


def planar(image: Tensor, spatial_dims: int) -> Tensor:
    """A volume ``(..., C, D, H, W)`` as the image ``(..., C, D*H, W)`` (a view): the same pixels per channel."""
    if spatial_dims == 2:
        return image
    return image.reshape(*image.shape[: image.ndim - spatial_dims - 1], image.shape[-spatial_dims - 1], -1,
                         image.shape[-1])


def moment_image(image: Tensor, masked: bool) -> Tensor:
    """What a cache entry's per-image moments are taken of: the image without the mask the pass carries as a
    last channel, NaN read as 0 (the moments detect changed images; NaN would make every comparison fail)."""
    if masked:
        image = image[..., :-1, :, :]
    return torch.nan_to_num(image) if image.is_floating_point() else image

