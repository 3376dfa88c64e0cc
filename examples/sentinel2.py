"""Fit per-band statistics of 13-band uint16 scenes with a nodata value, in the data's own units.

A stand-in for Sentinel-2 L1C tiles (as torchgeo serves them: samples ``{"image": (13, H, W) uint16, ...}``):
reflectances x 10,000 in 16-bit integers, with 0 where a tile has no data. The statistics leave the nodata
pixels out (each band's count says how many it kept), the 2nd and 98th percentiles are learned in the same pass,
exactly, and the transform clips to them, normalizes, and sets nodata pixels to 0.

    python examples/sentinel2.py [--scenes N] [--size PX]
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.data import Dataset

from torchnormfit import FitNormalize

BANDS = 13
NODATA = 0
# Typical top-of-atmosphere reflectance x 10,000 per band (B01 ... B12): dark blue, bright near infrared.
LEVELS = [1350, 1100, 1050, 950, 1250, 2050, 2400, 2300, 800, 15, 1900, 1150, 2600]


class Scenes(Dataset):
    """``n`` generated scenes ``{"image": (13, size, size) uint16, "crs": ...}``, a nodata wedge in each."""

    def __init__(self, n: int = 64, size: int = 64, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        level = torch.tensor(LEVELS, dtype=torch.float32)[:, None, None]
        texture = torch.randn(BANDS, self.size, self.size, generator=g) * 0.25 + 1
        image = (level * texture.clamp_min(0.05)).round().clamp(1, 65535)
        cut = int(torch.randint(0, self.size, (1,), generator=g))
        rows = torch.arange(self.size)[:, None] + torch.arange(self.size)[None, :]
        image[:, rows < cut] = NODATA  # the tile's edge: no data
        return {"image": image.to(torch.uint16), "crs": "EPSG:32633"}


def main(argv: list[str] | None = None) -> FitNormalize:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    scenes = Scenes(args.scenes, args.size)
    norm = FitNormalize(ignore=NODATA, clip=(2, 98), cache=None)
    norm.fit(scenes, num_workers=args.workers)  # the "image" of each sample dictionary, in its own units
    print("kept pixels per band:", [int(c) for c in norm.stats.count.tolist()])
    print("mean:", [round(m, 1) for m in norm.mean])
    print("std: ", [round(s, 1) for s in norm.std])
    print("2nd / 98th percentiles:", list(zip(norm.clip_low, norm.clip_high)))
    out = norm(scenes[0]["image"])  # uint16 in, float32 out; nodata pixels come out as 0
    print(f"scene 0 normalized: {out.dtype}, {int((out == 0).all(dim=0).sum())} nodata pixels set to 0")
    return norm


if __name__ == "__main__":
    main()
