"""torchnormfit: exact per-channel mean and std for torchvision pipelines, fitted once and cached.

Names are imported on first use (PEP 562), so that the command line and the cache can be used without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_WHERE = {
    "FitNormalize": "transform",
    "NotFittedError": "transform",
    "BatchNormAccumulator": "accumulator",
    "ChannelStats": "stats",
    "CacheEntry": "cache",
    "CacheError": "cache",
    "CacheWarning": "cache",
    "default_cache_dir": "cache",
    "list_entries": "cache",
}

__all__ = [
    "BatchNormAccumulator",
    "CacheEntry",
    "CacheError",
    "CacheWarning",
    "ChannelStats",
    "FitNormalize",
    "NotFittedError",
    "__version__",
    "default_cache_dir",
    "list_entries",
]

if TYPE_CHECKING:
    from .accumulator import BatchNormAccumulator as BatchNormAccumulator
    from .cache import CacheEntry as CacheEntry
    from .cache import CacheError as CacheError
    from .cache import CacheWarning as CacheWarning
    from .cache import default_cache_dir as default_cache_dir
    from .cache import list_entries as list_entries
    from .stats import ChannelStats as ChannelStats
    from .transform import FitNormalize as FitNormalize
    from .transform import NotFittedError as NotFittedError


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'torchnormfit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
