"""BatchNormAccumulator: exact dataset statistics through a BatchNorm2d."""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from .stats import ChannelStats

__all__ = ["BatchNormAccumulator", "batch_stats"]

_EXACT_BUFFERS = ("pixel_count", "pixel_mean", "pixel_m2", "pixel_min", "pixel_max")  # float64 whatever .to() says
_BLOCK_BYTES = 1 << 20  # rows are reduced ~1 MiB at a time, so each block is still in the CPU cache for all its sums
_CHUNK = 128  # pixels per float partial sum; bounds the rounding of each (see batch_stats)
_UNCENTRED = 5.0  # a row is reduced uncentred when its sum of squares is at most this many times its M2
_SCRATCH = threading.local()  # each thread's buffer for the rows it centres


def batch_stats(images: Tensor) -> ChannelStats:
    """Exact per-channel statistics of a float batch ``(..., C, H, W)``.

    Each image channel (a row of ``n = H * W`` pixels) is reduced in its own
    dtype around a centre ``c`` (0, or a guess of its mean) -- sum and sum of
    squares of ``d = x - c`` over chunks of ``_CHUNK`` pixels, added in
    float64, min and max -- with the corrected two-pass formula (Chan, Golub
    & LeVeque 1983)::

        mean = c + sum(d) / n
        M2   = sum(d**2) - sum(d)**2 / n

    Its rounding error is that of the sums times ``k = sum(d**2) / M2 =
    1 + (mean - c)**2 / var``: for float32, M2 within ~3.7 k * 2**-24
    relative (the largest over 180,000 rows of three distributions:
    ``python benchmarks/accumulator_variants.py --bound``). A row is kept
    when ``k <= _UNCENTRED`` (std within ~6e-7); any other is reduced again
    around its mean (exactly its value when it is constant: its M2 is then
    exactly 0). So rows whose spread is not small against their mean are
    reduced as they are, with no subtraction pass; bright or dark rows with
    little spread, a large offset and flat images are centred. Whether a row
    needs centring is first guessed from a sample of it (``_guess_centre``);
    if one does, the batch is walked with a subtraction pass, of its
    sample's mean from such a row and of 0 from the others (which leaves
    them as they are). Per-row results are pooled per channel in float64. float16 and bfloat16 batches are reduced in float32.

    The rows are walked in blocks of about 1 MiB, so each block is still in
    the CPU cache for all its reductions; centring goes through a scratch
    buffer of one block, one per thread.
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
        return ChannelStats.empty(channels, device=images.device)
    images = images.detach()
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    rows = images.reshape(-1, height * width)
    n = rows.shape[1]

    dev_sum, dev_squares, low, high, centre = _reduce(rows, _guess_centre(rows))
    mean = centre + dev_sum / n
    m2 = torch.addcmul(dev_squares, dev_sum, dev_sum, value=-1 / n)
    redo = (dev_squares > _UNCENTRED * m2).nonzero().squeeze(1)
    if redo.numel():
        # Around the mean: exactly the value of a constant row (c + one ulp's deviation), whose M2 is then 0.
        dev_sum, dev_squares, _, _, centre = _reduce(rows, mean[redo].to(rows.dtype), index=redo)
        mean[redo] = centre + dev_sum / n
        m2[redo] = torch.addcmul(dev_squares, dev_sum, dev_sum, value=-1 / n).clamp_min_(0)

    mean, m2 = mean.view(-1, channels), m2.view(-1, channels)
    low, high = low.view(-1, channels).amin(dim=0), high.view(-1, channels).amax(dim=0)
    pooled = mean.mean(dim=0).clamp_(min=low, max=high)  # rounding never leaves [min, max]
    m2 = m2.sum(dim=0).add_((mean - pooled).square_().sum(dim=0), alpha=n)
    return ChannelStats._owned(torch.full_like(pooled, float(mean.shape[0] * n)), pooled, m2, low, high)


def _guess_centre(rows: Tensor) -> Tensor | None:
    """The centre of each row as its middle ``_CHUNK`` pixels say: their mean where the row needs
    centring, else 0; None when no row needs it.

    A row is said to need it when the sample's ``sum(x**2) / M2`` is above
    twice ``_UNCENTRED``: a sample of 128 pixels misjudges it by less than
    that, so rows that can stay uncentred are rarely centred for nothing. A
    row's centre depends on that row alone, and so do its statistics: the
    same whatever batch it comes in.
    """
    start = max(0, (rows.shape[1] - _CHUNK) // 2)
    sample = rows[:, start : start + _CHUNK]
    total, squares = sample.sum(dim=-1), torch.linalg.vector_norm(sample, dim=-1).square_()
    mean = total / sample.shape[1]
    needs = squares > 2 * _UNCENTRED * torch.addcmul(squares, total, mean, value=-1)
    return mean.masked_fill_(~needs, 0) if bool(needs.any()) else None


def _reduce(rows: Tensor, centre: Tensor | None, index: Tensor | None = None) -> tuple[Tensor, ...]:
    """Float64 sum of deviations from ``centre`` (0 if None), sum of their squares, min and max of each
    row of ``rows`` ``(R, n)``, and the centre, in float64.

    The rows are walked in blocks of ``_BLOCK_BYTES``; with a centre, each
    block is subtracted into a scratch buffer first. With ``index``, only
    those rows are reduced, and not their min and max (the values returned
    in their place are meaningless). Sums are taken over chunks of
    ``_CHUNK`` pixels in the rows' dtype (``vector_norm`` for the squares:
    no temporary) and the chunks added in float64, so their rounding does
    not grow with the image size.
    """
    n = rows.shape[1]
    count = rows.shape[0] if index is None else index.numel()
    per_block = max(1, _BLOCK_BYTES // (n * rows.element_size()))
    if centre is not None:
        _SCRATCH.work = work = reuse_buffer(getattr(_SCRATCH, "work", None), min(count, per_block) * n, rows)
    chunks = -(-n // _CHUNK)
    out = torch.empty(count * (2 * chunks + 2), dtype=rows.dtype, device=rows.device)
    sums, norms = out[: 2 * count * chunks].view(2, count, chunks)
    low, high = out[2 * count * chunks :].view(2, count)
    for start in range(0, count, per_block):
        stop = min(count, start + per_block)
        if index is None:
            block = rows[start:stop]
            torch.amin(block, dim=-1, out=low[start:stop])
            torch.amax(block, dim=-1, out=high[start:stop])
        else:
            block = torch.index_select(rows, 0, index[start:stop], out=work[: (stop - start) * n].view(-1, n))
        if centre is not None:
            block = torch.sub(block, centre[start:stop, None], out=work[: (stop - start) * n].view(-1, n))
        _chunk_sums(block, sums[start:stop], norms[start:stop])
    out = out.double()
    sums, squares = out[: 2 * count * chunks].view(2, count, chunks)
    centre = torch.zeros_like(out[:count]) if centre is None else centre.double()
    return sums.sum(dim=1), squares.square_().sum(dim=1), *out[2 * count * chunks :].view(2, count), centre


def _chunk_sums(block: Tensor, sums: Tensor, norms: Tensor) -> None:
    """Sums and norms of ``block``'s rows over chunks of ``_CHUNK`` pixels, into ``(R, chunks)`` tensors."""
    n = block.shape[1]
    whole = n - n % _CHUNK
    if whole:
        chunks = block[:, :whole].unflatten(-1, (-1, _CHUNK))
        torch.sum(chunks, dim=-1, out=sums[:, : whole // _CHUNK])
        torch.linalg.vector_norm(chunks, dim=-1, out=norms[:, : whole // _CHUNK])
    if whole < n:
        torch.sum(block[:, whole:], dim=-1, keepdim=True, out=sums[:, -1:])
        torch.linalg.vector_norm(block[:, whole:], dim=-1, keepdim=True, out=norms[:, -1:])


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
        stats = batch_stats(images)
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
