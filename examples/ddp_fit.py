"""Fit exact statistics across processes and machines with torchrun.

Each rank reads its own shard of the dataset once; the ranks merge their float64
statistics exactly, so every rank ends with the same numbers as a single-process
fit. Rank 0 alone reads and writes the cache.

One machine, 2 processes:
    torchrun --nproc-per-node=2 examples/ddp_fit.py

Several machines (run on each, with its own --node-rank):
    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=0 \
        --rdzv-backend=c10d --rdzv-endpoint=HOST_OF_NODE_0:29500 examples/ddp_fit.py
"""

import torch
import torch.distributed as dist
from torchvision.datasets import FakeData
from torchvision.transforms import v2

from torchnormfit import FitNormalize


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    norm = FitNormalize()
    # Replace FakeData with your ImageFolder / ImageNet: the pipeline up to `norm` is what gets measured.
    dataset = FakeData(
        size=2000,
        image_size=(3, 64, 64),
        transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm]),
    )
    norm.fit(dataset)  # picks up the process group: one shard per rank, exact merge, one cache write
    if dist.get_rank() == 0:
        print(norm)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
