"""torchnormfit: exact per-channel mean and std for torchvision pipelines, fitted once and cached."""

from ._version import __version__
from .accumulator import BatchNormAccumulator
from .cache import CacheEntry, CacheError, CacheWarning, default_cache_path, list_entries
from .stats import ChannelStats
from .transform import FitNormalize, NotFittedError

__all__ = [
    "FitNormalize",
    "BatchNormAccumulator",
    "ChannelStats",
    "NotFittedError",
    "CacheEntry",
    "CacheError",
    "CacheWarning",
    "default_cache_path",
    "list_entries",
    "__version__",
]
