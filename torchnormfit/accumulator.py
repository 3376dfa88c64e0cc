"""BatchNormAccumulator: exact dataset statistics through a BatchNorm2d."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .reduce import batch_stats
from .stats import ChannelStats, ValueCounts

__all__ = ["BatchNormAccumulator"]

_EXACT_BUFFERS = ("pixel_count", "pixel_mean", "pixel_m2", "pixel_min", "pixel_max")  # float64 whatever .to() says


def _merge_values(own: ValueCounts | None, values: ValueCounts | None, counted: bool,
                  incoming: bool) -> ValueCounts | None:
    """An accumulator's value counts with ``values`` added: in place into its own copy when they fit its grid.

    As :meth:`ChannelStats.merge`: counts are kept only while every part with pixels has them.
    """
    if values is None:
        return own if not incoming else None
    if own is None:
        return None if counted else values.copy()
    if own.add_(values):
        return own
    return own.merge(values)


class BatchNormAccumulator(nn.BatchNorm2d):
    """A ``BatchNorm2d`` whose running statistics are the exact pooled statistics.

    In train mode, ``forward(x)`` merges the batch's per-channel pixel count,
    mean and M2 into float64 state with Chan's parallel formula (weighted by
    pixel count) and returns ``x`` unchanged. ``running_mean`` and
    ``running_var`` (population variance, ddof=0) always equal the pooled
    statistics of every pixel seen, whatever the batch sizes or order. In eval
    mode it normalizes like a ``BatchNorm2d`` with those statistics.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    momentum : float, optional
        ``None`` (default) accumulates exactly. A float makes train mode behave
        like a stock ``BatchNorm2d`` (exponential average, unbiased batch
        variance), only to compare the common recipe against the exact one.
    eps : float
        Added to the variance in eval mode, as in ``BatchNorm2d``.

    Examples
    --------
    >>> acc = BatchNormAccumulator(3)
    >>> for batch in torch.rand(10, 4, 3, 8, 8).unbind(0):
    ...     _ = acc(batch)
    >>> acc.stats.mean.shape
    torch.Size([3])
    """

    def __init__(self, num_features: int, momentum: float | None = None, eps: float = 1e-5, device=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False, track_running_stats=True,
                         device=device)
        self.exact = momentum is None
        empty = ChannelStats.empty(num_features, device=device)
        for name, value in empty.to_dict().items():
            self.register_buffer(f"pixel_{name}", value)

    def _apply(self, fn, recurse=True):
        # .half(), .float(), .to(dtype) convert every floating point buffer; the exact state must stay
        # float64 (a float32 count is exact only up to 2**24 pixels), so only its device follows.
        exact = {name: self._exact(name) for name in _EXACT_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            after = self._exact(name)
            if after.dtype != torch.float64:
                self._buffers[name] = before.to(device=after.device)
        return self

    def _exact(self, name: str) -> Tensor:
        """The exact-state buffer ``name`` (``pixel_count``, ...), typed."""
        buffer = self._buffers[name]
        assert buffer is not None  # registered in __init__
        return buffer

    def _exact_stats(self, values: ValueCounts | None = None) -> ChannelStats:
        count, mean, m2, low, high = (self._exact(name) for name in _EXACT_BUFFERS)
        return ChannelStats(count, mean, m2, low, high, values=values)

    _values: ValueCounts | None = None  # per-value counts (percentiles), merged beside the buffers

    @property
    def stats(self) -> ChannelStats:
        """The pooled statistics so far, as a :class:`ChannelStats` (a snapshot, not a view)."""
        return self._exact_stats(None if self._values is None else self._values.copy())

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self.exact):
            return super().forward(input)
        self._check_input_dim(input)
        self.update(input.detach())
        return input

    def update(self, images: Tensor, **options) -> ChannelStats:
        """Merge a batch ``(..., C, H, W)`` in and return the batch's own statistics.

        ``options`` go to :func:`~torchnormfit.reduce.batch_stats` (``ignore``, ``mask``, ``spatial_dims``,
        ``values``).
        """
        stats = batch_stats(images, **options)
        self.merge(stats)
        return stats

    def merge(self, other: BatchNormAccumulator | ChannelStats) -> BatchNormAccumulator:
        """Add another accumulator's (or a :class:`ChannelStats`') pixels to this one, exactly."""
        stats = other.stats if isinstance(other, BatchNormAccumulator) else other
        before = self._exact_stats()
        merged = before.merge(stats.with_values(None))
        self._values = _merge_values(self._values, stats.values, counted=bool((before.count > 0).any()),
                                     incoming=bool((stats.count > 0).any()))
        with torch.no_grad():
            for name, value in merged.to_dict().items():
                self._exact(f"pixel_{name}").copy_(value)
            for name, value in (("running_mean", merged.mean), ("running_var", merged.var.nan_to_num(nan=1.0))):
                self._exact(name).copy_(value)
            self._exact("num_batches_tracked").add_(1)
        return self

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._values = None
        if "pixel_count" in self._buffers:
            empty = ChannelStats.empty(self.num_features, device=self._exact("pixel_count").device)
            for name, value in empty.to_dict().items():
                self._exact(f"pixel_{name}").copy_(value)
