"""FitNormalize: a torchvision v2 Normalize that learns its mean and std from a dataset."""

from __future__ import annotations

import datetime
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._transform import Transform

from . import cache as _cache
from .fingerprint import describe_dataset, describe_pipeline, fingerprint
from .distributed import current_ranks, on_root
from .fitting import TO_FLOAT_FIX, Capture, check_image, fit_stats, tensor_stats
from .sampling import StandardErrors, fit_subset
from .stats import ChannelStats

__all__ = ["FitNormalize", "NotFittedError", "DEFAULT_CACHE"]

logger = logging.getLogger("torchnormfit")


class NotFittedError(ValueError):
    """A FitNormalize was used before it had statistics."""


class _DefaultCache:
    def __repr__(self) -> str:
        return "<default>"


DEFAULT_CACHE: Any = _DefaultCache()
"""The ``cache=`` default: ``$TORCHNORMFIT_CACHE`` or ``$XDG_CACHE_HOME/torchnormfit/stats.h5``, read at fit time."""


class FitNormalize(v2.Normalize):
    """Normalize with a per-channel mean and std fitted exactly on a dataset, cached in HDF5.

    Once it has statistics (given, fitted or loaded from the cache) it behaves
    exactly like ``v2.Normalize(mean, std)``: same output bit for bit, same
    tv_tensors handling, usable in v1 and v2 ``Compose``. Before that it raises
    :class:`NotFittedError`.

    Parameters
    ----------
    mean, std : sequence of float, optional
        Known statistics; leave both out and call :meth:`fit`.
    cache : path, None or DEFAULT_CACHE
        HDF5 file that keeps fitted statistics across runs; ``None`` disables it.
    key : str, optional
        Cache entry name; by default a fingerprint of the dataset and the
        transforms before this one.
    inplace : bool
        Normalize in place, as in ``v2.Normalize``.

    Examples
    --------
    >>> from torchvision.datasets import FakeData
    >>> from torchvision.transforms import v2
    >>> norm = FitNormalize(cache=None)
    >>> ds = FakeData(size=8, image_size=(3, 8, 8),
    ...               transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm]))
    >>> norm.fit(ds, num_workers=0, progress=False).mean is not None
    True
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        cache: str | os.PathLike | None = DEFAULT_CACHE,
        key: str | None = None,
        inplace: bool = False,
    ) -> None:
        Transform.__init__(self)
        if (mean is None) != (std is None):
            raise ValueError("Pass both mean and std, or neither and call .fit(dataset).")
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.inplace = inplace
        self._cache = cache
        self._key = _cache.check_key(key) if key is not None else None
        self._stats: ChannelStats | None = None
        self._capture: Capture | None = None
        self._num_samples = 0
        self._standard_errors: StandardErrors | None = None
        self._fitted_key: str | None = None
        self._std_checked: set[tuple[torch.dtype, tuple[float, ...]]] = set()
        if mean is not None:
            self._set_mean_std(list(map(float, mean)), list(map(float, std)))

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
    def is_fitted(self) -> bool:
        return self.mean is not None

    def _set_mean_std(self, mean: list[float], std: list[float]) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one value per channel. Got {len(mean)} means and {len(std)} stds.")
        self.mean, self.std = mean, std

    def _use_stats(self, stats: ChannelStats) -> None:
        """Take fitted statistics; a (near) constant channel gets std 1.0 (scikit-learn's policy), with a warning."""
        std = stats.std.clone()
        constant = _near_constant(stats)
        if bool(constant.any()):
            channels = constant.nonzero().flatten().tolist()
            warnings.warn(
                f"Channel(s) {channels} have (near) zero variance: their std is set to 1.0, so normalization "
                "only subtracts their mean (the policy of scikit-learn's StandardScaler).",
                UserWarning,
                stacklevel=3,
            )
            std[constant] = 1.0
        self._set_mean_std(stats.mean.tolist(), std.tolist())
        self._stats = stats

    def _use_entry(self, entry: _cache.CacheEntry) -> None:
        self._use_stats(entry.stats)
        self._num_samples = int(entry.attrs.get("num_samples", 0))
        if "mean_se" in entry.attrs and "std_se" in entry.attrs:
            self._standard_errors = StandardErrors(
                torch.tensor(entry.attrs["mean_se"], dtype=torch.float64),
                torch.tensor(entry.attrs["std_se"], dtype=torch.float64),
            )

    def get_extra_state(self) -> dict[str, Any]:
        stats = None if self._stats is None else self._stats.to_dict()
        return {"mean": self.mean, "std": self.std, "stats": stats, "key": self._key, "num_samples": self._num_samples}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("stats") is not None:
            self._stats = ChannelStats.from_dict(state["stats"])
        if state.get("mean") is not None:
            self._set_mean_std(list(state["mean"]), list(state["std"]))
        if state.get("key") is not None:
            self._key = state["key"]
        self._num_samples = int(state.get("num_samples", 0))

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, inplace={self.inplace}"

    # --- transforming ------------------------------------------------------------------------

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        if any(isinstance(inpt, PIL.Image.Image) for inpt in flat_inputs):
            raise TypeError(f"{type(self).__name__}() does not support PIL images. {TO_FLOAT_FIX}")

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)) and isinstance(inpt, tv_tensors.TVTensor):
            return inpt  # boxes, masks, keypoints pass through, as in v2.Normalize
        if self._capture is not None:  # being fitted: measure, do not change
            self._capture.offer(check_image(inpt))
            return inpt
        self._require_fitted()
        check_image(inpt)
        if inpt.shape[-3] != len(self.mean):
            raise ValueError(
                f"{type(self).__name__} has statistics for {len(self.mean)} channels, but the input has "
                f"{inpt.shape[-3]} (shape {tuple(inpt.shape)}). Convert the images to {len(self.mean)} channels "
                "or fit on images like these."
            )
        self._check_std_in(inpt.dtype)
        return self._call_kernel(F.normalize, inpt, mean=self.mean, std=self.std, inplace=self.inplace)

    def _check_std_in(self, dtype: torch.dtype) -> None:
        """Raise, as v1 Normalize does, if a std rounds to zero in ``dtype`` (checked once per std and dtype)."""
        checked = (dtype, tuple(self.std))
        if checked in self._std_checked:
            return
        if bool((torch.as_tensor(self.std, dtype=dtype) == 0).any()):
            raise ValueError(f"std evaluated to zero after conversion to {dtype}, leading to division by zero.")
        self._std_checked.add(checked)

    def __prepare_scriptable__(self) -> nn.Module:
        self._require_fitted()
        return super().__prepare_scriptable__()

    def _require_fitted(self) -> None:
        if self.mean is None:
            raise NotFittedError(
                f"This {type(self).__name__} has no statistics yet. Call .fit(dataset) first, "
                "or pass mean=[...] and std=[...]."
            )

    # --- fitting -----------------------------------------------------------------------------

    def fit(
        self,
        dataset: Dataset,
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        progress: bool | None = None,
        refit: bool = False,
        image: Callable[[Any], Any] | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        process_group: Any = None,
        max_samples: int | None = None,
        seed: int = 0,
    ) -> FitNormalize:
        """Fit mean and std on ``dataset`` in one exact pass, or load them from the cache.

        Parameters
        ----------
        dataset : Dataset
            A map-style dataset whose samples hold a float image ``(..., C, H, W)``.
            If this transform is in the dataset's own pipeline it passes images
            through during the pass, and what reaches it is measured.
        batch_size, num_workers : int, optional
            DataLoader settings. They change speed, never the result. Default:
            64 MiB of images per batch judged by the first sample, 1 to 256
            images, and at least 16 batches per worker; the usable CPUs, at most 8.
        progress : bool, optional
            tqdm progress bar; default on where stderr is a terminal.
        refit : bool
            Do the pass even if the cache has the statistics.
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
            ``self``, fitted.
        """
        settings = {"image": _callable_name(image), "ddof": 0, "statistic": "per-channel population mean/std"}
        if max_samples is not None:
            settings.update(max_samples=max_samples, seed=seed)
        key = self._key or fingerprint(dataset, self, settings)
        self._fitted_key = None
        path = self._cache_path()
        ranks = current_ranks(process_group)
        if path is not None and not refit:
            entry = on_root(ranks, lambda: self._lookup(path, key))
            if entry is not None:
                logger.info("cache hit: %r in %s", key, path)
                self._use_entry(entry)
                self._fitted_key = key
                return self
        stats, num_samples, errors = self._pass(
            dataset, batch_size=batch_size, num_workers=num_workers, progress=progress, image=image,
            device=device, pin_memory=pin_memory, process_group=process_group, max_samples=max_samples, seed=seed,
        )
        self._use_stats(stats)
        self._num_samples, self._standard_errors, self._fitted_key = num_samples, errors, key
        if path is not None:
            attrs = {**_provenance(dataset, self, num_samples), **_subset_provenance(dataset, max_samples, seed, errors)}
            on_root(ranks, lambda: self._save(path, key, stats, attrs))
        return self

    def partial_fit(self, data: Tensor | Dataset, **fit_options: Any) -> FitNormalize:
        """Add a batch ``(..., C, H, W)`` or a dataset to the current statistics, exactly.

        Like scikit-learn's ``partial_fit``: ``fit(a)`` then ``partial_fit(b)`` equals
        one fit over ``a`` and ``b``. A dataset takes ``fit``'s options except
        ``refit``. Nothing is read from or written to the cache; :meth:`save` writes.

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
            stats, num_samples = tensor_stats(data)
        else:
            stats, num_samples, _ = self._pass(data, **fit_options)
        self._use_stats(stats if self._stats is None else self._stats.merge(stats))
        self._num_samples += num_samples
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
            raise ValueError("save() needs a cache file and a key: pass key= here or to FitNormalize(key=..., cache=...).")
        attrs = _provenance(None, self, self._num_samples)
        _cache.write_entry(path, key, self._stats, attrs)
        return key

    def _pass(
        self, dataset: Dataset, max_samples: int | None = None, seed: int = 0, **options: Any
    ) -> tuple[ChannelStats, int, StandardErrors | None]:
        """One pass with this transform in pass-through mode; it is left unchanged if the pass fails."""
        self._capture = Capture()
        try:
            if max_samples is None:
                return (*fit_stats(dataset, capture=self._capture, **options), None)
            if current_ranks(options.get("process_group")) is not None:
                raise ValueError("max_samples is not supported across a process group: fit the subset on one rank.")
            return fit_subset(dataset, max_samples, seed, capture=self._capture, **options)
        finally:
            self._capture = None

    @classmethod
    def from_cache(cls, path: str | os.PathLike | None, key: str, *, inplace: bool = False) -> FitNormalize:
        """A FitNormalize with the statistics of entry ``key`` in cache file ``path`` (None: the default file).

        Raises :class:`~torchnormfit.CacheError` if the entry is missing or invalid.
        """
        path = Path(path) if path is not None else _cache.default_cache_path()
        entry = _cache.read_entry(path, key)
        if entry is None:
            there = path.is_file() or _cache.entry_folder(path).is_dir()
            known = [e.key for e in _cache.list_entries(path)] if there else []
            raise _cache.CacheError(f"No cache entry {key!r} in {path}. Entries there: {known}.")
        norm = cls(cache=path, key=key, inplace=inplace)
        norm._use_entry(entry)
        return norm

    def _cache_path(self) -> Path | None:
        if self._cache is None:
            return None
        path = _cache.default_cache_path() if isinstance(self._cache, _DefaultCache) else Path(self._cache).expanduser()
        if path.is_dir():
            warnings.warn(
                f"The cache path {path} is a directory: statistics are neither read from nor saved to it. "
                f"Give a file path such as {path / 'stats.h5'}.",
                _cache.CacheWarning,
                stacklevel=3,
            )
            return None
        return path

    def _lookup(self, path: Path, key: str) -> _cache.CacheEntry | None:
        try:
            return _cache.read_entry(path, key)
        except _cache.CacheError as error:
            warnings.warn(f"{error} Not using it; fitting again.", _cache.CacheWarning, stacklevel=3)
            return None

    def _save(self, path: Path, key: str, stats: ChannelStats, attrs: dict[str, Any]) -> None:
        try:
            _cache.write_entry(path, key, stats, attrs)
        except (OSError, _cache.CacheError) as error:
            warnings.warn(
                f"The statistics were fitted but not saved to the cache {path}: {error}",
                _cache.CacheWarning,
                stacklevel=3,
            )
        else:
            logger.info("cached %r in %s", key, path)

    # --- companions --------------------------------------------------------------------------

    def to_normalize(self) -> v2.Normalize:
        """A plain ``v2.Normalize`` with the same statistics."""
        self._require_fitted()
        return v2.Normalize(mean=self.mean, std=self.std, inplace=self.inplace)

    def inverse(self) -> v2.Normalize:
        """A ``v2.Normalize`` that undoes this one (``x * std + mean``), for looking at images."""
        self._require_fitted()
        return v2.Normalize(mean=[-m / s for m, s in zip(self.mean, self.std)], std=[1.0 / s for s in self.std])

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """A frozen ``BatchNorm2d(C, affine=False)`` that normalizes with these statistics.

        It stays in eval mode even when its model is put in train mode, so it can
        serve as a network's input layer.
        """
        self._require_fitted()
        bn = _FrozenBatchNorm2d(len(self.mean), eps=0.0, momentum=0.0, affine=False)
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor(self.mean))
            bn.running_var.copy_(torch.tensor(self.std, dtype=torch.float64).square())
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


def _callable_name(function: Callable[..., Any] | None) -> str | None:
    if function is None:
        return None
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__qualname__)}"


def _provenance(dataset: Dataset | None, norm: FitNormalize, num_samples: int) -> dict[str, Any]:
    from . import __version__

    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "torchnormfit_version": __version__,
        "dataset": "partial_fit" if dataset is None else json.dumps(describe_dataset(dataset), sort_keys=True, default=str),
        "pipeline": "" if dataset is None else describe_pipeline(dataset, norm),
        "num_samples": num_samples,
        "ddof": 0,
    }


def _subset_provenance(
    dataset: Dataset, max_samples: int | None, seed: int, errors: StandardErrors | None
) -> dict[str, Any]:
    if max_samples is None or errors is None:
        return {}
    return {
        "max_samples": max_samples,
        "seed": seed,
        "population": len(dataset),
        "mean_se": errors.mean.tolist(),
        "std_se": errors.std.tolist(),
    }
