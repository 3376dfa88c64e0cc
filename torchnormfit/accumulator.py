"""BatchNormAccumulator: exact dataset statistics through a BatchNorm2d."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .stats import ChannelStats

__all__ = ["BatchNormAccumulator", "batch_stats"]

_EXACT_BUFFERS = ("pixel_count", "pixel_mean", "pixel_m2", "pixel_min", "pixel_max")  # float64 whatever .to() says
_BLOCK_BYTES = 4 << 20  # images are reduced ~4 MiB at a time, so each is read from memory once
_CHUNK = 1024  # pixels per partial sum of squares; bounds the float rounding of each (see _reduce)
_GRID = 8  # a centre is first guessed from an 8x8 grid of pixels of each image


def batch_stats(images: Tensor, work: Tensor | None = None) -> tuple[ChannelStats, Tensor | None]:
    """Exact per-channel statistics of a float batch ``(..., C, H, W)``.

    Each image is reduced in its own dtype around a centre ``c`` close to its
    own mean, with the corrected two-pass formula (Chan, Golub & LeVeque 1983)::

        d    = x - c
        mean = c + sum(d) / n
        M2   = sum(d**2) - sum(d)**2 / n

    so there is no cancellation whatever the brightness or the offset. The
    centre is the mean of an 8x8 grid of the image's pixels; an image whose
    centre lands more than one standard deviation from its mean is reduced
    again around its mean, and a constant image is exactly constant. Sums of
    squares are taken in chunks of ``_CHUNK`` pixels, so their rounding does
    not grow with the image size. Per-image results are pooled in float64.
    Relative error against a float64 two-pass computation: ~1e-8 for float32
    input. float16 and bfloat16 batches are reduced in float32.

    The batch is walked in blocks of about 4 MiB, so each block is still in
    the CPU cache for its sums, minimum and maximum. ``work`` is a scratch
    buffer reused between calls; the buffer to pass next time is returned.
    """
    if images.dtype.is_complex or not images.dtype.is_floating_point:
        raise TypeError(
            f"Statistics need a floating point image batch. Got dtype {images.dtype}. Convert it first, e.g. with "
            "v2.ToDtype(torch.float32, scale=True) (or ToTensor()) for images stored as integers 0-255."
        )
    if images.ndim < 3:
        raise ValueError(f"Expected images of shape (..., C, H, W). Got a tensor of shape {tuple(images.shape)}.")
    channels, height, width = images.shape[-3:]
    if images.numel() == 0:
        return ChannelStats.empty(channels, device=images.device), work
    images = images.detach()
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    flat = images.reshape(-1, channels, height * width)
    n = flat.shape[-1]

    rows, cols = max(1, height // _GRID), max(1, width // _GRID)
    centre = flat.unflatten(-1, (height, width))[..., rows // 2 :: rows, cols // 2 :: cols].mean(dim=(-2, -1))
    mean_i, m2_i, low, high, work = _reduce(flat, centre, work)

    constant = low == high
    far = ((mean_i - centre.double()).square() > m2_i / n) & ~constant
    if bool(far.any()):
        # A centre more than one std from the mean: centre those images again, on their mean.
        redo = far.nonzero(as_tuple=True)
        again = flat[redo][:, None]  # (images, 1 channel, pixels)
        mean_again, m2_again, _, _, work = _reduce(again, mean_i[redo].to(flat.dtype)[:, None], work)
        mean_i[redo], m2_i[redo] = mean_again[:, 0], m2_again[:, 0]
    mean_i = torch.where(constant, low, mean_i.clamp(min=low, max=high))  # rounding never leaves [min, max]
    m2_i = torch.where(constant, 0.0, m2_i.clamp_min(0))

    mean = mean_i.mean(dim=0)
    m2 = m2_i.sum(dim=0) + n * (mean_i - mean).square().sum(dim=0)
    count = torch.full_like(mean, float(flat.shape[0] * n))
    return ChannelStats(count, mean, m2, low.amin(dim=0), high.amax(dim=0)), work


def _reduce(flat: Tensor, centre: Tensor, work: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Float64 mean, M2, min and max of each row of ``flat`` ``(N, C, n)``, from its deviations from ``centre``.

    ``vector_norm`` is the fastest reduction of squares (no temporary), but its
    float32 rounding grows with the length reduced (~1e-4 relative over a
    2048x2048 image on the CPU); over chunks of ``_CHUNK`` pixels it stays
    ~1e-7, and the chunks are added in float64.
    """
    count, channels, n = flat.shape
    per_block = min(count, max(1, _BLOCK_BYTES // (channels * n * flat.element_size())))
    work = reuse_buffer(work, per_block * channels * n, flat)
    chunks = n // _CHUNK if n > 2 * _CHUNK else 0
    whole = chunks * _CHUNK
    dev_sum, low, high = torch.empty(3, count, channels, dtype=flat.dtype, device=flat.device)
    norms = torch.empty(count, channels, chunks + (whole < n), dtype=flat.dtype, device=flat.device)
    for start in range(0, count, per_block):
        stop = min(count, start + per_block)
        block = flat[start:stop]
        centred = work[: block.numel()].view(block.shape)
        torch.sub(block, centre[start:stop, :, None], out=centred)
        torch.sum(centred, dim=-1, out=dev_sum[start:stop])
        torch.amin(block, dim=-1, out=low[start:stop])
        torch.amax(block, dim=-1, out=high[start:stop])
        if chunks:
            torch.linalg.vector_norm(centred[..., :whole].unflatten(-1, (chunks, _CHUNK)), dim=-1,
                                     out=norms[start:stop, :, :chunks])
        if whole < n:
            torch.linalg.vector_norm(centred[..., whole:], dim=-1, keepdim=True, out=norms[start:stop, :, chunks:])
    dev_sum = dev_sum.double()
    mean = centre.double() + dev_sum / n
    m2 = norms.double().square_().sum(dim=-1) - dev_sum.square() / n
    return mean, m2, low.double(), high.double(), work


def reuse_buffer(work: Tensor | None, numel: int, like: Tensor) -> Tensor:
    """``work`` if it holds ``numel`` elements of ``like``'s dtype and device, else a new 1-D buffer."""
    if work is None or work.dtype != like.dtype or work.device != like.device or work.numel() < numel:
        work = torch.empty(numel, dtype=like.dtype, device=like.device)
    return work


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

    def _apply(self, fn, recurse=True):
        # .half(), .float(), .to(dtype) convert every floating point buffer; the exact state must stay
        # float64 (a float32 count is exact only up to 2**24 pixels), so only its device follows.
        exact = {name: self._buffers[name] for name in _EXACT_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            after = self._buffers[name]
            if after.dtype != torch.float64:
                self._buffers[name] = before.to(device=after.device)
        return self

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_work": None}  # a scratch buffer, not state: do not pickle or deep-copy it

    @property
    def stats(self) -> ChannelStats:
        """The pooled statistics so far, as a :class:`ChannelStats` (a snapshot, not a view)."""
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
