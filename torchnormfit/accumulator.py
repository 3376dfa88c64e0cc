"""BatchNormAccumulator: exact dataset statistics through a BatchNorm2d."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .stats import ChannelStats

__all__ = ["BatchNormAccumulator", "batch_stats"]


def batch_stats(images: Tensor, work: Tensor | None = None) -> tuple[ChannelStats, Tensor]:
    """Exact per-channel statistics of a float batch ``(..., C, H, W)``.

    Each image is summed in its own dtype around its own mean (so no
    cancellation, whatever the brightness), and the per-image results are
    pooled in float64. Relative error against a float64 two-pass computation
    is about the input dtype's rounding of one image's sum: ~1e-7 for float32.

    ``work`` is a scratch tensor reused between calls to avoid a fresh
    allocation per batch; the (possibly grown) scratch tensor is returned.
    """
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    channels = images.shape[-3]
    flat = images.reshape(-1, channels, images.shape[-2] * images.shape[-1])
    per_image = flat.shape[-1]
    work = _scratch(work, flat)

    sums = flat.sum(dim=-1)
    shift = sums / per_image
    torch.sub(flat, shift[:, :, None], out=work)
    squares = torch.linalg.vector_norm(work, dim=-1).double().square()

    mean_i = sums.double() / per_image
    residual = mean_i - shift.double()  # what the rounded shift missed
    m2_i = squares - per_image * residual.square()
    mean = mean_i.mean(dim=0)
    m2 = m2_i.sum(dim=0) + per_image * (mean_i - mean).square().sum(dim=0)
    count = torch.full_like(mean, float(flat.shape[0] * per_image))
    stats = ChannelStats(count, mean, m2.clamp_min(0), flat.amin(dim=-1).amin(dim=0).double(), flat.amax(dim=-1).amax(dim=0).double())
    return stats, work


def _scratch(work: Tensor | None, like: Tensor) -> Tensor:
    if work is None or work.dtype != like.dtype or work.device != like.device or work.numel() < like.numel():
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return work.view(-1)[: like.numel()].view(like.shape)


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
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False, track_running_stats=True, device=device)
        self.exact = momentum is None
        empty = ChannelStats.empty(num_features, device=device)
        for name, value in empty.to_dict().items():
            self.register_buffer(f"pixel_{name}", value)
        self._work: Tensor | None = None

    @property
    def stats(self) -> ChannelStats:
        """The pooled statistics so far, as a :class:`ChannelStats`."""
        return ChannelStats(self.pixel_count, self.pixel_mean, self.pixel_m2, self.pixel_min, self.pixel_max)

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self.exact):
            return super().forward(input)
        self._check_input_dim(input)
        self.update(input.detach())
        return input

    def update(self, images: Tensor) -> ChannelStats:
        """Merge a float batch ``(..., C, H, W)`` in and return the batch's own statistics."""
        stats, self._work = batch_stats(images, self._work)
        self.merge(stats)
        return stats

    def merge(self, other: BatchNormAccumulator | ChannelStats) -> BatchNormAccumulator:
        """Add another accumulator's (or a :class:`ChannelStats`') pixels to this one, exactly."""
        stats = other.stats if isinstance(other, BatchNormAccumulator) else other
        merged = self.stats.merge(stats)
        with torch.no_grad():
            for name, value in merged.to_dict().items():
                getattr(self, f"pixel_{name}").copy_(value)
            self.running_mean.copy_(merged.mean)
            self.running_var.copy_(merged.var.nan_to_num(nan=1.0))
            self.num_batches_tracked.add_(1)
        return self

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "pixel_count"):
            empty = ChannelStats.empty(self.num_features, device=self.pixel_count.device)
            for name, value in empty.to_dict().items():
                getattr(self, f"pixel_{name}").copy_(value)
