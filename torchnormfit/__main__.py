"""``python -m torchnormfit``: the same command line as the ``torchnormfit`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
