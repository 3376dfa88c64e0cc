"""The reduction kernel: a batch of images (with a mask and ignored values) -> exact per-channel statistics.

Four paths, picked by what the batch is:

- float, every pixel kept: rows of pixels summed in their own dtype over short chunks, centred only where
  their spread is small against their mean (:func:`_dense_stats`);
- float with ignored values: every row as if whole, then only the rows that hold an ignored value again without
  it (:func:`_ignored_stats`);
- float with a mask: two passes over the kept pixels, the second around the first's mean (:func:`_masked_stats`);
- integer (uint8, int8, int16, uint16, int32): counted per value (:class:`~torchnormfit.values.ValueCounts`),
  so count, mean, M2, min and max come from exact integer counts, in the data's own units.

All pool their rows per channel in float64 with Chan's formula; see :func:`batch_stats`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .stats import ChannelStats
from .values import INTEGER_DTYPES, ValueCounts

__all__ = ["Ignore", "Reduction", "batch_stats", "check_finite", "ignore_values", "pixel_rows", "reuse_buffer",
           "tensor_stats"]

Ignore = float | Sequence[float] | Tensor | None
"""``ignore=``: one value for every channel, one per channel, or NaN (NaN pixels); None keeps every pixel."""


_BLOCK_BYTES = 1 << 19  # rows are reduced 512 KiB at a time: a block and its centred copy stay in a 2 MiB L2 cache
_CHUNK = 128  # pixels per float partial sum; bounds the rounding of each (see batch_stats)
_UNCENTRED = 7.0  # a row is reduced uncentred when its sum of squares is at most this many times its M2
_SCRATCH = threading.local()  # each thread's buffer for the rows it centres


def batch_stats(
    images: Tensor,
    *,
    ignore: Ignore = None,
    mask: Tensor | None = None,
    spatial_dims: int = 2,
    values: bool = False,
    windows: tuple[Tensor, int] | None = None,
) -> ChannelStats:
    """Exact per-channel statistics of a batch ``(..., C, *spatial)`` of the pixels it keeps.

    Parameters
    ----------
    images : Tensor
        Float or integer (:data:`INTEGER_DTYPES`) images; ``spatial_dims`` trailing dimensions are pixels
        (2: ``(..., C, H, W)``; 3: ``(..., C, D, H, W)``).
    ignore : float, sequence of float, Tensor or None
        Pixels equal to this value (one for all channels or one per channel; NaN: NaN pixels) are left out.
    mask : Tensor, optional
        Boolean (or 0/1) ``(..., 1 or C, *spatial)``: only pixels where it is true are counted.
    values : bool
        Also count each value (integers) or narrow range of values (floats) per channel, for percentiles
        (:attr:`ChannelStats.values`).
    windows : (Tensor, int), optional
        Float images: instead, count each float32 key in these buckets of each channel (a second pass for exact
        percentiles: :meth:`ValueCounts.count_windows`).

    Returns
    -------
    ChannelStats
        Per channel: the number of pixels kept, their mean, M2, min and max (float64).

    Notes
    -----
    A float image channel (a row of ``n`` pixels) is reduced in its own dtype around a centre ``c`` (0, or
    a guess of its mean) -- sum and sum of squares of ``d = x - c`` over chunks of ``_CHUNK`` pixels, added
    in float64, min and max -- with the corrected two-pass formula (Chan, Golub & LeVeque 1983)::

        mean = c + sum(d) / n
        M2   = sum(d**2) - sum(d)**2 / n

    Its rounding error is that of the sums times ``k = sum(d**2) / M2 = 1 + (mean - c)**2 / var``: for
    float32, M2 within ~3.7 k * 2**-24 relative (``python benchmarks/accumulator_variants.py --bound``). A
    row is kept when ``k <= _UNCENTRED`` (std within ~8e-7); any other is reduced around its mean. Whether a
    row needs centring is first guessed from a sample of it (:func:`_guess_centre`); a row's centre depends
    on that row alone, so its statistics are the same in whatever batch it comes. Rows with a mask or
    ignored pixels take two passes: the mean of the kept pixels, then their deviations from it. Integer
    rows are counted per value and their moments taken from the counts in float64: exact to its rounding.
    float16 and bfloat16 batches are reduced in float32.

    Examples
    --------
    >>> x = torch.tensor([[[[0, 2], [4, 0]]]], dtype=torch.uint16)  # (N, C, H, W), 0 is nodata
    >>> batch_stats(x, ignore=0).mean.tolist()
    [3.0]
    """
    pixels, keep = pixel_rows(images, mask, spatial_dims)
    channels = pixels.shape[1]
    drop = ignore_values(ignore, channels, pixels.dtype)
    if pixels.numel() == 0:
        empty = ChannelStats.empty(channels, device=images.device)
        if windows is not None:
            return empty.with_values(ValueCounts.window_counts(channels, windows))
        return empty.with_values(
            ValueCounts.empty(channels, "float" if images.is_floating_point() else "int") if values else None)
    if not pixels.is_floating_point():
        return _integer_stats(pixels, keep, drop, values)
    if pixels.dtype in (torch.float16, torch.bfloat16):
        pixels = pixels.float()
    if drop is not None and (keep is not None or windows is not None):
        keep, drop = _kept(pixels, keep, drop), None  # the ignored pixels join the mask
    if keep is not None:
        stats = _masked_stats(pixels, keep)
    elif drop is not None:
        stats = _ignored_stats(pixels, drop)
    else:
        stats = _dense_stats(pixels.reshape(-1, pixels.shape[-1]), channels)
    if windows is not None:
        return stats.with_values(ValueCounts.count_windows(pixels, keep, *windows))
    if not values:
        return stats
    if drop is not None:  # every pixel counted, then the ignored ones taken out of their value's bucket
        counts = ValueCounts.count(pixels, None, (stats.min, stats.max), outside="drop")
        return stats.with_values(counts.drop_pixels(drop, pixels.shape[0] * pixels.shape[2] - stats.count))
    return stats.with_values(ValueCounts.count(pixels, keep, (stats.min, stats.max)))


@dataclass(frozen=True)
class Reduction:
    """What a pass leaves out of its statistics and what more it keeps; the same in every worker and rank.

    ``ignore`` as :func:`batch_stats`; ``values`` counts values (for percentiles); ``spatial_dims`` 3 reads
    volumes; ``mask`` says where a sample's mask is (:data:`~torchnormfit.images.MaskSource`): the pass then
    carries it as the image's last channel, so stacking, grouping and transport stay as for images.
    ``percentiles`` (the ones the fit needs) are made exact by a second pass over float images when ``exact``,
    or (``exact=None``) when the counts cannot promise them within 0.1% in rank; that pass counts ``windows``.
    """

    ignore: float | tuple[float, ...] | None = None
    values: bool = False
    spatial_dims: int = 2
    mask: Any = None
    percentiles: tuple[float, ...] = ()
    exact: bool | None = None
    windows: tuple[Tensor, int] | None = field(default=None, compare=False)

    @property
    def masked(self) -> bool:
        return self.mask is not None

    @property
    def plain(self) -> bool:
        return self.ignore is None and not self.values and self.spatial_dims == 2 and self.mask is None

    def stats(self, images: Tensor) -> ChannelStats:
        """:func:`batch_stats` of a stacked batch ``(N, C (+ 1 mask channel), H, W)``."""
        mask = None
        if self.masked:
            images, mask = images[:, :-1], images[:, -1:]
        return batch_stats(images, ignore=self.ignore, mask=mask, values=self.values, windows=self.windows)

    def settings(self) -> dict[str, Any]:
        """What a cache key must see: the options that change the statistics (none when plain)."""
        if self.plain:
            return {}
        settings = {"ignore": self.ignore, "values": self.values, "spatial_dims": self.spatial_dims, "mask": self.mask}
        return settings | ({"exact_percentiles": self.exact} if self.values else {})


def tensor_stats(images: Tensor, *, ignore: Ignore = None, mask: Tensor | None = None, spatial_dims: int = 2,
                 values: bool = False) -> tuple[ChannelStats, int]:
    """:func:`batch_stats` of one batch ``(..., C, *spatial)`` and its number of images; NaN or Inf pixels
    that are not left out raise, naming the image."""
    stats = batch_stats(images, ignore=ignore, mask=mask, spatial_dims=spatial_dims, values=values)
    count = math.prod(images.shape[: -spatial_dims - 1])
    check_finite(stats, list(range(count)), images, spatial_dims)
    return stats, count


def check_finite(stats: ChannelStats, indices: list[int], images: Tensor, spatial_dims: int = 2) -> None:
    """Raise if NaN or Inf pixels reached the statistics, naming the first sample of ``indices`` that has them."""
    if bool(torch.isfinite(stats.mean).all() and torch.isfinite(stats.m2).all()):
        return
    per_image = images.reshape(len(indices), -1) if indices else images.reshape(1, -1)
    if per_image.is_floating_point():
        finite = torch.isfinite(per_image).all(dim=1)
    else:
        finite = torch.ones(len(per_image), dtype=torch.bool)
    bad = indices[int((~finite).nonzero()[0])] if not bool(finite.all()) and indices else (indices or [0])[0]
    raise ValueError(
        f"Sample {bad} contains NaN or Inf pixel values. Statistics need finite pixels: fix or drop the sample, "
        "or pass ignore=float('nan') to leave NaN pixels out."
    )


def pixel_rows(images: Tensor, mask: Tensor | None, spatial_dims: int) -> tuple[Tensor, Tensor | None]:
    """``images`` as ``(N, C, P)`` pixels and ``mask`` as ``(N, 1 or C, P)`` booleans (or None), checked."""
    if images.dtype.is_complex or images.dtype == torch.bool or (
            not images.is_floating_point() and images.dtype not in INTEGER_DTYPES):
        raise TypeError(
            f"Statistics need a float image batch or integers of {', '.join(str(d) for d in INTEGER_DTYPES)}. "
            f"Got dtype {images.dtype}. Convert it first, e.g. with v2.ToDtype(torch.float32, scale=True) (or "
            "ToTensor()) for images stored as integers 0-255, or .to(torch.int32) for other integers."
        )
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3. Got {spatial_dims}.")
    if images.ndim < spatial_dims + 1:
        shape = {1: "(..., C, L)", 2: "(..., C, H, W)", 3: "(..., C, D, H, W)"}[spatial_dims]
        raise ValueError(f"Expected images of shape {shape}. Got a tensor of shape {tuple(images.shape)}.")
    images = images.detach()
    spatial = images.shape[images.ndim - spatial_dims:]
    channels = images.shape[-spatial_dims - 1]
    pixels = images.reshape(math.prod(images.shape[: -spatial_dims - 1]), channels, math.prod(spatial))
    if mask is None:
        return pixels, None
    return pixels, _mask_rows(torch.as_tensor(mask, device=images.device), images.shape, spatial_dims)


def _mask_rows(mask: Tensor, shape: torch.Size, spatial_dims: int) -> Tensor:
    """A mask ``(..., 1 or C, *spatial)`` (leading dimensions broadcast) as ``(N, 1 or C, P)`` booleans."""
    mask = mask.detach()
    if mask.dtype != torch.bool:
        mask = mask != 0
    while mask.ndim < len(shape):
        mask = mask[None]
    channels, spatial = shape[-spatial_dims - 1], tuple(shape[len(shape) - spatial_dims:])
    mask_channels = mask.shape[-spatial_dims - 1]
    if tuple(mask.shape[mask.ndim - spatial_dims:]) != spatial or mask_channels not in (1, channels):
        raise ValueError(
            f"The mask must be shaped like the images with 1 or {channels} channels: (..., 1 or {channels}, "
            f"{', '.join(map(str, spatial))}). Got a mask of shape {tuple(mask.shape)} for images {tuple(shape)}."
        )
    try:
        mask = mask.expand(*shape[: -spatial_dims - 1], mask_channels, *spatial)
    except RuntimeError as error:
        raise ValueError(f"The mask {tuple(mask.shape)} does not fit the images {tuple(shape)}: {error}") from None
    return mask.reshape(math.prod(shape[: -spatial_dims - 1]), mask_channels, math.prod(spatial))


def ignore_values(ignore: Ignore, channels: int, dtype: torch.dtype | None = None) -> list[float] | None:
    """``ignore=`` as one float per channel (None: nothing ignored), checked; rounded to a float ``dtype`` (the
    images'), as ``x == v`` compares them: ``ignore=0.3`` drops float32 pixels of ``float32(0.3)``."""
    if ignore is None:
        return None
    values = torch.as_tensor(ignore, dtype=torch.float64).flatten()
    if dtype is not None and dtype.is_floating_point:
        values = values.to(dtype).double()
    listed = values.tolist()
    if len(listed) == 1:
        listed = listed * channels
    if len(listed) != channels:
        raise ValueError(f"ignore= needs one value or one per channel ({channels}). Got {len(listed)}: {listed}.")
    return listed


def _kept(pixels: Tensor, keep: Tensor | None, drop: Sequence[float], values: Tensor | None = None) -> Tensor:
    """Where a float pixel is kept: in the mask, not equal to its ignored value, not NaN if NaN is.

    ``drop`` holds the ignored values, one per channel of ``pixels`` ``(N, C, P)``; ``values`` places them
    against other pixels (one per row of ``(R, n)`` rows, as ``(R, 1)``).
    """
    if values is None:
        values = torch.tensor(drop, dtype=pixels.dtype, device=pixels.device)[:, None]
    if all(math.isnan(v) for v in drop):
        kept = ~torch.isnan(pixels)
    elif len(set(drop)) == 1:  # one value for every channel: a scalar comparison (5x faster than broadcasting)
        kept = pixels != drop[0]
    else:
        kept = pixels != values
        if any(math.isnan(v) for v in drop):
            kept &= ~(torch.isnan(pixels) & values.isnan())
    return kept if keep is None else kept & keep


# --- integers: counted per value --------------------------------------------------------------------------


def _integer_stats(pixels: Tensor, keep: Tensor | None, drop: list[float] | None, values: bool) -> ChannelStats:
    """Statistics of integer pixels from their exact counts per value (float64 from int32 if they are too wide)."""
    counts = ValueCounts.count(pixels, keep)
    if drop is not None:
        if counts.exact:
            counts = counts.drop(drop, in_place=True)  # counted just now: no one else holds them
        else:
            keep = _kept(pixels.double(), keep, drop)
            counts = ValueCounts.count(pixels, keep)
    if counts.exact:
        stats = ChannelStats._owned(*counts.moments())
    else:  # too wide to count per value within MAX_BINS: float64 holds every int32 exactly
        wide = pixels.double()
        stats = _masked_stats(wide, keep) if keep is not None else _dense_stats(wide.view(-1, wide.shape[-1]),
                                                                                 pixels.shape[1])
    return stats.with_values(counts if values else None)


# --- float, masked: two passes over the kept pixels ----------------------------------------------------------


def _masked_stats(pixels: Tensor, keep: Tensor) -> ChannelStats:
    """Per-channel statistics of the pixels of ``(N, C, P)`` where ``keep`` ``(N, 1 or C, P)`` is true."""
    rows, channels, n = pixels.shape[0] * pixels.shape[1], pixels.shape[1], pixels.shape[2]
    keep = keep.expand(pixels.shape)
    return _pool(*_masked_rows(pixels.reshape(rows, n), keep.reshape(rows, n)), channels)


def _masked_rows(flat: Tensor, kept: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Count, mean, M2, min and max (float64) of the pixels of each row of ``flat`` ``(R, n)`` where ``kept``.

    Each row's dropped pixels are filled with a kept value ``c`` of that row (the mean of the kept pixels of its
    sample, else its first kept pixel), and the row is reduced around ``c``: filled pixels add exactly 0 to
    the sums of deviations and of their squares, and ``c`` lies within the kept pixels' range, so min and max
    are theirs. Then :func:`_centred_rows` with each row's count of kept pixels.
    """
    n = flat.shape[1]
    count = kept.view(torch.uint8).sum(dim=-1, dtype=torch.int32).double()  # 12x faster than bool
    start = max(0, (n - _CHUNK) // 2)
    sample, sample_kept = flat[:, start : start + _CHUNK], kept[:, start : start + _CHUNK]
    in_sample = sample_kept.view(torch.uint8).sum(dim=1, dtype=torch.int32)
    centre = torch.where(sample_kept, sample, 0).sum(dim=1) / in_sample.clamp_min(1)
    first = centre.clone()
    lost = (in_sample == 0).nonzero().squeeze(1)  # no kept pixel in the sample: the row's first kept one
    if lost.numel():
        first[lost] = flat[lost].gather(1, kept[lost].to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1)
    # A mean of kept float values can round an ulp past their range: clamp it into the sample's kept range.
    low = torch.where(sample_kept, sample, math.inf).amin(dim=1)
    high = torch.where(sample_kept, sample, -math.inf).amax(dim=1)
    centre = torch.where(in_sample > 0, torch.minimum(torch.maximum(centre, low), high), first)
    filled = torch.where(kept, flat, centre[:, None])
    return _centred_rows(filled, centre, count)


def _centred_rows(rows: Tensor, centre: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Count, mean, M2, min and max of rows ``(R, n)`` reduced around ``centre``, each holding ``count`` pixels of
    its own (the others equal to its centre); a row too far from its centre (``k > _UNCENTRED``) again in float64."""
    n = rows.shape[1]
    dev_sum, dev_squares, low, high = _reduce(rows, centre)
    safe = count.clamp_min(1)
    mean = dev_sum / safe
    m2 = torch.addcmul(dev_squares, dev_sum, mean, value=-1).clamp_min_(0)
    mean += centre
    redo = torch.gt(dev_squares, m2.mul(_UNCENTRED)).nonzero().squeeze_(1)
    if redo.numel():  # two passes in float64 on these rows; the filled pixels' part taken out exactly
        dropped = n - count[redo]
        gap = centre[redo].double() - mean[redo]
        again = rows[redo].double() - mean[redo, None]
        deviation = again.sum(dim=1) - dropped * gap
        squares = torch.linalg.vector_norm(again, dim=1).square_() - dropped * gap.square()
        mean[redo] += deviation / safe[redo]
        m2[redo] = (squares - deviation.square() / safe[redo]).clamp_min_(0)
    empty = count == 0  # filled with a pixel that is not kept (NaN for a row of NaN under ignore=nan): nothing
    return (count, mean.masked_fill(empty, 0.0), m2.masked_fill(empty, 0.0), low.masked_fill(empty, math.inf),
            high.masked_fill(empty, -math.inf))


def _pool(count: Tensor, mean: Tensor, m2: Tensor, low: Tensor, high: Tensor, channels: int) -> ChannelStats:
    """Rows ``(N * C,)`` of count, mean, M2, min and max pooled per channel (Chan's formula for many parts)."""
    count, mean, m2 = count.view(-1, channels), mean.view(-1, channels), m2.view(-1, channels)
    low, high = low.view(-1, channels).amin(dim=0), high.view(-1, channels).amax(dim=0)
    total = count.sum(dim=0)
    safe = total.clamp_min(1)
    pooled = (count * mean).sum(dim=0) / safe
    pooled = torch.where(total > 0, pooled.clamp(min=low, max=high), 0.0)  # rounding never leaves [min, max]
    m2 = m2.sum(dim=0) + (count * (mean - pooled).square()).sum(dim=0)
    return ChannelStats._owned(total, pooled, torch.where(total > 0, m2, 0.0), low, high)


# --- float, ignored values: every row reduced as if whole, then the rows that hold the value again ------------


def _ignored_stats(pixels: Tensor, drop: Sequence[float]) -> ChannelStats:
    """Per-channel statistics of float pixels ``(N, C, P)`` without those equal to their channel's ``drop`` value.

    A row can hold its ignored value only where its min and max enclose it (NaN: where they are NaN); the
    others are reduced whole (:func:`_dense_rows`) and only these without the value (:func:`_masked_rows`).
    Nodata is usually in few rows, so most batches cost what a plain one does plus a min and a max.
    """
    images, channels, n = pixels.shape
    rows = pixels.reshape(-1, n)
    low, high = rows.amin(dim=1).double(), rows.amax(dim=1).double()
    value = torch.tensor(drop, dtype=torch.float64, device=rows.device).repeat(images)
    holding = torch.where(value.isnan(), low.isnan(), (low <= value) & (value <= high))
    holds = holding.nonzero().squeeze(1)
    if holds.numel() == 0:
        return _dense_stats(rows, channels)
    count = torch.full_like(low, float(n))
    mean, m2 = torch.empty_like(low), torch.empty_like(low)
    whole = (~holding).nonzero().squeeze(1)
    if whole.numel():
        for full, part in zip((mean, m2, low, high), _dense_rows(rows[whole])):
            full[whole] = part
    subset = rows if holds.numel() == rows.shape[0] else rows[holds]
    kept = _kept(subset, None, drop, value[holds, None].to(subset.dtype))
    for full, part in zip((count, mean, m2, low, high), _masked_rows(subset, kept)):
        full[holds] = part
    return _pool(count, mean, m2, low, high, channels)


# --- float, every pixel: centred only where needed -----------------------------------------------------------


def _dense_stats(rows: Tensor, channels: int) -> ChannelStats:
    """Per-channel statistics of float rows ``(R, n)``, ``R`` a multiple of ``channels`` (see batch_stats)."""
    n = rows.shape[1]
    mean, m2, low, high = _dense_rows(rows)
    mean, m2 = mean.view(-1, channels), m2.view(-1, channels)
    low, high = low.view(-1, channels).amin(dim=0), high.view(-1, channels).amax(dim=0)
    pooled = mean.mean(dim=0).clamp_(min=low, max=high)  # rounding never leaves [min, max]
    m2 = m2.sum(dim=0).add_((mean - pooled).square_().sum(dim=0), alpha=n)
    return ChannelStats._owned(torch.full_like(pooled, float(mean.shape[0] * n)), pooled, m2, low, high)


def _dense_rows(rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, M2, min and max (float64) of each float row of ``rows`` ``(R, n)``, every pixel counted."""
    n = rows.shape[1]
    centre = _guess_centre(rows)
    dev_sum, dev_squares, low, high = _reduce(rows, centre)
    mean = dev_sum / n
    m2 = torch.addcmul(dev_squares, dev_sum, mean, value=-1)
    if centre is not None:
        mean += centre
    redo = torch.gt(dev_squares, m2.mul(_UNCENTRED)).nonzero().squeeze_(1)
    if redo.numel():
        # Few rows (a guess that missed): two passes in float64. A constant row gets exactly its value, M2 0.
        again = rows[redo].double()
        first = again.mean(dim=1, keepdim=True)
        again -= first
        deviation, squares = again.sum(dim=1), torch.linalg.vector_norm(again, dim=1).square_()
        mean[redo] = deviation.div(n).add_(first.squeeze(1))
        m2[redo] = torch.addcmul(squares, deviation, deviation, value=-1 / n).clamp_min_(0)
    return mean, m2, low, high


_GUESS = 6.0
"""A row is centred when its sample's ``sum(x**2) / M2`` is above this (see _guess_centre)."""


def _guess_centre(rows: Tensor) -> Tensor | None:
    """The centre of each row as its middle ``_CHUNK`` pixels say: their mean where the row needs
    centring, else 0; None when no row needs it.

    A row is said to need it when the sample's ``k = sum(x**2) / M2`` is above
    ``_GUESS``: ``k > T`` is ``sum(x)**2 * T / ((T - 1) m) > sum(x**2)`` for a
    sample of ``m`` pixels. 6 is above what samples of 128 uniform pixels (k = 4)
    show in all but ~2e-4 of rows, and below ``_UNCENTRED`` by enough that rows a
    sample misjudges are rare (none in 15,360 CIFAR-like rows); those that stay
    uncentred with ``k > _UNCENTRED`` are reduced again. A row's centre depends
    on that row alone, and so do its statistics: the same whatever batch.
    """
    start = max(0, (rows.shape[1] - _CHUNK) // 2)
    sample = rows[:, start : start + _CHUNK]
    m = sample.shape[1]
    total, squares = sample.sum(dim=-1), torch.linalg.vector_norm(sample, dim=-1).square_()
    threshold = _GUESS
    needs = torch.gt(total.square().mul_(threshold / ((threshold - 1) * m)), squares)
    if not bool(needs.any()):
        return None
    return total.div_(m).mul_(needs)


def _reduce(rows: Tensor, centre: Tensor | None, index: Tensor | None = None) -> tuple[Tensor, ...]:
    """Float64 sum of deviations from ``centre`` (0 if None), sum of their squares, min and max of each
    row of ``rows`` ``(R, n)``.

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
    chunks = -(-n // _CHUNK)
    out = torch.empty(count * (2 * chunks + 2), dtype=rows.dtype, device=rows.device)
    sums, norms = out[: 2 * count * chunks].view(2, count, chunks)
    low, high = out[2 * count * chunks :].view(2, count)
    blocks = -(-count // per_block)
    if centre is not None or index is not None:
        _SCRATCH.work = work = reuse_buffer(getattr(_SCRATCH, "work", None), min(count, per_block) * n, rows)
    pieces = zip(
        rows.split(per_block) if index is None else index.split(per_block),
        sums.split(per_block), norms.split(per_block), low.split(per_block), high.split(per_block),
        [None] * blocks if centre is None else centre[:, None].split(per_block),
    )
    for block, block_sums, block_norms, block_low, block_high, block_centre in pieces:
        if index is None:
            torch.amin(block, dim=-1, out=block_low)
            torch.amax(block, dim=-1, out=block_high)
        else:
            block = torch.index_select(rows, 0, block, out=work[: block.numel() * n].view(-1, n))
        if block_centre is not None:
            block = torch.sub(block, block_centre, out=work[: block.numel()].view(-1, n))
        _chunk_sums(block, block_sums, block_norms)
    # The chunks' sums added in float64, their norms too (sqrt(sum(norm**2)) squared again: an ulp of float64).
    dev_sum = torch.sum(sums, dim=1, dtype=torch.float64)
    dev_squares = torch.linalg.vector_norm(norms, dim=1, dtype=torch.float64).square_()
    extremes = out[2 * count * chunks :].view(2, count).double()
    return dev_sum, dev_squares, extremes[0], extremes[1]


def _chunk_sums(block: Tensor, sums: Tensor, norms: Tensor) -> None:
    """Sums and norms of ``block``'s rows over chunks of ``_CHUNK`` pixels, into ``(R, chunks)`` tensors."""
    n = block.shape[1]
    whole = n - n % _CHUNK
    if whole == n:
        chunks = block.unflatten(-1, (-1, _CHUNK))
        torch.sum(chunks, dim=-1, out=sums)
        torch.linalg.vector_norm(chunks, dim=-1, out=norms)
        return
    if whole:
        chunks = block[:, :whole].unflatten(-1, (-1, _CHUNK))
        torch.sum(chunks, dim=-1, out=sums[:, : whole // _CHUNK])
        torch.linalg.vector_norm(chunks, dim=-1, out=norms[:, : whole // _CHUNK])
    torch.sum(block[:, whole:], dim=-1, keepdim=True, out=sums[:, -1:])
    torch.linalg.vector_norm(block[:, whole:], dim=-1, keepdim=True, out=norms[:, -1:])


def reuse_buffer(work: Tensor | None, numel: int, like: Tensor) -> Tensor:
    """``work`` if it holds ``numel`` elements of ``like``'s dtype and device, else a new 1-D buffer."""
    if work is None or work.dtype != like.dtype or work.device != like.device or work.numel() < numel:
        work = torch.empty(numel, dtype=like.dtype, device=like.device)
    return work
