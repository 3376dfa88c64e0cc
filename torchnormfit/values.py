"""ValueCounts: per-channel counts of pixel values, the mergeable state behind percentiles.

Integer images are counted per value (an offset bincount per channel), so their percentiles are exactly
``numpy.percentile(..., method="linear")`` of the pixels. Float images are counted per narrow range of values
(a bucket of the float32 bit pattern that keeps 11 of the 23 mantissa bits: every bucket spans at most
``2**-11`` of its values' magnitude, the idea of DDSketch and HdrHistogram), so a percentile is within that
relative resolution and :meth:`ValueCounts.rank_error` says how many pixels it could be off by. Counts are
integers, so :meth:`ValueCounts.merge` is exact in any order: batches, workers, ranks and ``partial_fit``.

Memory is bounded: all channels together hold at most ``MAX_BINS`` counters. Where a range of values needs
more (wide int32 data, float data spanning many magnitudes), neighbouring values are pooled two by two until it
fits (``shift`` grows by one) and the counts stop being exact; :attr:`ValueCounts.exact` says which.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["FLOAT_SHIFT", "INTEGER_DTYPES", "MAX_BINS", "ValueCounts", "float_keys"]

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32)
"""Integer image dtypes fitted in their own units: counted per value, so their statistics are exact."""

MAX_BINS = 1 << 22
"""Counters held at once by one ValueCounts, all channels together (32 MiB of int64)."""
FLOAT_SHIFT = 12
"""Bits of a float32 key pooled into one bucket: 11 mantissa bits kept, buckets ``2**-11`` of the value wide."""
_KINDS = ("int", "float", "window")
_INT32_MAX = (1 << 31) - 1
_NO_BUCKET = 1 << 30  # pads :meth:`ValueCounts.windows`: above any bucket of float keys (shift >= 12)
_SCRATCH = threading.local()  # each thread's int32 buffer for the keys it counts


def float_keys(images: Tensor, out: Tensor | None = None, nonnegative: bool = False) -> Tensor:
    """int32 keys that order like the float32 values of ``images`` (sign-magnitude to two's complement); -0.0 has
    the key of 0.0 (they are one value), also where a float64 value rounds to -0.0 in float32.

    ``out``: a contiguous int32 tensor of ``images``' shape to write them in; ``nonnegative``: no value is below
    0, so the float32 bits already order (one pass saved).
    """
    floats = None if out is None else out.view(torch.float32)
    bits = torch.add(images.to(torch.float32), 0.0, out=floats).view(torch.int32)  # a copy; -0.0 + 0.0 is 0.0
    if not nonnegative:
        bits.bitwise_xor_(torch.bitwise_right_shift(bits, 31).bitwise_and_(_INT32_MAX))
    return bits


def _keys_to_floats(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.int64).clip(-(1 << 31), _INT32_MAX).astype(np.int32)
    return (keys ^ ((keys >> 31) & _INT32_MAX)).view(np.float32).astype(np.float64)


class ValueCounts:
    """How many kept pixels of each channel hold each value (or fall in each narrow bucket of values).

    Parameters
    ----------
    kind : {"int", "float", "window"}
        ``"int"``: buckets of integer values; ``"float"``: buckets of float32 keys (:func:`float_keys`);
        ``"window"``: each float32 key of a few buckets per channel (:meth:`count_windows`, for :meth:`refined`).
    shift : int
        Bucket ``b`` holds the keys ``k`` with ``k >> shift == b``; 0 for exact integer counts.
    offset : Tensor
        ``(C,)`` int64: the bucket index of each channel's first counter.
    counts : Tensor
        ``(C, L)`` int64 counters.

    Examples
    --------
    >>> x = torch.tensor([[[1, 2, 2, 9]]], dtype=torch.int16)  # (N, C, pixels)
    >>> counts = ValueCounts.count(x)
    >>> counts.percentiles([50.0], torch.tensor([1.0]), torch.tensor([9.0])).tolist()
    [[2.0]]
    """

    __slots__ = ("counts", "detail", "kind", "offset", "shift")
    kind: str
    shift: int
    offset: Tensor
    counts: Tensor
    detail: tuple[Tensor, Tensor] | None
    """Float counts refined by a second pass (:meth:`refined`): the buckets ``(C, m)`` and the
    count of each float32 key in them ``(C, m * 2**shift)``, so the percentiles there are exact."""

    def __init__(self, kind: str, shift: int, offset: Tensor, counts: Tensor,
                 detail: tuple[Tensor, Tensor] | None = None) -> None:
        if kind not in _KINDS:
            raise ValueError(f"ValueCounts kind must be one of {_KINDS}. Got {kind!r}.")
        offset = torch.as_tensor(offset, dtype=torch.int64).cpu()
        counts = torch.as_tensor(counts, dtype=torch.int64).cpu()
        if offset.ndim != 1 or counts.ndim != 2 or counts.shape[0] != offset.shape[0]:
            raise ValueError(f"ValueCounts needs offset (C,) and counts (C, L). Got {tuple(offset.shape)} and "
                             f"{tuple(counts.shape)}.")
        if shift < 0 or (kind == "float" and shift < FLOAT_SHIFT) or bool((counts < 0).any()):
            raise ValueError(f"Invalid ValueCounts: shift {shift} for kind {kind!r}, or negative counts.")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "shift", int(shift))
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "counts", counts)
        if detail is not None:
            buckets, keys = (torch.as_tensor(part, dtype=torch.int64).cpu() for part in detail)
            if (kind != "float" or buckets.ndim != 2 or buckets.shape[0] != counts.shape[0]
                    or keys.shape != (counts.shape[0], buckets.shape[1] << shift)):
                raise ValueError(f"Invalid ValueCounts detail: buckets {tuple(buckets.shape)}, keys "
                                 f"{tuple(keys.shape)} for {kind!r} counts of shift {shift}.")
            detail = (buckets, keys)
        object.__setattr__(self, "detail", detail)

    @classmethod
    def _of(cls, kind: str, shift: int, offset: Tensor, counts: Tensor,
            detail: tuple[Tensor, Tensor] | None = None) -> ValueCounts:
        """Counts built here (valid by construction): no checks, no copies."""
        made = object.__new__(cls)
        for name, value in (("kind", kind), ("shift", shift), ("offset", offset), ("counts", counts),
                            ("detail", detail)):
            object.__setattr__(made, name, value)
        return made

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ValueCounts is immutable; merge() returns a new object.")

    def __reduce__(self):
        return (ValueCounts, (self.kind, self.shift, self.offset, self.counts, self.detail))

    def __repr__(self) -> str:
        return (f"ValueCounts(kind={self.kind!r}, channels={self.num_channels}, shift={self.shift}, "
                f"bins={tuple(self.counts.shape)}, pixels={self.total.tolist()})")

    @property
    def num_channels(self) -> int:
        return self.offset.numel()

    @property
    def total(self) -> Tensor:
        """Pixels counted per channel (int64)."""
        return self.counts.sum(dim=1)

    @property
    def exact(self) -> bool:
        """Whether every count is of one value (integer data, nothing pooled): percentiles are then exact."""
        return self.kind == "int" and self.shift == 0

    # --- building --------------------------------------------------------------------------------------

    @classmethod
    def empty(cls, num_channels: int, kind: str = "int") -> ValueCounts:
        shift = 0 if kind == "int" else FLOAT_SHIFT
        offset = torch.zeros(num_channels, dtype=torch.int64)
        return cls(kind, shift, offset, torch.zeros(num_channels, 0, dtype=torch.int64))

    @classmethod
    def count(cls, images: Tensor, keep: Tensor | None = None, bounds: tuple[Tensor, Tensor] | None = None,
              outside: str = "error") -> ValueCounts:
        """Count the values of ``images`` ``(N, C, P)`` per channel, where ``keep`` ``(N, 1 or C, P)`` is true.

        Integer images are counted per value; float images per bucket of their float32 key (-0.0 counted as 0.0).
        ``bounds``: each channel's min and max kept value when known (a :class:`ChannelStats`'), which saves two
        passes; ``outside="drop"`` then leaves out the values outside them (ignored ones) instead of a mask.
        """
        if images.ndim != 3:
            raise ValueError(f"ValueCounts.count expects (N, C, P) pixels. Got {tuple(images.shape)}.")
        kind = "float" if images.is_floating_point() else "int"
        # Keys into a buffer reused from batch to batch: a fresh one costs its page faults every time.
        _SCRATCH.keys = reuse(getattr(_SCRATCH, "keys", None), images.numel(), images.device)
        keys = _SCRATCH.keys[: images.numel()].view(images.shape)
        if kind == "float":
            float_keys(images, out=keys, nonnegative=bounds is not None and bool((bounds[0] >= 0).all()))
        else:
            keys.copy_(images)
        channels = images.shape[1]
        if keys.numel() == 0:
            return cls.empty(channels, kind)
        if bounds is not None:
            low, high = (_bound_keys(bound, kind, images.device) for bound in bounds)
        elif keep is None:
            low, high = keys.amin(dim=(0, 2)), keys.amax(dim=(0, 2))
        else:
            low = torch.where(keep, keys, _INT32_MAX).amin(dim=(0, 2))
            high = torch.where(keep, keys, -_INT32_MAX - 1).amax(dim=(0, 2))
        none = low > high  # a channel with no kept pixel
        low, high = torch.where(none, 0, low).long().cpu(), torch.where(none, 0, high).long().cpu()
        shift, first, length = _grid(0 if kind == "int" else FLOAT_SHIFT, low, high, channels)
        if shift:
            keys = keys.bitwise_right_shift_(shift)
        edge = int(outside == "drop")  # a bucket below and one above each channel's range, thrown away after
        width = length + 2 * edge
        start = torch.arange(channels, dtype=torch.int64) * width + edge
        if edge:  # each channel's buckets from 0, then a scalar clamp (a per-channel one is 4x slower)
            keys.sub_(first.to(torch.int32).to(keys.device)[:, None]).clamp_(-1, length)
            index = keys.add_(start.to(torch.int32).to(keys.device)[:, None])
        else:
            index = keys.add_((start - first).to(torch.int32).to(keys.device)[:, None])
        if keep is not None:
            index.masked_fill_(~keep, channels * width)
        counts = torch.bincount(index.view(-1), minlength=channels * width + 1)[: channels * width]
        counts = counts.view(channels, width)[:, edge : edge + length]
        return cls._of(kind, shift, first, counts.cpu() if counts.is_contiguous() else counts.contiguous().cpu())

    def drop(self, values: Sequence[float], *, in_place: bool = False) -> ValueCounts:
        """These counts without one value per channel (NaN: none), for ``ignore=`` on exact integer counts.

        ``in_place`` zeroes them in these counts (only for counts no one else holds yet) and returns them.
        """
        if not self.exact:
            raise ValueError("Only exact integer counts can drop a value after counting; mask the pixels instead.")
        counts = self.counts if in_place else self.counts.clone()
        value = torch.tensor([v if math.isfinite(v) and float(v).is_integer() else math.nan for v in values],
                             dtype=torch.float64)
        column = value - self.offset.double()
        rows = ((column >= 0) & (column < counts.shape[1])).nonzero().squeeze(1)
        if rows.numel():
            counts[rows, column[rows].long()] = 0
        return self if in_place else ValueCounts._of(self.kind, self.shift, self.offset, counts)

    def drop_pixels(self, values: Sequence[float], pixels: Tensor) -> ValueCounts:
        """These float counts, in place (counted just now: no one else holds them), without ``pixels[c]`` pixels
        of value ``values[c]`` per channel: those that counting with ``outside="drop"`` put in that value's bucket
        (none if it is NaN or outside the counted range). Exact integer counts use :meth:`drop`."""
        counts = self.counts
        keys = float_keys(torch.tensor(values, dtype=torch.float64)).tolist()
        for channel, (value, key, number) in enumerate(zip(values, keys, pixels.tolist())):
            if number == 0 or not math.isfinite(value):
                continue
            column = (key >> self.shift) - int(self.offset[channel])
            if 0 <= column < counts.shape[1]:
                counts[channel, column] -= int(number)
        return self

    # --- merging ---------------------------------------------------------------------------------------

    def merge(self, other: ValueCounts) -> ValueCounts:
        """The counts of both, added exactly on a common grid (pooled further only if it needs more than MAX_BINS)."""
        if other.kind != self.kind:
            raise ValueError(f"Cannot merge value counts of {other.kind} data into counts of {self.kind} data: "
                             "fit integer and float images separately.")
        if other.num_channels != self.num_channels:
            raise ValueError(f"Cannot merge value counts of {other.num_channels} channels into {self.num_channels}.")
        parts = [part for part in (self, other) if part.counts.shape[1] > 0]
        if len(parts) < 2:
            return parts[0] if parts else self
        shift = max(self.shift, other.shift)
        low = torch.minimum(*(p.offset >> (shift - p.shift) for p in parts))
        high = torch.maximum(*((p.offset + p.counts.shape[1] - 1) >> (shift - p.shift) for p in parts))
        shift, first, length = _grid(shift, low << shift, (high << shift) | ((1 << shift) - 1), self.num_channels)
        total = torch.zeros(self.num_channels, length, dtype=torch.int64)
        for part in parts:
            part._add_into(total, shift, first)
        return ValueCounts._of(self.kind, shift, first, total)

    def add_(self, other: ValueCounts) -> bool:
        """Add ``other`` into these counts in place if it fits their grid (same kind and shift, within each
        channel's range); False (nothing changed) if not. Only for counts no one else holds: an accumulator's own."""
        width = self.counts.shape[1]
        if (other.kind != self.kind or other.shift != self.shift or other.num_channels != self.num_channels
                or other.counts.shape[1] > width):
            return False
        start = other.offset - self.offset
        if bool((start < 0).any()) or bool((start + other.counts.shape[1] > width).any()):
            return False
        if other.counts.shape[1]:
            columns = torch.arange(other.counts.shape[1], dtype=torch.int64)
            self.counts.scatter_add_(1, columns + start[:, None], other.counts)
        object.__setattr__(self, "detail", None)  # a second pass saw the pixels before these only
        return True

    def copy(self) -> ValueCounts:
        """Counts of one's own (for :meth:`add_`)."""
        return ValueCounts._of(self.kind, self.shift, self.offset.clone(), self.counts.clone())

    def _add_into(self, total: Tensor, shift: int, first: Tensor) -> None:
        """Add these counts into ``total`` ``(C, L)``, a grid of ``shift`` whose channels start at ``first``."""
        columns = torch.arange(self.counts.shape[1], dtype=torch.int64)
        if shift == self.shift:  # the usual case: the same grid, shifted per channel
            total.scatter_add_(1, columns + (self.offset - first)[:, None], self.counts)
            return
        buckets = ((self.offset[:, None] + columns) >> (shift - self.shift)) - first[:, None]
        total.scatter_add_(1, buckets, self.counts)

    # --- reading -----------------------------------------------------------------------------------------

    def moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Float64 count, mean, M2, min and max per channel from exact counts (two passes over the values)."""
        if not self.exact:
            raise ValueError("Moments need exact counts per value.")
        columns = torch.arange(self.counts.shape[1], dtype=torch.float64)
        counts = self.counts.double()  # exact: counts below 2**53
        n = self.counts.sum(dim=1)
        safe = n.clamp_min(1).double()
        # Around each channel's first value: exact float64 sums of integers below 2**53 (|v - offset| < 2**32).
        mean = torch.mv(counts, columns) / safe
        deviation = columns - mean[:, None]
        weighted = counts * deviation
        m2 = torch.linalg.vecdot(weighted, deviation) - weighted.sum(dim=1).square() / safe
        mean = mean + self.offset.double()
        seen = self.counts > 0
        first = seen.int().argmax(dim=1)
        last = self.counts.shape[1] - 1 - seen.flip(1).int().argmax(dim=1)
        empty = n == 0
        low = torch.where(empty, math.inf, (self.offset + first).double())
        high = torch.where(empty, -math.inf, (self.offset + last).double())
        return n.double(), mean, m2.clamp_min(0), low, high

    def _counted_channels(self) -> Iterator[tuple[int, np.ndarray, int, np.ndarray]]:
        """``(channel, counts, pixels, cumulative counts)`` of each channel that counted any pixel."""
        for channel in range(self.num_channels):
            counts = self.counts[channel].numpy()
            n = int(counts.sum())
            if n:
                yield channel, counts, n, np.cumsum(counts)

    def percentiles(self, q: Sequence[float], low: Tensor, high: Tensor) -> Tensor:
        """``(len(q), C)`` float64 percentiles, ``numpy.percentile(..., method="linear")`` of the counted pixels.

        ``low`` and ``high`` are each channel's exact min and max (from :class:`ChannelStats`): the 0th and
        100th percentiles, and bounds for every estimate. A channel without pixels gets NaN.
        """
        out = np.full((len(q), self.num_channels), np.nan)
        for channel, counts, n, cumulative in self._counted_channels():
            bounds = float(low[channel]), float(high[channel])
            for row, percent in enumerate(q):
                below, above, t = _order_indices(n, percent)
                a = self._order_statistic(channel, below, n, counts, cumulative, bounds)
                b = self._order_statistic(channel, above, n, counts, cumulative, bounds)
                out[row, channel] = _lerp(a, b, t)
        return torch.from_numpy(out)

    def rank_error(self, q: Sequence[float]) -> Tensor:
        """``(len(q), C)``: how far, as a fraction of the channel's pixels, each percentile's rank can be off.

        0 for exact counts and for buckets a second pass counted per value (:meth:`refined`); for pooled
        counts, the share of the pixels in the bucket(s) a percentile falls in.
        """
        out = torch.zeros(len(q), self.num_channels, dtype=torch.float64)
        if self.exact:
            return out
        for channel, counts, n, cumulative in self._counted_channels():
            refined = set() if self.detail is None else set(self.detail[0][channel].tolist())
            for row, percent in enumerate(q):
                below, above, _ = _order_indices(n, percent)
                buckets = np.searchsorted(cumulative, [below, above], side="right")
                shares = [float(counts[b]) / n for b in buckets if int(self.offset[channel]) + int(b) not in refined]
                out[row, channel] = max(shares, default=0.0)
        return out

    # --- a second pass: the buckets of some percentiles counted per float32 key -----------------------------

    def windows(self, q: Sequence[float]) -> Tensor:
        """``(C, m)`` int64: the buckets the order statistics of percentiles ``q`` fall in, per channel (padded
        with a bucket no key falls in), for :meth:`count_windows` in a second pass over the same pixels."""
        chosen = {channel: sorted({int(self.offset[channel]) + int(b) for percent in q
                                   for b in np.searchsorted(cumulative, _order_indices(n, percent)[:2], side="right")})
                  for channel, _, n, cumulative in self._counted_channels()}
        out = torch.full((self.num_channels, max(map(len, chosen.values()), default=1)), _NO_BUCKET,
                         dtype=torch.int64)
        for channel, buckets in chosen.items():
            out[channel, : len(buckets)] = torch.tensor(buckets, dtype=torch.int64)
        return out

    @classmethod
    def count_windows(cls, images: Tensor, keep: Tensor | None, windows: Tensor, shift: int) -> ValueCounts:
        """Count each float32 key of ``images`` ``(N, C, P)`` (where ``keep``) that falls in one of its channel's
        ``windows`` (buckets of ``shift``): counts ``(C, m * 2**shift)``, kind ``"window"``."""
        channels, slots = windows.shape
        width = slots << shift  # the caller keeps channels * width within its budget (fit: MAX_BINS)
        keys = float_keys(images)
        bucket = keys >> shift
        targets = windows.clamp_max(_NO_BUCKET).to(torch.int32).to(keys.device)
        hit = bucket == targets[:, :1]
        for column in range(1, slots):
            hit |= bucket == targets[:, column : column + 1]
        if keep is not None:
            hit &= keep.expand(images.shape)
        # The few pixels in a window (a percentile's buckets), found once and then handled alone.
        where = hit.view(-1).nonzero().squeeze(1)
        chosen = keys.view(-1)[where]
        channel = (where // images.shape[2]) % channels
        slot = (bucket.view(-1)[where][:, None] == targets[channel]).to(torch.uint8).argmax(dim=1)
        index = (chosen & ((1 << shift) - 1)).long() + (slot << shift) + channel * width
        counts = torch.bincount(index, minlength=channels * width)
        return cls._of("window", 0, torch.zeros(channels, dtype=torch.int64), counts.view(channels, width).cpu())

    @classmethod
    def window_counts(cls, channels: int, windows: tuple[Tensor, int]) -> ValueCounts:
        """No pixels counted in ``windows`` (:meth:`count_windows` of an empty batch)."""
        width = windows[0].shape[1] << windows[1]
        return cls._of("window", 0, torch.zeros(channels, dtype=torch.int64),
                       torch.zeros(channels, width, dtype=torch.int64))

    def refined(self, windows: Tensor, counted: ValueCounts) -> ValueCounts:
        """These float counts with the per-key counts a second pass took of ``windows`` (:meth:`count_windows`).

        Raises ValueError if the second pass did not see the same pixels (a random augmentation, a stream that
        changed): its keys must add up to these counts, bucket by bucket.
        """
        width = 1 << self.shift
        for channel in range(self.num_channels):
            for slot, bucket in enumerate(windows[channel].tolist()):
                if bucket == _NO_BUCKET:
                    continue
                seen = int(counted.counts[channel, slot * width : (slot + 1) * width].sum())
                column = bucket - int(self.offset[channel])
                if seen != int(self.counts[channel, column]):
                    raise ValueError(f"The second pass counted {seen} pixels of channel {channel} in a range of "
                                     f"values where the first counted {int(self.counts[channel, column])}: the "
                                     "dataset did not give the same pixels twice (a random transform?).")
        return ValueCounts._of(self.kind, self.shift, self.offset, self.counts, (windows.clone(), counted.counts))

    def _detailed_key(self, channel: int, key: int, rank: int) -> int | None:
        """The float32 key of the ``rank``-th (0-based) pixel of bucket ``key``, if a second pass counted it."""
        if self.detail is None:
            return None
        buckets, keys = self.detail
        slots = (buckets[channel] == key).nonzero()
        if slots.numel() == 0:
            return None
        width = 1 << self.shift
        slot = int(slots[0])
        cumulative = np.cumsum(keys[channel, slot * width : (slot + 1) * width].numpy())
        return (key << self.shift) + int(np.searchsorted(cumulative, rank, side="right"))

    def _order_statistic(self, channel: int, j: int, n: int, counts: np.ndarray, cumulative: np.ndarray,
                         bounds: tuple[float, float]) -> float:
        """The ``j``-th smallest kept value of ``channel`` (0-based); interpolated in its bucket if pooled."""
        if j == 0:
            return bounds[0]
        if j == n - 1:
            return bounds[1]
        bucket = int(np.searchsorted(cumulative, j, side="right"))
        key = int(self.offset[channel]) + bucket
        if self.exact:
            return float(key)
        rank_in_bucket = j - (int(cumulative[bucket]) - int(counts[bucket]))
        exact = self._detailed_key(channel, key, rank_in_bucket)
        if exact is not None:
            return float(_keys_to_floats(np.array([exact]))[0])
        start, stop = key << self.shift, ((key + 1) << self.shift) - 1
        if self.kind == "float":
            edges = _keys_to_floats(np.array([start, stop]))
            start_value, stop_value = float(edges[0]), float(edges[1])
        else:
            start_value, stop_value = float(start), float(stop)
        estimate = start_value + (rank_in_bucket + 0.5) / int(counts[bucket]) * (stop_value - start_value)
        return min(max(estimate, bounds[0]), bounds[1])

    # --- storing -----------------------------------------------------------------------------------------

    def to_arrays(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(attrs, arrays)`` for a cache entry: attrs ``value_kind``, ``value_shift``; arrays ``value_offset``,
        ``value_counts``."""
        arrays = {"value_offset": self.offset.numpy(), "value_counts": self.counts.numpy()}
        if self.detail is not None:
            arrays.update(value_windows=self.detail[0].numpy(), value_window_counts=self.detail[1].numpy())
        return {"value_kind": self.kind, "value_shift": self.shift}, arrays

    @classmethod
    def from_arrays(cls, attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> ValueCounts | None:
        """The counts :meth:`to_arrays` stored, or None where an entry has none."""
        if "value_counts" not in arrays:
            return None
        offset = torch.from_numpy(np.asarray(arrays["value_offset"]))
        detail = None
        if "value_windows" in arrays:
            detail = (torch.from_numpy(np.asarray(arrays["value_windows"])),
                      torch.from_numpy(np.asarray(arrays["value_window_counts"])))
        return cls(str(attrs["value_kind"]), int(attrs["value_shift"]), offset,
                   torch.from_numpy(np.asarray(arrays["value_counts"])), detail)


def _bound_keys(bound: Tensor, kind: str, device: torch.device) -> Tensor:
    """The keys of per-channel min or max values (float64; +-inf where a channel kept nothing)."""
    finite = torch.isfinite(bound)
    if kind == "int":
        limits = torch.where(bound > 0, float(_INT32_MAX), float(-_INT32_MAX - 1))
        return torch.where(finite, bound, limits).to(device=device, dtype=torch.int32)
    return float_keys(bound.to(device))  # +inf min and -inf max (nothing kept) order as low > high; -0.0 as 0.0


def reuse(work: Tensor | None, numel: int, device: torch.device) -> Tensor:
    """``work`` if it holds ``numel`` int32 elements on ``device``, else a new buffer (a little larger)."""
    if work is None or work.device != device or work.numel() < numel:
        work = torch.empty(numel + numel // 8, dtype=torch.int32, device=device)
    return work


def _grid(shift: int, low: Tensor, high: Tensor, channels: int) -> tuple[int, Tensor, int]:
    """The finest ``shift`` (from ``shift`` up) at which keys ``low..high`` of every channel fit MAX_BINS counters;
    with each channel's first bucket and the common length."""
    while True:
        first = low >> shift
        length = max(1, int(((high >> shift) - first).max()) + 1)
        if channels * length <= MAX_BINS or shift >= 62:
            return shift, first, length
        shift += 1


def _order_indices(n: int, percent: float) -> tuple[int, int, float]:
    """numpy's 'linear' method: the two order statistics around ``(n - 1) * q`` and the weight of the second."""
    quantile = np.true_divide(np.float64(percent), 100)
    virtual = (n - 1) * quantile
    below = int(np.floor(virtual))
    above = min(below + 1, n - 1)
    return below, above, float(virtual - np.floor(virtual))


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's ``_lerp`` (the same float64 operations, so the same bits)."""
    a64, b64, t64 = np.float64(a), np.float64(b), np.float64(t)
    diff = b64 - a64
    if t64 >= 0.5:
        return float(b64 - diff * (1 - t64))
    return float(a64 + diff * t64)
