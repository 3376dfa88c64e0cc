"""nnU-Net's CT normalization, fitted once: foreground voxels, their 0.5 / 99.5 percentiles, then z-score.

A stand-in for a CT segmentation set: int16 volumes in Hounsfield units ``(1, D, H, W)`` (air at -1000, soft
tissue near 40, bone up to 2000) with a foreground label map. As nnU-Net does, the statistics are those of the
foreground voxels of all training cases; the transform clips every volume to their 0.5 and 99.5 percentiles and
subtracts their mean and divides by their std (taken before clipping). Percentiles of int16 data are exact: counts
per value, merged across batches, workers and ranks.

    python examples/ct.py [--cases N] [--depth D] [--size PX]
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from torchnormfit import FitNormalize


class Cases(Dataset):
    """``n`` generated cases ``(tv_tensors.Image (1, D, H, W) int16, tv_tensors.Mask (1, D, H, W) uint8)``."""

    def __init__(self, n: int = 12, depth: int = 16, size: int = 48, seed: int = 0, transform=None):
        self.n, self.depth, self.size, self.seed, self.transform = n, depth, size, seed, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        d, s = self.depth, self.size
        z, y, x = torch.meshgrid(torch.linspace(-1, 1, d), torch.linspace(-1, 1, s), torch.linspace(-1, 1, s),
                                 indexing="ij")
        radius = 0.55 + 0.15 * float(torch.rand(1, generator=g))
        body = (x**2 + y**2) < 0.8
        organ = (x**2 + y**2 + (z / 1.5) ** 2) < radius**2
        hu = torch.full((d, s, s), -1000.0)  # air
        hu[body] = 40 + 30 * torch.randn(int(body.sum()), generator=g)  # soft tissue
        hu[organ] = 120 + 60 * torch.randn(int(organ.sum()), generator=g)  # the labelled organ, contrast-enhanced
        bone = body & (torch.rand(d, s, s, generator=g) < 0.01)
        hu[bone] = 1200 + 400 * torch.rand(int(bone.sum()), generator=g)  # calcifications inside the label too
        image = tv_tensors.Image(hu.round().clamp(-1024, 3071).to(torch.int16)[None])
        label = tv_tensors.Mask(organ.to(torch.uint8)[None])
        return (image, label) if self.transform is None else self.transform(image, label)


def main(argv: list[str] | None = None) -> FitNormalize:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    norm = FitNormalize(clip=(0.5, 99.5), spatial_dims=3, cache=None)
    cases = Cases(args.cases, args.depth, args.size, transform=norm)  # the transform sits in the pipeline
    norm.fit(cases, mask=tv_tensors.Mask, num_workers=args.workers)  # foreground: the sample's label map
    print(f"foreground voxels: {int(norm.stats.count[0])}")
    print(f"mean {norm.mean[0]:.2f} HU, std {norm.std[0]:.2f} HU (before clipping)")
    print(f"clip to [{norm.clip_low[0]:g}, {norm.clip_high[0]:g}] HU (0.5 / 99.5 percentiles)")
    image, label = cases[0]  # now normalized: int16 volume in, float32 out
    print(f"case 0: {tuple(image.shape)} {image.dtype}, foreground mean {float(image[label.bool()].mean()):.3f}")
    return norm


if __name__ == "__main__":
    main()
