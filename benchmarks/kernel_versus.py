#!/usr/bin/env python
"""batch_stats of this tree against batch_stats of a git revision, in one process, interleaved.

    python benchmarks/kernel_versus.py 7ee534b            # the revision's kernel beside this one
    python benchmarks/kernel_versus.py 7ee534b --rounds 5

A kernel's ratio to ``x.sum()`` moves by 10-20% with the machine's state from one run to the next; the ratio of
two kernels timed call by call on the same resident batch does not. The revision's ``torchnormfit`` package is
extracted with ``git archive`` into a temporary folder and imported as ``torchnormfit_<rev>``.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accumulator_variants import batches, time_ratios  # noqa: E402
from bench_fit import UInt8Images  # noqa: E402

from torchnormfit.reduce import batch_stats  # noqa: E402


def revision_kernel(revision: str, folder: Path):
    """``batch_stats`` of ``revision``'s torchnormfit, imported from ``folder``."""
    name = f"torchnormfit_{revision}"
    archive = subprocess.run(["git", "archive", revision, "torchnormfit"], cwd=HERE.parent, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "torchnormfit").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{name}.reduce").batch_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = {"cifar-like": UInt8Images(256).images.float().div_(255), "narrow": batches((256, 3, 32, 32))["narrow"],
            "uniform": batches((256, 3, 32, 32))["uniform"], "224 uniform": batches((64, 3, 224, 224))["uniform"],
            "224 narrow": batches((64, 3, 224, 224))["narrow"]}
    with tempfile.TemporaryDirectory() as folder:
        old = revision_kernel(args.revision, Path(folder))
        print(f"{'batch':12s} {args.revision:>10s}  this tree  this / {args.revision}  (ratios to x.sum())")
        for name, x in data.items():
            r = time_ratios({"old": old, "new": batch_stats}, x, rounds=args.rounds)
            print(f"{name:12s} {r['old'][0]:9.2f}x {r['new'][0]:9.2f}x  {r['new'][1] / r['old'][1]:12.3f}")


if __name__ == "__main__":
    main()
