"""One 'run' of a user's script for tests/test_unseen_changes.py: fits the named scenarios against one shared
cache, and prints for each what the fit returned, how (cache or pass, what the check found) and the truth computed
directly from the files.

    python _change_worker.py CACHE WORKDIR SCENARIO [SCENARIO ...]

The data lives under WORKDIR/<scenario>; the test changes it between runs where no key can see (same names, sizes
and mtimes), as issue 18 lists.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from torchnormfit import FitNormalize

TO_FLOAT = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
RANDOM = {
    "crop": lambda: [v2.RandomResizedCrop(12, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip()],
    "gray": lambda: [v2.RandomGrayscale(p=0.1)],
}


class GainedImages(Dataset):
    """Images kept in memory, each class (index % 4) scaled by a gain read from a JSON file the dataset opens
    itself: a path no attribute holds, so no key can see the file."""

    def __init__(self, transform, n=200):
        self.transform, self.n = transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        gains = json.loads(Path(os.environ["TNF_GAINS"]).read_text())["gains"]
        g = torch.Generator().manual_seed(index)
        image = torch.rand(3, 6, 6, generator=g) * 0.5 + 0.1 * (index % 7)
        return self.transform(image * gains[index % 4]), index % 4


def pipeline(scenario, norm):
    augment = next((make() for name, make in RANDOM.items() if scenario.endswith(name)), [])
    return v2.Compose([*TO_FLOAT, *augment, norm])


def dataset(scenario, work, norm):
    if scenario == "json_class_gain":
        os.environ["TNF_GAINS"] = str(work / scenario / "gains.json")
        return GainedImages(v2.Compose([norm]))
    return ImageFolder(work / scenario, transform=pipeline(scenario, norm))


def truth(scenario, work):
    """Per-channel mean and std of every pixel the data holds now, in float64, straight from the files."""
    if scenario == "json_class_gain":
        data = GainedImages(lambda x: x)
        pixels = torch.stack([data[i][0] for i in range(len(data))]).double()
    else:
        files = sorted((work / scenario).rglob("*.bmp"))
        pixels = torch.from_numpy(np.stack([np.asarray(PIL.Image.open(f).convert("RGB")) for f in files])).double()
        pixels = pixels.permute(0, 3, 1, 2) / 255
    flat = pixels.transpose(0, 1).reshape(3, -1)
    return flat.mean(dim=1).tolist(), flat.std(dim=1, correction=0).tolist()


def main():
    cache, work, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    out = {}
    for name in names:
        norm = FitNormalize(cache=cache)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            norm.fit(dataset(name, work, norm), num_workers=0, progress=False)
        record = norm.fit_record
        check = record.verification
        true_mean, true_std = truth(name, work)
        out[name] = {
            "mean": norm.mean, "std": norm.std, "true_mean": true_mean, "true_std": true_std,
            "source": record.source, "key": record.key,
            "verified": None if check is None else check.passed,
            "failed": [] if check is None else list(check.failed),
            "read": 0 if check is None else check.samples,
            "warnings": [str(w.message) for w in caught],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
