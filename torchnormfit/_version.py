"""The version of torchnormfit, in a module of its own: reading it imports nothing else (no torch)."""

__version__ = "0.1.0"
