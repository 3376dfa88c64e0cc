"""The cache key: what identifies a dataset, its pipeline up to the FitNormalize, and the fit's settings.

- :func:`fingerprint`: the key (``"<DatasetClass>-<20 hex digits>"``) and what it could not see.
- :func:`describe_dataset`: a readable summary of the same, kept in a cache entry as provenance.
- :func:`describe_pipeline`: the transforms that run before the FitNormalize.

How each kind of value is described: :mod:`torchnormfit.key.fingerprint` (the walk) and
:mod:`torchnormfit.key.describe` (the registry of special types); what it sees and what it
cannot: ``docs/key.md``.
"""

from .describe import describe_dataset
from .fingerprint import Fingerprint, describe_pipeline, fingerprint

__all__ = ["Fingerprint", "describe_dataset", "describe_pipeline", "fingerprint"]
