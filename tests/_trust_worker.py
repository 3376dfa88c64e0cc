"""One 'run' of a user's script for tests/test_trust.py: fits the named scenarios, variant a or b, against one
shared cache file, and prints for each what the fit returned, how (cache or pass) and the true statistics.

    python _trust_worker.py CACHE WORKDIR VARIANT SCENARIO [SCENARIO ...]

Each scenario builds the dataset (and fit options) a user would write; between variant a and b the data or the
pipeline changes in the way issue 10 lists. The truth is a fit of a fresh dataset of the same variant with no cache.
The scenarios of issue 18 (STALE) are also computed directly: every image of the dataset built without the
FitNormalize, stacked, per-channel mean and population std in float64.
"""

import glob
import importlib
import json
import operator
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from datasets_for_tests import FileList, Store
from torch.utils.data import (
    ChainDataset,
    ConcatDataset,
    Dataset,
    IterableDataset,
    Subset,
)
from torchvision.datasets import ImageFolder, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from torchnormfit import FitNormalize

TO_FLOAT = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


class Ramp(Dataset):
    """Image i is flat at 0.1 + 0.8 i / n plus a little noise: any two halves have different means."""

    def __init__(self, n=40, transform=None):
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(int(index))  # numpy indices from a Subset
        x = 0.1 + 0.8 * index / self.n + 0.05 * torch.rand(3, 6, 6, generator=g)
        return (self.transform(x) if self.transform else x), index % 2


class KeepsPipelineElsewhere(Dataset):
    """A custom dataset that keeps its pipeline under another name than ``transform``."""

    def __init__(self, aug, n=20):
        self.n, self.aug = n, aug

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.aug(Ramp(self.n)[index][0]), 0


class Pairs(Dataset):
    """Samples of two images; which one is the image is the user's ``image=`` choice."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        return torch.rand(3, 4, 4, generator=g) * 0.5, torch.rand(3, 4, 4, generator=g) * 0.5 + 6.0


class CsvImages(Dataset):
    """The PyTorch tutorial's pattern: a pandas table of file names, images read from a folder."""

    def __init__(self, csv_file, root, transform=None):
        import pandas

        self.frame, self.root, self.transform = pandas.read_csv(csv_file), root, transform

    def __len__(self):
        return len(self.frame)

    def __getitem__(self, index):
        image = PIL.Image.open(Path(self.root) / self.frame.iloc[index, 0]).convert("RGB")
        return self.transform(image), int(self.frame.iloc[index, 1])


def hf_dataset(work, variant, norm):
    import datasets

    ds = datasets.load_from_disk(str(work / "hf"))
    if variant == "b":
        ds = ds.map(lambda example: {"pixels": [[[v * 2 for v in row] for row in plane] for plane in example["pixels"]]})
    ds = ds.with_format("torch")
    return ds, {"image": lambda sample: sample["pixels"].float()}


def scenario(name, variant, work, norm):
    """(dataset, fit options) of one scenario and variant; ``norm`` is the FitNormalize being fitted."""
    a = variant == "a"
    if name == "numpy_subset":
        half = np.arange(0, 20) if a else np.arange(20, 40)
        return Subset(Ramp(40, transform=norm), half), {}
    if name == "pipeline_elsewhere":
        before = [v2.Identity()] if a else [v2.RandomInvert(p=1.0)]
        return KeepsPipelineElsewhere(v2.Compose([*before, norm])), {}
    if name == "wrapped_folder":
        root = work / ("dark" if a else "bright")
        return wrap_dataset_for_transforms_v2(ImageFolder(root, transform=v2.Compose([*TO_FLOAT, norm]))), {}
    if name == "reexported_folder":  # the test rewrites the files between the runs
        return ImageFolder(work / "reexported", transform=v2.Compose([*TO_FLOAT, norm])), {}
    if name == "one_of_130_swapped":
        return ImageFolder(work / "many", transform=v2.Compose([*TO_FLOAT, norm])), {}
    if name == "image_lambda":
        return Pairs(), {"image": (lambda s: s[0]) if a else (lambda s: s[1])}
    if name == "image_itemgetter":
        return Pairs(), {"image": operator.itemgetter(0 if a else 1)}
    if name == "hf_map":
        return hf_dataset(work, variant, norm)
    if name == "csv_files_reexported":  # the same table; the test rewrites its image files between the runs
        return CsvImages(work / "list_r.csv", work / "csv_images", transform=v2.Compose([*TO_FLOAT, norm])), {}
    if name == "pandas_csv":
        return CsvImages(work / f"list_{variant}.csv", work / "csv_images", transform=v2.Compose([*TO_FLOAT, norm])), {}
    if name == "invisible_change":  # the pixels change where no key can see: read from the environment
        return Ramp(20, transform=v2.Compose([v2.Lambda(lambda x: x * float(os.environ["TNF_LEVEL"])), norm])), {}
    raise ValueError(name)


