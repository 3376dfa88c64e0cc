"""What an image is to FitNormalize, and where it is in a sample: the checks Normalize makes, with the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
from torch import Tensor
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors

__all__ = ["TO_FLOAT_FIX", "find_image", "check_image", "validate_image"]

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


def check_image(image: Any, where: str = "") -> Tensor:
    """Reject what Normalize rejects, with the fix; return the image as a plain tensor.

    ``where`` (for example ``"Sample 7: "``) starts each message.
    """
    return validate_image(image, where).as_subclass(Tensor)


def validate_image(image: Any, where: str = "") -> Any:
    """:func:`check_image` without the conversion: returns ``image`` itself (no graph break under compile)."""
    if isinstance(image, PIL.Image.Image):
        raise TypeError(f"{where}FitNormalize() does not support PIL images. {TO_FLOAT_FIX}")
    if not isinstance(image, Tensor):
        raise TypeError(
            f"{where}Expected an image tensor of size (..., C, H, W), got {type(image).__name__}. "
            "If the image is elsewhere in the sample, pass image=lambda sample: ... to fit()."
        )
    if not image.is_floating_point():
        raise TypeError(f"{where}Input tensor should be a float tensor. Got {image.dtype}. {TO_FLOAT_FIX}")
    if image.ndim < 3:
        raise ValueError(
            f"{where}Expected tensor to be a tensor image of size (..., C, H, W). Got {tuple(image.shape)}."
        )
    return image
