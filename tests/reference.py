"""The float64 reference of every exactness check in tests/ and benchmarks/, written once.

It never calls torchnormfit, so no check compares the library with itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor


def truth(images: Sequence[Tensor] | Callable[[], Iterable[Tensor]]) -> dict[str, Tensor]:
    """Float64 ``count``, ``mean``, ``var`` (population), ``std``, ``min`` and ``max`` per channel of every pixel.

    ``images`` holds tensors shaped ``(..., C, H, W)``, of any sizes and dtypes (a ``(C, P)`` pixel
    tensor is ``[pixels[:, None]]``), or is a function returning them afresh, for data too large to hold:
    it is called twice. Two passes in float64: the mean, then the squared deviations from it, corrected by
    their sum (the corrected two-pass algorithm; Chan, Golub & LeVeque 1983).
    """
    again = images if callable(images) else (lambda: images)
    count, total, low, high = 0, 0.0, None, None
    for pixels in map(_pixels, again()):
        count += pixels.shape[1]
        total = total + pixels.sum(dim=1)
        low = pixels.amin(dim=1) if low is None else torch.minimum(low, pixels.amin(dim=1))
        high = pixels.amax(dim=1) if high is None else torch.maximum(high, pixels.amax(dim=1))
    mean = total / count
    deviation, squares = torch.zeros_like(mean), torch.zeros_like(mean)
    for pixels in map(_pixels, again()):
        centered = pixels - mean[:, None]
        deviation += centered.sum(dim=1)
        squares += centered.square().sum(dim=1)
    var = ((squares - deviation.square() / count) / count).clamp(min=0).masked_fill(low == high, 0.0)  # constant: 0
    return {"count": torch.full_like(mean, count), "mean": mean + deviation / count, "var": var, "std": var.sqrt(),
            "min": low, "max": high}


def _pixels(image: Tensor) -> Tensor:
    """``(..., C, H, W)`` -> float64 ``(C, P)``."""
    image = image.detach().as_subclass(Tensor).to(torch.float64)
    return image.reshape(-1, *image.shape[-3:]).transpose(0, 1).reshape(image.shape[-3], -1)
