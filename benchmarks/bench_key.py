#!/usr/bin/env python
"""Issue 18: what the cache key of a large ImageFolder costs, before and after the key saw folders and paths.

    python benchmarks/bench_key.py                  # 20,000 files in 100 classes, 7 interleaved rounds
    python benchmarks/bench_key.py --files 2000     # a smoke check

An image folder of empty ``.png`` files (the key reads no pixel, ImageFolder opens no file) is built in a
temporary folder. Each round times, interleaved:

``listing``   ``ImageFolder(root)``: the floor, the walk over the files that any use of the folder costs;
``before``    the key of that dataset with ``torchnormfit/fingerprint.py`` as of ``--baseline`` (git), loaded
              from git into this process;
``after``     the key with this tree's ``torchnormfit.key.fingerprint`` (absolute root);
``relative``  the same, the root given relative to the working folder (each path made absolute).

Prints the median of each and the ratios after/before, relative/before and after/listing. The key must not add
a second walk over the files: ``after / before`` near 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torchnormfit import FitNormalize  # noqa: E402 (this checkout, not an installed copy)
from torchnormfit.key import fingerprint  # noqa: E402


def old_fingerprint(revision: str) -> Any:
    """``fingerprint`` from torchnormfit/fingerprint.py at ``revision`` (the walk of issue 10); None when git
    does not have it (a shallow clone)."""
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:torchnormfit/fingerprint.py"],
                           capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        return None
    source = shown.stdout
    module = types.ModuleType("fingerprint_before")
    sys.modules[module.__name__] = module
    exec(compile(source, "fingerprint_before.py", "exec"), module.__dict__)  # noqa: S102 (our own code, from git)
    return module.fingerprint


def make_folder(root: Path, files: int, classes: int) -> None:
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True)
        for i in range(files // classes):
            (folder / f"{i:05d}.png").touch()


def timed(work: Any) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", default="613ef40", help="git revision of the key before (default: %(default)s)")
    args = parser.parse_args()
    before = old_fingerprint(args.baseline)
    norm = FitNormalize(cache=None)
    pipeline = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm])
    settings = {"image": None, "ddof": 0, "statistic": "per-channel population mean/std"}
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp) / "photos", args.files, args.classes)
        os.chdir(tmp)  # the relative spelling: "photos"
        absolute = ImageFolder(str(Path(tmp) / "photos"), transform=pipeline)
        relative = ImageFolder("photos", transform=pipeline)
        assert fingerprint(absolute, norm, settings).key == fingerprint(relative, norm, settings).key
        runs: dict[str, list[float]] = {"listing": [], "before": [], "after": [], "relative": []}
        if before is None:
            print(f"no baseline: git has no {args.baseline}:torchnormfit/fingerprint.py here")
            del runs["before"]
        for _ in range(args.rounds):
            runs["listing"].append(timed(lambda: ImageFolder(str(Path(tmp) / "photos"), transform=pipeline)))
            if before is not None:
                runs["before"].append(timed(lambda: before(absolute, norm, settings)))
            runs["after"].append(timed(lambda: fingerprint(absolute, norm, settings)))
            runs["relative"].append(timed(lambda: fingerprint(relative, norm, settings)))
    median = {name: statistics.median(times) for name, times in runs.items()}
    load = os.getloadavg()[0]
    print(f"ImageFolder of {len(absolute):,} files in {args.classes} classes, {args.rounds} interleaved rounds, "
          f"load average {load:.1f}")
    for name, value in median.items():
        print(f"  {name:9s} {value * 1000:8.1f} ms (median; min {min(runs[name]) * 1000:.1f})")
    if "before" in median:
        print(f"  after / before     {median['after'] / median['before']:.2f}x")
        print(f"  relative / before  {median['relative'] / median['before']:.2f}x")
    print(f"  after / listing    {median['after'] / median['listing']:.2f}x")


if __name__ == "__main__":
    main()
