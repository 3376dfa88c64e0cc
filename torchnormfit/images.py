"""What an image is to FitNormalize, and where it is in a sample: the checks Normalize makes, with the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
from torch import Tensor
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors

from .values import INTEGER_DTYPES

__all__ = ["INTEGER_DTYPES", "TO_FLOAT_FIX", "check_image", "find_image", "layout", "validate_image"]

TO_FLOAT_FIX = "Add ToTensor() or v2.ToDtype(torch.float32, scale=True) before it."


def find_image(sample: Any) -> Any:
    """The image in a sample, found the way v2 transforms find it.

    The first ``tv_tensors.Image`` or ``Video``; else a PIL image (to be
    rejected); else the first plain tensor. ``None`` if there is none.
    """
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
