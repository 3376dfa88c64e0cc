"""Per-channel statistics and their exact merge (Chan, Golub & LeVeque 1983).

Pure math on float64 tensors: no ``nn``, no I/O. Every other part of the
library (accumulator, fitting across workers and ranks, cache) merges through
:meth:`ChannelStats.merge`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .values import ValueCounts

__all__ = ["ChannelStats", "ValueCounts"]

_FIELDS = ("count", "mean", "m2", "min", "max")


def _chan_merge(n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor):
    """Pool two sets of (count, mean, M2) with the parallel formula.

    Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983::

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta**2 * n_a * n_b / n

    It is stable whatever the relative sizes and offsets of the two parts, so
    batches of very different brightness merge without cancellation. An empty
    side (count 0) leaves the other side exactly as it is.
    """
    n = n_a + n_b
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = torch.where(n_a == 0, mean_b, mean_a + delta * (n_b / safe_n))
    mean = torch.where(n_b == 0, mean_a, mean)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe_n)
    return n, mean, m2


def _within(mean: Tensor, min: Tensor, max: Tensor) -> Tensor:
    """``mean`` clamped into ``[min, max]`` where that range holds pixels.

    The true mean always lies there; a rounded one can land an ulp outside (a
    constant channel whose mean is summed from an odd number of pixels), which
    readers that validate ``min <= mean <= max`` (the cache) would reject.
    """
    return torch.where(min <= max, torch.minimum(torch.maximum(mean, min), max), mean)


def _rebuild(count: Tensor, mean: Tensor, m2: Tensor, min: Tensor, max: Tensor,
             values: ValueCounts | None = None) -> ChannelStats:
    """Unpickle a ChannelStats (its values keyword-only)."""
    return ChannelStats(count, mean, m2, min, max, values=values)


def _merge_values(a: ChannelStats, b: ChannelStats) -> ValueCounts | None:
    """Both sides' value counts added; a side of no pixels counts as none; a side that kept none loses them."""
    if a.values is not None and b.values is not None:
        return a.values.merge(b.values)
    if a.values is None and not bool((a.count > 0).any()):
        return b.values
    if b.values is None and not bool((b.count > 0).any()):
        return a.values
    return None


