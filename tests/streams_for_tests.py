"""Real streams for tests: WebDataset tar shards and Hugging Face datasets built in a folder, no download.

Importable from worker processes, spawned ranks and subprocesses. Every image
is float32 ``(3, 4 + i % 3, 5 + i % 2)``: sizes differ, so batches hold
several shapes.
"""

import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2


def image(index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(index)
    return torch.rand(3, 4 + index % 3, 5 + index % 2, generator=g) * 0.5 + (index % 5) * 0.1


def truth(indices) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float64 mean and population variance per channel, and the pixel count per channel."""
    pixels = torch.cat([image(i).double().reshape(3, -1) for i in indices], dim=1)
    return pixels.mean(dim=1), pixels.var(dim=1, unbiased=False), pixels.shape[1]


def write_shards(folder, n: int, shards: int) -> list[str]:
    """``n`` samples (``npy`` image, ``cls`` index) over ``shards`` tar files, in index order."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"train-{s:06d}.tar") for s in range(shards)]
    per_shard = -(-n // shards)
    for s, path in enumerate(paths):
        with wds.TarWriter(path) as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                sink.write({"__key__": f"{i:06d}", "npy": image(i).numpy(), "cls": i})
    return paths


class ToFloat:
    """The array of a sample as a tensor; refuses to run when $NO_READS is set (to prove a cache hit)."""

    def __call__(self, array):
        if os.environ.get("NO_READS"):
            raise AssertionError("a sample was read")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))


def pipeline(norm=None) -> v2.Compose:
    return v2.Compose([ToFloat()] + ([norm] if norm is not None else []))


def webdataset(urls, norm=None, **options):
    """``WebDataset(urls)`` decoded to ``(image, index)``, the FitNormalize in its ``map_tuple``."""
    import webdataset as wds

    stream = wds.WebDataset(urls, **{"shardshuffle": False, "empty_check": False, **options})
    return stream.decode().to_tuple("npy", "cls").map_tuple(pipeline(norm), int)


def unsplit_webdataset(urls):
    """A DataPipeline with no split_by_worker: every worker reads every shard."""
    import webdataset as wds

    return wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode(), wds.to_tuple("npy"), wds.map_tuple(ToFloat())
    )


class HFTransform:
    """A ``set_transform`` function: the batch's images through ``pipeline``."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, batch):
        return {"image": [self.pipeline(x) for x in batch["image"]], "label": batch["label"]}


class HFExample(HFTransform):
    """An ``IterableDataset.map`` function: one example's image through ``pipeline``."""

    def __call__(self, example):
        return {"image": self.pipeline(example["image"])}


def hf_table(n: int):
    import datasets

    return datasets.Dataset.from_dict({"image": [image(i).numpy() for i in range(n)], "label": list(range(n))})


def hf_dataset(n: int, norm=None):
    """A map-style Hugging Face Dataset with ``set_transform``, the FitNormalize inside."""
    table = hf_table(n)
    table.set_transform(HFTransform(pipeline(norm)))
    return table


def hf_iterable(n: int, shards: int, norm=None):
    """``to_iterable_dataset(num_shards=shards).map(...)``, the FitNormalize in the map function."""
    return hf_table(n).to_iterable_dataset(num_shards=shards).map(HFExample(pipeline(norm)))


class Stream(IterableDataset):
    """``(image(i), i)`` for ``i`` in ``indices``, split across workers unless ``split=False``.

    Raises at sample ``fail_at``; with ``transform``, the image goes through it.
    """

    def __init__(self, indices, split=True, fail_at=None, transform=None):
        self.indices, self.split, self.fail_at, self.transform = list(indices), split, fail_at, transform

    def __iter__(self):
        info = get_worker_info()
        mine = self.indices if info is None or not self.split else self.indices[info.id :: info.num_workers]
        for i in mine:
            if i == self.fail_at:
                raise OSError(f"broken sample {i}")
            x = image(i)
            yield (x if self.transform is None else self.transform(x)), i


class SizedStream(Stream):
    def __len__(self):
        return len(self.indices)
