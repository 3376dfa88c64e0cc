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
from .images import TO_FLOAT_FIX, MaskSource, find_mask, layout, validate_image
from .passes import Capture, Reduction, StandardErrors
from .reduce import Ignore, tensor_stats
from .stats import ChannelStats

__all__ = ["DEFAULT_CACHE", "FitNormalize", "NotFittedError"]


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
    ignore : float, sequence of float or NaN, optional
        A nodata value (one for every channel, or one per channel; ``float("nan")``
        for NaN pixels): such pixels are left out of the statistics, and each
        channel's count says how many it kept. In the output they become 0 (the
        mean, after normalization), so a network never reads nodata as data; NaN
        pixels stay NaN (NaN in, NaN out, as in ``v2.Normalize``).
    clip : (float, float), optional
        Percentiles, e.g. ``(0.5, 99.5)``: learned per channel in the same pass
        (exactly ``numpy.percentile(..., method="linear")`` for integer images)
        and the output is ``(clamp(x, low, high) - mean) / std``, with mean and
        std of the kept pixels before clipping (nnU-Net's CT rule).
    exact_percentiles : bool, optional
        Float images only. None: each ``clip`` percentile within 0.1% of the
        pixels in rank; where one pass cannot promise that (values in few
        narrow ranges, as in images decoded from 8-bit files), a second pass
        makes it exact. True: always exact (numpy's over the kept float32
        values), with a second pass. False: one pass; each percentile within
        ``2**-11`` of its value, its rank error stated by
        ``stats.values.rank_error(q)``.
    spatial_dims : int
        2 for images ``(..., C, H, W)``; 3 for volumes ``(..., C, D, H, W)``:
        statistics per channel over every voxel, and the transform normalizes
        volumes.

    Notes
    -----
    Integer images (uint8, int8, int16, uint16, int32) are fitted in their own
    units, exactly. A FitNormalize fitted on them normalizes integer tensors too,
    to float32; with statistics given by hand or fitted on float images, integer
    input raises as in ``v2.Normalize``, since its units would be ambiguous.

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
        ignore: Ignore = None,
        clip: tuple[float, float] | None = None,
        exact_percentiles: bool | None = None,
        spatial_dims: int = 2,
    ) -> None:
        Transform.__init__(self)
        if (mean is None) != (std is None):
            raise ValueError("Pass both mean and std, or neither and call .fit(dataset).")
        self.ignore: list[float] | float | None = _checked_ignore(ignore)
        self.clip: tuple[float, float] | None = _checked_clip(clip)
        if exact_percentiles is not None and clip is None:
            raise ValueError("exact_percentiles= is about the percentiles of clip=: pass clip=(low, high) too.")
        self.exact_percentiles = None if exact_percentiles is None else bool(exact_percentiles)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (images (..., C, H, W)) or 3 (volumes (..., C, D, H, W)). "
                             f"Got {spatial_dims!r}.")
        self.spatial_dims = spatial_dims
        if clip is not None and mean is not None:
            raise ValueError("clip= learns its percentiles by fitting: leave mean and std out and call .fit(dataset).")
        self.clip_low: list[float] | None = None
        self.clip_high: list[float] | None = None
        self.integer_input = False
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

    def _use_stats(self, stats: ChannelStats, num_samples: int, errors: StandardErrors | None = None,
                   integer: bool | None = None) -> None:
        """Take fitted statistics; a (near) constant channel gets std 1.0 (scikit-learn's policy), with a warning.

        With ``clip``, the percentiles come from ``stats.values``; ``integer`` says the images were integers
        (None: as the value counts say, else float).
        """
        if integer is None:
            integer = stats.values is not None and stats.values.kind == "int"
        if self.clip is not None:
            if stats.values is None:
                raise ValueError("clip= needs statistics fitted with value counts: fit(), partial_fit() or "
                                 "from_cache() of an entry fitted with clip=.")
            low, high = stats.percentiles(self.clip)
            self.clip_low, self.clip_high = low.tolist(), high.tolist()
        self.integer_input = integer
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
        state: dict[str, Any] = {"mean": self.mean, "std": self.std, "stats": stats, "key": self._key,
                                 "num_samples": self._num_samples}
        if not self._is_plain():  # a plain one's state stays what 0.1 wrote
            state.update(ignore=self.ignore, clip=self.clip, clip_low=self.clip_low, clip_high=self.clip_high,
                         spatial_dims=self.spatial_dims, integer_input=self.integer_input,
                         exact_percentiles=self.exact_percentiles)
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("stats") is not None:
            self._stats = ChannelStats.from_dict(state["stats"])
        if state.get("mean") is not None:
            self.mean, self.std = list(state["mean"]), list(state["std"])
        if state.get("key") is not None:
            self._key = state["key"]
        self._num_samples = int(state.get("num_samples", 0))
        for name in ("ignore", "clip", "clip_low", "clip_high", "spatial_dims", "integer_input", "exact_percentiles"):
            if name in state:
                setattr(self, name, state[name])

    def _is_plain(self) -> bool:
        """Whether this is a v2.Normalize with fitted numbers: no ignore, clip, volumes or integer units."""
        return self.ignore is None and self.clip is None and self.spatial_dims == 2 and not self.integer_input

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """A ``v2.Normalize`` checkpoint has no extra state: load it as it is, keeping these statistics."""
        missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        missing_keys[missing:] = [k for k in missing_keys[missing:] if k != prefix + "_extra_state"]

    def _fingerprint_state(self) -> dict[str, Any]:
        """What a cache key sees of a FitNormalize in a pipeline: what it does to pixels, not where it caches."""
        state: dict[str, Any] = {"mean": self.mean, "std": self.std, "inplace": self.inplace}
        if not self._is_plain():
            state.update(ignore=self.ignore, clip=self.clip, clip_low=self.clip_low, clip_high=self.clip_high,
                         spatial_dims=self.spatial_dims)
        return state

    def extra_repr(self) -> str:
        options = "".join(f", {name}={getattr(self, name)}" for name, default in
                          (("ignore", None), ("clip", None), ("exact_percentiles", None), ("spatial_dims", 2))
                          if getattr(self, name) != default)
        return f"mean={self.mean}, std={self.std}, inplace={self.inplace}{options}"

    # Instances pickled before these options existed lack them: the class defaults keep them plain.
    ignore: list[float] | float | None = None
    clip: tuple[float, float] | None = None
    exact_percentiles: bool | None = None
    clip_low: list[float] | None = None
    clip_high: list[float] | None = None
    spatial_dims: int = 2
    integer_input: bool = False

    # --- transforming ------------------------------------------------------------------------

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        if any(isinstance(inpt, PIL.Image.Image) for inpt in flat_inputs):
            raise TypeError(f"{type(self).__name__}() does not support PIL images. {TO_FLOAT_FIX}")

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        image = isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)) or not isinstance(inpt, tv_tensors.TVTensor)
        if self._capture is not None:  # being fitted: hand the image over, change nothing
            if not image:
                return inpt
            return self._capture.offer(validate_image(inpt, integer=True, spatial_dims=self.spatial_dims))
        if self.mean is None:
            raise NotFittedError(
                f"This {type(self).__name__} has no statistics yet. Call .fit(dataset) first, "
                "or pass mean=[...] and std=[...]."
            )
        if not self._is_plain():
            return self._transform_options(inpt) if image else inpt
        if image:
            self._check(validate_image(inpt))
        return self._call_kernel(F.normalize, inpt, mean=self.mean, std=self.std, inplace=self.inplace)

    def _transform_options(self, inpt: Tensor) -> Tensor:
        """The image through :func:`normalize_fitted`: clip, ignore, volumes, integer units; tv_tensor kept."""
        image = validate_image(inpt, integer=self.integer_input, spatial_dims=self.spatial_dims)
        if not image.is_floating_point() and not self.integer_input:  # only a plain tensor gets here
            raise TypeError(f"Input tensor should be a float tensor. Got {image.dtype}.")
        self._check(image)
        wrapped = isinstance(inpt, tv_tensors.TVTensor)
        assert self.mean is not None and self.std is not None  # transform() checked
        out = normalize_fitted(image.as_subclass(Tensor) if wrapped else image, self.mean, self.std, low=self.clip_low,
                               high=self.clip_high, ignore=self.ignore, spatial_dims=self.spatial_dims,
                               inplace=self.inplace)
        return tv_tensors.wrap(out, like=inpt) if wrapped else out

    def _check(self, image: Tensor) -> None:
        """What v2's kernel cannot know: fitted statistics are for one channel count; a std may underflow."""
        if self.mean is None or self.std is None:  # not fitted: __call__ said so
            return
        channels = image.shape[-self.spatial_dims - 1]
        if self._stats is not None and channels != len(self.mean):
            raise ValueError(
                f"{type(self).__name__} has statistics for {len(self.mean)} channels, but the input has "
                f"{channels} (shape {tuple(image.shape)}, {layout(self.spatial_dims)}). Convert the images to "
                f"{len(self.mean)} channels or fit on images like these."
            )
        dtype = image.dtype if image.is_floating_point() else torch.float32
        half_smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
        if any(s != 0 and abs(s) <= half_smallest for s in self.std):  # rounds to zero in the image's dtype
            raise ValueError(f"std evaluated to zero after conversion to {dtype}, leading to division by zero.")

    def __prepare_scriptable__(self) -> nn.Module:
        if self.mean is None:
            raise NotFittedError(f"This {type(self).__name__} has no statistics yet: fit it before scripting.")
        if not self._is_plain():
            raise RuntimeError(f"A {type(self).__name__} with ignore=, clip=, spatial_dims=3 or integer input cannot "
                               "be JIT scripted (it scripts as v1 Normalize): use torch.compile or torch.export.")
        return self._v1_transform_cls(mean=self.mean, std=self.std, inplace=self.inplace)

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
        mask: MaskSource = None,
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
            the way v2 transforms find it (a dictionary's ``"image"``, else the
            first ``tv_tensors.Image``, else the first plain tensor).
        mask : callable, tv_tensors.Mask or str, optional
            Statistics of the pixels where the sample's mask is nonzero (nnU-Net's
            foreground): ``sample -> mask`` (shaped like the image's pixels, one
            channel), ``tv_tensors.Mask`` (the sample's Mask), or a key of a
            dictionary sample (torchgeo's ``"mask"``). When this transform sits in
            the dataset's pipeline, the mask is looked for in what reaches it (so it
            went through the same crops and flips as the image).
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
            reduction=self._reduction(mask),
        )
        self._use_stats(record.stats, record.num_samples, record.standard_errors, integer=record.integer)
        self._fitted_key, self._record = record.key, record
        return self

    def partial_fit(self, data: Tensor | Dataset, mask: Any = None, **fit_options: Any) -> FitNormalize:
        """Add a batch ``(..., C, H, W)`` (with ``mask`` ``(..., 1 or C, H, W)``, optional) or a dataset to the
        current statistics, exactly.

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
            images = validate_image(data, integer=True, spatial_dims=self.spatial_dims).as_subclass(Tensor)
            integer = not images.is_floating_point()
            stats, num_samples = tensor_stats(images, ignore=self.ignore, mask=mask, spatial_dims=self.spatial_dims,
                                              values=self.clip is not None)
        else:
            stats, num_samples, integer = statistics.pass_stats(data, self._capturing, self._reduction(mask),
                                                                **fit_options)
        if self._stats is not None and self._num_samples and integer != self.integer_input:
            units = {True: "integer", False: "float"}
            raise ValueError(f"This FitNormalize was fitted on {units[self.integer_input]} images; these are "
                             f"{units[integer]}. Fit integer and float images separately (their units differ).")
        merged = stats if self._stats is None else self._stats.merge(stats)
        if self.exact_percentiles and merged.values is not None and merged.values.kind == "float" \
                and merged.values.detail is None:
            warn("partial_fit() adds one pass's value counts, so the clip= percentiles of float images are not made "
                 "exact (that needs a second pass over all the data): they are within 2**-11 of their value, with the "
                 "rank error stats.values.rank_error(q) states. fit() on the whole dataset makes them exact.",
                 UserWarning)
        self._use_stats(merged, self._num_samples + num_samples, integer=integer)
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
        statistics.save_stats(path, _cache.check_key(key), self._stats, self._num_samples, self.integer_input)
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
        norm._use_stats(entry.stats, entry.num_samples, entry.standard_errors, integer=entry.integer)
        return norm

    def _reduction(self, mask: MaskSource = None) -> Reduction:
        """What a pass of this transform leaves out and keeps (see :class:`~torchnormfit.reduce.Reduction`)."""
        ignore = tuple(self.ignore) if isinstance(self.ignore, list) else self.ignore
        return Reduction(ignore=ignore, values=self.clip is not None, spatial_dims=self.spatial_dims, mask=mask,
                         percentiles=self.clip or (), exact=self.exact_percentiles)

    def forward(self, *inputs: Any) -> Any:
        capture = self._capture
        if capture is not None:  # being fitted
            sample = inputs if len(inputs) > 1 else inputs[0]
            if capture.mask_source is not None:  # fit(mask=...): the mask beside the image
                capture.mask = find_mask(sample, capture.mask_source)
            if isinstance(sample, Tensor):  # an image alone: hand it over without v2's walk of the sample
                return self.transform(sample, {})
        return super().forward(*inputs)

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

    def _plain_companion(self, what: str) -> None:
        if not self._is_plain():
            raise ValueError(f"{what} cannot carry ignore=, clip=, spatial_dims=3 or integer input: "
                             f"use this {type(self).__name__} itself.")

    def to_normalize(self) -> v2.Normalize:
        """A plain ``v2.Normalize`` with the same statistics."""
        self._plain_companion("A v2.Normalize")
        self._per_channel()
        return v2.Normalize(mean=self.mean, std=self.std, inplace=self.inplace)

    def inverse(self) -> v2.Normalize:
        """A ``v2.Normalize`` that undoes this one (``x * std + mean``), for looking at images.

        Clipped values stay clipped; ignored pixels come back as the mean.
        """
        if self.spatial_dims != 2:
            raise ValueError("inverse() is a v2.Normalize, for images (..., C, H, W): not for volumes.")
        mean, std = self._per_channel()
        return v2.Normalize(mean=[-m / s for m, s in zip(mean, std)], std=[1.0 / s for s in std])

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """A frozen ``BatchNorm2d(C, affine=False)`` that normalizes with these statistics.

        It stays in eval mode even when its model is put in train mode, so it can
        serve as a network's input layer.
        """
        self._plain_companion("A BatchNorm2d")
        mean, std = self._per_channel()
        bn = _FrozenBatchNorm2d(len(mean), eps=0.0, momentum=0.0, affine=False)
        assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats=True
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor(mean))
            bn.running_var.copy_(torch.tensor(std, dtype=torch.float64).square())
        return bn.eval()


def normalize_fitted(
    image: Tensor,
    mean: list[float],
    std: list[float],
    *,
    low: list[float] | None = None,
    high: list[float] | None = None,
    ignore: list[float] | float | None = None,
    spatial_dims: int = 2,
    inplace: bool = False,
) -> Tensor:
    """``(clamp(x, low, high) - mean) / std`` per channel of ``(..., C, *spatial)``: FitNormalize's kernel for
    its options.

    Integer images come out as float32 (never in place). Pixels equal to their channel's ``ignore`` value
    become 0; NaN pixels stay NaN.
    """
    source = image
    if not image.is_floating_point():
        image = image.to(torch.float32)
    elif not inplace:
        image = image.clone()
    shape = (-1,) + (1,) * spatial_dims
    dropped = None
    if ignore is not None:
        # In the images' own float dtype, as the fit compared them (ignore=0.3 is float32(0.3) for float32 images).
        dtype = source.dtype if source.is_floating_point() else torch.float64
        values = torch.as_tensor(ignore, dtype=torch.float64, device=image.device).to(dtype)
        values = values.view(shape if isinstance(ignore, list) else ())
        dropped = source == values
    if low is not None and high is not None:
        image.clamp_(min=torch.as_tensor(low, dtype=image.dtype, device=image.device).view(shape),
                     max=torch.as_tensor(high, dtype=image.dtype, device=image.device).view(shape))
    image.sub_(torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(shape))
    image.div_(torch.as_tensor(std, dtype=image.dtype, device=image.device).view(shape))
    if dropped is not None:
        image.masked_fill_(dropped, 0.0)
    return image


def _checked_ignore(ignore: Ignore) -> list[float] | float | None:
    """``ignore=`` as a float or a list of floats (what the state and the cache key hold)."""
    if ignore is None:
        return None
    if isinstance(ignore, (int, float)):
        return float(ignore)
    values = torch.as_tensor(ignore, dtype=torch.float64).flatten().tolist()
    if not values:
        raise ValueError("ignore= needs a value, or one per channel. Got an empty sequence.")
    return values


def _checked_clip(clip: tuple[float, float] | None) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip= takes two percentiles, e.g. (0.5, 99.5). Got {clip!r}.") from None
    if not 0 <= low < high <= 100:
        raise ValueError(f"clip= takes two percentiles 0 <= low < high <= 100, e.g. (0.5, 99.5). Got {clip!r}.")
    return (low, high)


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
