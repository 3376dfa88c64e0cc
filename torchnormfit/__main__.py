"""``python -m torchnormfit``: the same command line as the ``torchnormfit`` console script (no torch import
before the arguments are parsed)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
