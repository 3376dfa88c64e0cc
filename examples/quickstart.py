"""Fit exact normalization statistics on an embedded dataset, cache them, and reuse them.

Run it twice: the first run makes one pass over the data and writes the cache
(by default the folder ~/.cache/torchnormfit, or $TORCHNORMFIT_CACHE); the second
run finds the statistics in the cache and checks them against 64 of the images
it was fitted on (read again), instead of reading all of them.

    python examples/quickstart.py [--images N]
"""

import argparse
import logging
import time

import torch
from torchvision.datasets import FakeData
from torchvision.transforms import v2

from torchnormfit import FitNormalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="number of FakeData images (default 5000)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    norm = FitNormalize()
    # FakeData stands in for CIFAR10(root, transform=...): 5,000 deterministic 3x32x32 images, no download.
    dataset = FakeData(
        size=args.images,
        image_size=(3, 32, 32),
        transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm]),
    )
    start = time.perf_counter()
    norm.fit(dataset)
    elapsed = time.perf_counter() - start
    record = norm.fit_record
    checked = f", {record.verification.samples} images checked" if record.verification else ""
    how = "one pass" if record.source == "pass" else f"cache hit{checked}"
    print(f"fit took {elapsed * 1000:.1f} ms over {len(dataset)} images ({how})")
    print(f"mean = {[round(m, 6) for m in norm.mean]}")
    print(f"std  = {[round(s, 6) for s in norm.std]}")
    print(norm)
    image, label = dataset[0]
    print(f"dataset[0] is now normalized: mean {image.mean():.3f}, std {image.std():.3f}")


if __name__ == "__main__":
    main()