class LazyFolder(FileList):
    """The folder's PNG files, listed at the first use (after the key was made)."""

    def __init__(self, folder, transform=None):
        super().__init__(None, folder, transform)

    def __len__(self):
        if self.files is None:
            self.files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.folder, "*.png")))
        return len(self.files)

    def __getitem__(self, index):
        len(self)
        return super().__getitem__(index)


class ArrayStream(IterableDataset):
    """The images of one .npy file, in order."""

    def __init__(self, path, transform):
        self.path, self.transform = path, transform

    def __iter__(self):
        for image in np.load(self.path):
            yield self.transform(torch.from_numpy(image)), 0


class RandomHalf(Dataset):
    """A split wrapper: half of ``base``, drawn with ``generator`` at the first read."""

    def __init__(self, base, generator):
        self.base, self.generator, self._order = base, generator, None

    def __len__(self):
        return len(self.base) // 2

    def __getitem__(self, index):
        if self._order is None:
            self._order = torch.randperm(len(self.base), generator=self.generator)[: len(self)].tolist()
        return self.base[self._order[index]]


class H5Images(Dataset):
    """Images from an open h5py dataset."""

    def __init__(self, path, transform):
        import h5py

        self.images, self.transform = h5py.File(path, "r")["images"], transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(torch.from_numpy(self.images[index])), 0


STALE = ["concat_part_replaced", "chain_part_file", "concat_three_parts", "numpy_str_files", "bare_names_folder",
         "store_in_place", "user_datasets_module", "seeded_generator", "lazy_file_list", "h5py_in_place",
         "concat_reordered", "relative_root"]


def stale_scenario(name, variant, work, norm):
    """(dataset, fit options) of an issue-18 scenario; ``norm`` is None for the plain images."""
    a = variant == "a"
    pipeline = v2.Compose([*TO_FLOAT, *([norm] if norm is not None else [])])
    arrays = v2.Compose([norm]) if norm is not None else v2.Identity()

    def part(letter):
        return ImageFolder(work / "parts" / letter, transform=pipeline)

    if name == "concat_part_replaced":
        return ConcatDataset([part("A"), part("B" if a else "C")]), {}
    if name == "concat_reordered":
        return ConcatDataset([part("P"), part("A")] if a else [part("A"), part("P")]), {}
    if name == "concat_three_parts":
        return ConcatDataset([part("P"), part("Q"), part("E" if a else "D")]), {}
    if name == "chain_part_file":
        return ChainDataset([ArrayStream(str(work / "x.npy"), arrays),
                             ArrayStream(str(work / ("y.npy" if a else "z.npy")), arrays)]), {}
    if name == "numpy_str_files":
        return FileList(np.array(sorted(glob.glob(str(work / "nfiles" / "*.png"))), dtype=str), transform=pipeline), {}
    if name == "bare_names_folder":
        return FileList([f"{i}.png" for i in range(12)], folder=str(work / "bare"), transform=pipeline), {}
    if name == "store_in_place":
        return Store(str(work / "store"), 12, arrays), {}
    if name == "user_datasets_module":  # a module of the user's named like Hugging Face's library
        if str(work / "usermod") not in sys.path:
            sys.path.insert(0, str(work / "usermod"))
        return importlib.import_module("datasets").Scaled(20, transform=arrays), {}
    if name == "seeded_generator":
        return RandomHalf(Ramp(40, transform=arrays), torch.Generator().manual_seed(0 if a else 1)), {}
    if name == "lazy_file_list":
        return LazyFolder(str(work / "lazy"), transform=pipeline), {}
    if name == "h5py_in_place":
        return H5Images(work / "images.h5", arrays), {}
    if name == "relative_root":  # run in the work folder
        return ImageFolder("relroot" if a else str(work / "relroot"), transform=pipeline), {}
    raise ValueError(name)


def direct(dataset):
    """Per-channel mean and population std of every image of ``dataset`` (float64), without torchnormfit."""
    samples = dataset if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    pixels = torch.cat([torch.as_tensor(sample[0]).double().reshape(3, -1) for sample in samples], dim=1)
    return pixels.mean(dim=1).tolist(), pixels.std(dim=1, unbiased=False).tolist()


def main():
    cache, work, variant, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    out = {}
    for name in names:
        norm = FitNormalize(cache=cache)
        build = stale_scenario if name in STALE else scenario
        dataset, options = build(name, variant, work, norm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            norm.fit(dataset, num_workers=0, progress=False, **options)
        record = norm.fit_record
        truth = FitNormalize(cache=None)
        truth_dataset, truth_options = build(name, variant, work, truth)
        truth.fit(truth_dataset, num_workers=0, progress=False, **truth_options)
        out[name] = {
            "mean": norm.mean, "std": norm.std, "true_mean": truth.mean, "true_std": truth.std,
            "source": record.source, "key": record.key, "gaps": list(record.key_gaps),
            "verified": None if record.verification is None else record.verification.passed,
            "warnings": [str(w.message) for w in caught], "note": record.note,
        }
        if name in STALE:
            out[name]["direct_mean"], out[name]["direct_std"] = direct(build(name, variant, work, None)[0])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