class ChannelStats:
    """Exact per-channel pixel statistics: count, mean, M2, min and max in float64.

    ``var`` is the population variance ``M2 / count`` (ddof=0) and ``std`` its
    square root: the numbers ``transforms.Normalize`` wants.

    Parameters
    ----------
    count, mean, m2, min, max : Tensor
        One value per channel. They are stored as float64.

    Examples
    --------
    >>> x = torch.rand(8, 3, 4, 4, dtype=torch.float64)
    >>> a = ChannelStats.from_pixels(x[:5].transpose(0, 1).reshape(3, -1))
    >>> b = ChannelStats.from_pixels(x[5:].transpose(0, 1).reshape(3, -1))
    >>> torch.allclose(a.merge(b).mean, x.mean(dim=(0, 2, 3)))
    True
    """

    __slots__ = (*_FIELDS, "values")

    count: Tensor
    mean: Tensor
    m2: Tensor
    min: Tensor
    max: Tensor
    values: ValueCounts | None
    """Per-channel counts of each value (integer data) or of narrow value ranges (float data), for
    percentiles; None unless asked for (``batch_stats(..., values=True)``). Merged with the rest."""

    def __init__(self, count: Tensor, mean: Tensor, m2: Tensor, min: Tensor, max: Tensor, *,
                 values: ValueCounts | None = None):
        # Copies, so that no caller's tensor (an accumulator's buffers, a dict it handed in) aliases ours.
        fields = [torch.as_tensor(v, dtype=torch.float64).detach().clone() for v in (count, mean, m2, min, max)]
        shapes = {tuple(v.shape) for v in fields}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(
                "ChannelStats expects count, mean, m2, min and max as 1-D tensors of one length "
                f"(one value per channel). Got shapes {[tuple(v.shape) for v in fields]}."
            )
        for name, value in zip(_FIELDS, fields):
            object.__setattr__(self, name, value)
        if values is not None and values.num_channels != self.mean.numel():
            raise ValueError(f"ChannelStats of {self.mean.numel()} channels got value counts of {values.num_channels}.")
        object.__setattr__(self, "values", values)

    @classmethod
    def _owned(cls, count: Tensor, mean: Tensor, m2: Tensor, min: Tensor, max: Tensor,
               values: ValueCounts | None = None) -> ChannelStats:
        """Wrap five 1-D float64 tensors of one length that no one else holds, without copying them."""
        stats = object.__new__(cls)
        for name, value in zip(_FIELDS, (count, mean, m2, min, max)):
            object.__setattr__(stats, name, value)
        object.__setattr__(stats, "values", values)
        return stats

    @classmethod
    def empty(cls, num_channels: int, device: torch.device | str | None = None) -> ChannelStats:
        """Statistics of no pixels: the neutral element of :meth:`merge`."""
        zeros = torch.zeros(num_channels, dtype=torch.float64, device=device)
        inf = torch.full_like(zeros, float("inf"))
        return cls(zeros, zeros.clone(), zeros.clone(), inf, -inf)

    @classmethod
    def from_pixels(cls, pixels: Tensor) -> ChannelStats:
        """Two-pass float64 statistics of a ``(C, num_pixels)`` tensor: the reference truth."""
        if pixels.ndim != 2:
            raise ValueError(f"Expected pixels of shape (C, num_pixels). Got {tuple(pixels.shape)}.")
        p = pixels.to(torch.float64)
        n = p.shape[1]
        if n == 0:
            return cls.empty(p.shape[0], device=p.device)
        low, high = p.amin(dim=1), p.amax(dim=1)
        # Corrected two-pass algorithm (Chan, Golub & LeVeque 1983, eq. 1.7): the second pass
        # also sums the deviations, which repairs the rounding of the first pass's mean.
        mean = _within(p.mean(dim=1), low, high)
        dev = p - mean[:, None]
        dev_sum = dev.sum(dim=1)
        m2 = (dev.square().sum(dim=1) - dev_sum.square() / n).clamp_min(0)
        mean = _within(mean + dev_sum / n, low, high)
        return cls(torch.full_like(mean, n), mean, m2, low, high)

    @property
    def num_channels(self) -> int:
        return self.mean.numel()

    @property
    def var(self) -> Tensor:
        """Population variance (ddof=0) per channel."""
        return self.m2 / self.count

    @property
    def std(self) -> Tensor:
        """Population standard deviation (ddof=0) per channel."""
        return self.var.sqrt()

    def merge(self, other: ChannelStats) -> ChannelStats:
        """The statistics of both sets of pixels together (exact; associative and commutative)."""
        if other.num_channels != self.num_channels:
            raise ValueError(
                f"Cannot merge statistics of {other.num_channels} channels into statistics of "
                f"{self.num_channels} channels."
            )
        other = other.to(self.mean.device)
        count, mean, m2 = _chan_merge(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        low, high = torch.minimum(self.min, other.min), torch.maximum(self.max, other.max)
        return ChannelStats(count, _within(mean, low, high), m2, low, high, values=_merge_values(self, other))

    def with_values(self, values: ValueCounts | None) -> ChannelStats:
        """The same statistics with ``values`` (per-value counts for percentiles) attached."""
        return ChannelStats(self.count, self.mean, self.m2, self.min, self.max, values=values)

    def percentiles(self, q: tuple[float, ...] | list[float]) -> Tensor:
        """Per-channel percentiles ``(len(q), C)`` in float64, as ``numpy.percentile(..., method="linear")``.

        Exact for integer data (counts per value); for float data within the
        resolution :attr:`ValueCounts.rank_error` states. Needs :attr:`values`.
        """
        if self.values is None:
            raise ValueError("These statistics hold no value counts: fit with clip=(low, high) to get percentiles.")
        return self.values.percentiles(q, self.min, self.max)

    def constant_channels(self) -> Tensor:
        """Channels whose variance is zero up to float64 rounding.

        The bound is scikit-learn's ``_is_constant_feature``: the variance is
        below what rounding alone could produce for this count and mean.
        """
        eps = torch.finfo(torch.float64).eps
        bound = self.count * eps * self.var + (self.count * self.mean * eps) ** 2
        return self.var <= bound

    def to(self, device: torch.device | str | None) -> ChannelStats:
        if device is None or self.mean.device == torch.device(device):
            return self
        return ChannelStats(self.count.to(device), self.mean.to(device), self.m2.to(device), self.min.to(device),
                            self.max.to(device), values=self.values)

    def to_dict(self) -> dict[str, Tensor]:
        """The five float64 tensors by name (``count``, ``mean``, ``m2``, ``min``, ``max``), as copies."""
        return {name: getattr(self, name).clone() for name in _FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Tensor], counts: ValueCounts | None = None) -> ChannelStats:
        missing = [name for name in _FIELDS if name not in values]
        if missing:
            raise KeyError(f"ChannelStats needs the fields {list(_FIELDS)}; missing {missing}.")
        return cls(values["count"], values["mean"], values["m2"], values["min"], values["max"], values=counts)

    def __setattr__(self, name, value):
        raise AttributeError("ChannelStats is immutable; merge() returns a new object.")

    def __delattr__(self, name):
        raise AttributeError("ChannelStats is immutable; merge() returns a new object.")

    def __reduce__(self):
        return (_rebuild, (*(getattr(self, name) for name in _FIELDS), self.values))

    def __repr__(self) -> str:
        def fmt(t: Tensor) -> str:
            return "[" + ", ".join(f"{v:.6g}" for v in t.tolist()) + "]"

        return (
            f"ChannelStats(channels={self.num_channels}, pixels_per_channel={fmt(self.count)}, "
            f"mean={fmt(self.mean)}, std={fmt(self.std)}, min={fmt(self.min)}, max={fmt(self.max)})"
        )
