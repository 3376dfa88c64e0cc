"""Picklable datasets for tests that use worker processes and subprocesses."""

import os

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset


class CountingDataset(Dataset):
    """Deterministic float images; counts reads in a file; refuses reads when $NO_READS is set."""

    def __init__(self, n=40, channels=3, size=8, seed=0, transform=None, log=None):
        self.n, self.channels, self.size, self.seed = n, channels, size, seed
        self.transform = transform
        self.log = None if log is None else os.fsencode(log)  # bytes: a str naming a file would key its mtime

    def __len__(self):
        return self.n

    def image(self, index):
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        shift = float(os.environ.get("TNF_TEST_SHIFT", "0"))  # data changed where no key can see it
        return torch.rand(self.channels, self.size, self.size, generator=g) * 0.5 + (index % 5) * 0.1 + shift

    def __getitem__(self, index):
        if os.environ.get("NO_READS"):
            raise AssertionError(f"sample {index} was read")
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{index}\n")
        x = self.image(index)
        if self.transform is not None:
            x = self.transform(x)
        return x, index % 3


class FailingDataset(CountingDataset):
    """Raises at sample ``fail_at``."""

    def __init__(self, fail_at, error=RuntimeError, **kwargs):
        super().__init__(**kwargs)
        self.fail_at, self.error = fail_at, error

    def __getitem__(self, index):
        if index == self.fail_at:
            raise self.error(f"broken sample {index}")
        return super().__getitem__(index)


class Holder(Dataset):
    """A dataset whose identity lives in whatever it is given."""

    def __init__(self, **state):
        self.__dict__.update(state)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(3, 4, 4)


class FileList(Dataset):
    """Images from the files ``files`` names (a list or a numpy array), relative to ``folder`` when given."""

    def __init__(self, files, folder=None, transform=None):
        self.files, self.folder, self.transform = files, folder, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index] if self.folder is None else os.path.join(self.folder, self.files[index])
        return self.transform(PIL.Image.open(path).convert("RGB")), 0


class Store(Dataset):
    """An LMDB-like store: one .npy file per record in ``store``, found by index."""

    def __init__(self, store, n, transform=None):
        self.store, self.n, self.transform = store, n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        image = torch.from_numpy(np.load(os.path.join(self.store, f"{index}.npy")))
        return (image if self.transform is None else self.transform(image)), 0
