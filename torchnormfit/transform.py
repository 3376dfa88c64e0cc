"""FitNormalize: a torchvision v2 Normalize that learns its mean and std from a dataset."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as F

from . import cache as _cache
from . import statistics
from ._warn import warn
from .images import TO_FLOAT_FIX, validate_image
from .passes import Capture, StandardErrors
from .stats import ChannelStats

__all__ = ["FitNormalize", "NotFittedError", "DEFAULT_CACHE"]


class NotFittedError(ValueError):
    """A FitNormalize was used before it had statistics."""


class _DefaultCache:
    def __repr__(self) -> str:
        return "<default>"


DEFAULT_CACHE: Any = _DefaultCache()
"""The ``cache=`` default: the folder ``$TORCHNORMFIT_CACHE``, else ``$XDG_CACHE_HOME/torchnormfit``, else
``~/.cache/torchnormfit``, read at fit time."""


class FitNormalize(v2.Normalize):
    """Normalize with a per-channel mean and std fitted exactly on a dataset, cached in HDF5.

    With statistics (given, fitted or loaded from the cache) it is a
    ``v2.Normalize(mean, std, inplace)``: the same output bit for bit, the same
    kernel dispatch for every input type, in v1 and v2 pipelines, under
    ``torch.compile`` and ``torch.export``. Before that it raises
    :class:`NotFittedError`. During :meth:`fit` it measures the images that
    reach it instead of normalizing them.

    Parameters
    ----------
    mean, std : sequence of float, optional
        Known statistics, as for ``v2.Normalize`` (one value is broadcast to every
        channel); leave both out and call :meth:`fit`.
    inplace : bool
        Normalize in place, as in ``v2.Normalize``.
    cache : path, None or DEFAULT_CACHE
        The folder that keeps fitted statistics across runs, one HDF5 file per
        entry (created on the first save); ``None`` disables it. An existing
        file is one entry file (``torchnormfit export``), which a fit reads and
        verifies like any entry but never writes (see docs/cache-format.md).
    key : str, optional
        Cache entry name; by default a fingerprint of the dataset and the
        transforms before this one.

    Examples
    --------
    >>> from torchvision.datasets import FakeData
    >>> from torchvision.transforms import v2
    >>> norm = FitNormalize(cache=None)
    >>> ds = FakeData(size=8, image_size=(3, 8, 8),
    ...               transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm]))
    >>> norm.fit(ds, num_workers=0, progress=False).fit_record.source
    'pass'
    """

    _record: statistics.FitRecord | None = None  # class defaults: objects pickled by 0.1 lack these
    _capture: Capture | None = None

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        inplace: bool = False,
        *,
        cache: str | os.PathLike | None = DEFAULT_CACHE,
        key: str | None = None,
    ) -> None:
        Transform.__init__(self)
        if (mean is None) != (std is None):
            raise ValueError("Pass both mean and std, or neither and call .fit(dataset).")
        self.mean: list[float] | None = None if mean is None else list(mean)
        self.std: list[float] | None = None if std is None else list(std)
        self.inplace = inplace
        self._cache = cache
        self._key = _cache.check_key(key) if key is not None else None
        self._stats: ChannelStats | None = None
        self._num_samples = 0
        self._standard_errors: StandardErrors | None = None
        self._fitted_key: str | None = None

    # --- state -------------------------------------------------------------------------------

    @property
    def stats(self) -> ChannelStats | None:
        """The fitted :class:`ChannelStats` (float64 count, mean, var, std, min, max); None if not fitted."""
        return self._stats

    @property
    def standard_errors(self) -> StandardErrors | None:
        """After ``fit(max_samples=...)``: per-channel standard errors of ``mean`` and ``std`` (float64)."""
        return self._standard_errors

    @property
    def num_samples(self) -> int:
        """The number of images behind :attr:`stats` (0 when the statistics were given by hand)."""
        return self._num_samples

    @property
    def cache_key(self) -> str | None:
        """The cache entry this transform uses: ``key=``, else the fingerprint of the last ``fit()``."""
        return self._key if self._key is not None else self._fitted_key

    @property
    def fit_record(self) -> statistics.FitRecord | None:
        """How the last :meth:`fit` got its statistics: cache or pass, key, verification, write."""
        return self._record

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    def _use_stats(self, stats: ChannelStats, num_samples: int, errors: StandardErrors | None = None) -> None:
        """Take fitted statistics; a (near) constant channel gets std 1.0 (scikit-learn's policy), with a warning."""
        std = stats.std.clone()
        constant = _near_constant(stats)
        if bool(constant.any()):
            warn(
                f"Channel(s) {constant.nonzero().flatten().tolist()} have (near) zero variance: their std is set to "
                "1.0, so normalization only subtracts their mean (the policy of scikit-learn's StandardScaler).",
                UserWarning)
            std[constant] = 1.0
        self.mean, self.std = stats.mean.tolist(), std.tolist()
        self._stats, self._num_samples, self._standard_errors = stats, num_samples, errors

    def get_extra_state(self) -> dict[str, Any]:
        stats = None if self._stats is None else self._stats.to_dict()
        return {"mean": self.mean, "std": self.std, "stats": stats, "key": self._key, "num_samples": self._num_samples}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("stats") is not None:
            self._stats = ChannelStats.from_dict(state["stats"])
        if state.get("mean") is not None:
            self.mean, self.std = list(state["mean"]), list(state["std"])
        if state.get("key") is not None:
            self._key = state["key"]
        self._num_samples = int(state.get("num_samples", 0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """A ``v2.Normalize`` checkpoint has no extra state: load it as it is, keeping these statistics."""
        missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        missing_keys[missing:] = [k for k in missing_keys[missing:] if k != prefix + "_extra_state"]

    def _fingerprint_state(self) -> dict[str, Any]:
        """What a cache key sees of a FitNormalize in a pipeline: what it does to pixels, not where it caches."""
        return {"mean": self.mean, "std": self.std, "inplace": self.inplace}

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, inplace={self.inplace}"

    # --- transforming ------------------------------------------------------------------------

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        if any(isinstance(inpt, PIL.Image.Image) for inpt in flat_inputs):
            raise TypeError(f"{type(self).__name__}() does not support PIL images. {TO_FLOAT_FIX}")

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        image = isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)) or not isinstance(inpt, tv_tensors.TVTensor)
        if self._capture is not None:  # being fitted: hand the image over, change nothing
            return self._capture.offer(validate_image(inpt)) if image else inpt
        if self.mean is None:
            raise NotFittedError(
                f"This {type(self).__name__} has no statistics yet. Call .fit(dataset) first, "
                "or pass mean=[...] and std=[...]."
            )
        if image:
            self._check(validate_image(inpt))
        return self._call_kernel(F.normalize, inpt, mean=self.mean, std=self.std, inplace=self.inplace)

    def _check(self, image: Tensor) -> None:
        """What v2's kernel cannot know: fitted statistics are for one channel count; a std may underflow."""
        if self.mean is None or self.std is None:  # not fitted: __call__ said so
            return
        if self._stats is not None and image.shape[-3] != len(self.mean):
            raise ValueError(
                f"{type(self).__name__} has statistics for {len(self.mean)} channels, but the input has "
                f"{image.shape[-3]} (shape {tuple(image.shape)}). Convert the images to {len(self.mean)} channels "
                "or fit on images like these."
            )
        half_smallest = torch.finfo(image.dtype).smallest_normal * torch.finfo(image.dtype).eps / 2
        if any(s != 0 and abs(s) <= half_smallest for s in self.std):  # rounds to zero in the image's dtype
            raise ValueError(f"std evaluated to zero after conversion to {image.dtype}, leading to division by zero.")

    def __prepare_scriptable__(self) -> nn.Module:
        if self.mean is None:
            raise NotFittedError(f"This {type(self).__name__} has no statistics yet: fit it before scripting.")
        return super().__prepare_scriptable__()

    # --- fitting -----------------------------------------------------------------------------

    def fit(
        self,
        dataset: Dataset,
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        progress: bool | None = None,
        refit: bool = False,
        verify: int | None = None,
        image: Callable[[Any], Any] | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        process_group: Any = None,
        max_samples: int | None = None,
        seed: int = 0,
    ) -> FitNormalize:
        """Fit mean and std on ``dataset`` in one exact pass, or take them from the cache, verified.

        Parameters
        ----------
        dataset : Dataset
            A map-style dataset whose samples hold a float image ``(..., C, H, W)``.
            If this transform is in the dataset's own pipeline, what reaches it
            is measured (and the rest of the sample is not built).
        batch_size, num_workers : int, optional
            DataLoader settings. They change speed, never the result. Default:
            64 MiB of images per batch judged by the first sample, 1 to 256
            images, and at least 16 batches per worker; the usable CPUs, at most 8.
        progress : bool, optional
            tqdm progress bar; default on where stderr is a terminal.
        refit : bool
            Do the pass even if the cache has the statistics.
        verify : int, optional
            On a cache hit, read up to this many of the images the entry was
            fitted on again and check that they still match it (from 48 on, in
            two stages: the first half often decides); on a mismatch, warn, refit
            and replace the entry. Default: 64 for a fingerprint key, 0 for a
            ``key=`` given by hand; 0 never reads a sample (very slow sources).
        image : callable, optional
            ``sample -> image tensor`` when the image cannot be found in a sample
            the way v2 transforms find it.
        device : torch.device or str, optional
            Where to reduce the statistics; ``"cuda"`` moves the batches there.
        pin_memory : bool, optional
            DataLoader ``pin_memory``; default on for an accelerator.
        process_group : optional
            A ``torch.distributed`` group to fit across; by default the initialized
            default group, if any. Each rank reads its own shard; all ranks end
            with the same exact statistics; only rank 0 reads and writes the cache.
        max_samples, seed : int, optional
            Fit on a seeded uniform random subset of ``max_samples`` images instead
            of all; :attr:`standard_errors` then says how far each channel's mean
            and std can be from the full pass's (a jackknife over batches).

        Returns
        -------
        FitNormalize
            ``self``, fitted; :attr:`fit_record` says how.
        """
        self._fitted_key = None
        record = statistics.fit_dataset(
            dataset, self, self._capturing, cache_path=self._cache_path(), key=self._key, refit=refit, verify=verify,
            image=image, max_samples=max_samples, seed=seed, process_group=process_group, batch_size=batch_size,
            num_workers=num_workers, progress=progress, device=device, pin_memory=pin_memory,
        )
        self._use_stats(record.stats, record.num_samples, record.standard_errors)
        self._fitted_key, self._record = record.key, record
        return self

    def partial_fit(self, data: Tensor | Dataset, **fit_options: Any) -> FitNormalize:
        """Add a batch ``(..., C, H, W)`` or a dataset to the current statistics, exactly.

        Like scikit-learn's ``partial_fit``: ``fit(a)`` then ``partial_fit(b)`` equals
        one fit over ``a`` and ``b``. A dataset takes ``fit``'s options except
        ``refit`` and ``verify``. Nothing is read from or written to the cache;
        :meth:`save` writes.

        Examples
        --------
        >>> norm = FitNormalize(cache=None)
        >>> for batch in torch.rand(3, 8, 3, 4, 4).unbind(0):
        ...     _ = norm.partial_fit(batch)
        >>> norm.stats.count.tolist()
        [384.0, 384.0, 384.0]
        """
        if self._stats is None and self.mean is not None:
            raise ValueError(
                "This FitNormalize has mean/std given by hand, not statistics that can be extended. "
                "Start from fit(), partial_fit() or from_cache()."
            )
        if isinstance(data, Tensor):
            stats, num_samples = statistics.tensor_stats(data)
        else:
            stats, num_samples = statistics.pass_stats(data, self._capturing, **fit_options)
        merged = stats if self._stats is None else self._stats.merge(stats)
        self._use_stats(merged, self._num_samples + num_samples)
        return self

    def save(self, key: str | None = None) -> str:
        """Write the current statistics to this transform's cache under ``key`` (default: its own key).

        Use it after :meth:`partial_fit`, for example to extend an entry loaded with
        :meth:`from_cache`. Returns the key written.
        """
        if self._stats is None:
            raise NotFittedError("There are no fitted statistics to save. Call fit() or partial_fit() first.")
        key = key if key is not None else self._key
        path = self._cache_path()
        if key is None or path is None:
            raise ValueError(
                "save() needs a cache folder and a key: pass key= here or to FitNormalize(key=..., cache=...).")
        statistics.save_stats(path, _cache.check_key(key), self._stats, self._num_samples)
        return key

    @classmethod
    def from_cache(
        cls, path: str | os.PathLike | None = None, key: str | None = None, *, inplace: bool = False
    ) -> FitNormalize:
        """A FitNormalize with the statistics of entry ``key`` of cache folder ``path`` (None: the default
        folder), or of the entry file ``path`` (``torchnormfit export KEY -o stats.h5``; key optional).

        Raises :class:`~torchnormfit.CacheError` if the entry is missing or invalid.

        >>> norm = FitNormalize.from_cache("stats.h5")  # doctest: +SKIP
        """
        path = Path(path).expanduser() if path is not None else _cache.default_cache_dir()
        entry = statistics.load_entry(path, key)
        norm = cls(cache=path, key=entry.key, inplace=inplace)
        norm._use_stats(entry.stats, entry.num_samples, entry.standard_errors)
        return norm

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[Capture]:
        """Capture mode for one pass: images that reach this transform are handed over, not normalized."""
        self._capture = Capture()
        try:
            yield self._capture
        finally:
            self._capture = None

    def _cache_path(self) -> Path | None:
        if self._cache is None:
            return None
        return _cache.default_cache_dir() if isinstance(self._cache, _DefaultCache) else Path(self._cache).expanduser()

    # --- companions --------------------------------------------------------------------------

    def _per_channel(self) -> tuple[list[float], list[float]]:
        """Mean and std broadcast to one value per channel, as the kernel broadcasts them."""
        if self.mean is None:
            raise NotFittedError(f"This {type(self).__name__} has no statistics yet. Call .fit(dataset) first.")
        mean, std = torch.broadcast_tensors(torch.tensor(self.mean, dtype=torch.float64),
                                            torch.tensor(self.std, dtype=torch.float64))
        return mean.tolist(), std.tolist()

    def to_normalize(self) -> v2.Normalize:
        """A plain ``v2.Normalize`` with the same statistics."""
        self._per_channel()
        return v2.Normalize(mean=self.mean, std=self.std, inplace=self.inplace)

    def inverse(self) -> v2.Normalize:
        """A ``v2.Normalize`` that undoes this one (``x * std + mean``), for looking at images."""
        mean, std = self._per_channel()
        return v2.Normalize(mean=[-m / s for m, s in zip(mean, std)], std=[1.0 / s for s in std])

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """A frozen ``BatchNorm2d(C, affine=False)`` that normalizes with these statistics.

        It stays in eval mode even when its model is put in train mode, so it can
        serve as a network's input layer.
        """
        mean, std = self._per_channel()
        bn = _FrozenBatchNorm2d(len(mean), eps=0.0, momentum=0.0, affine=False)
        assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats=True
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor(mean))
            bn.running_var.copy_(torch.tensor(std, dtype=torch.float64).square())
        return bn.eval()


NEAR_CONSTANT_RTOL = 1e-6
"""A channel whose std is at most this times its largest absolute pixel value counts as constant."""


def _near_constant(stats: ChannelStats) -> Tensor:
    """Channels with no usable spread: below float32 resolution of their values, or exactly constant."""
    magnitude = torch.maximum(stats.min.abs(), stats.max.abs())
    return stats.constant_channels() | (stats.std <= NEAR_CONSTANT_RTOL * magnitude)


class _FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that ignores ``train()``: its running statistics are the data's, fixed."""

    def train(self, mode: bool = True) -> _FrozenBatchNorm2d:
        return super().train(False)
