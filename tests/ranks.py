"""Run a function on real torch.distributed ranks (gloo on loopback), one process a rank, and collect its results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def on_ranks(tmp_path: Path, work: Callable[..., Any], *args: Any, world_size: int = 2,
             start_method: str = "fork") -> list[Any]:
    """``work(rank, world_size, workdir, *args)`` in a process group of ``world_size`` ranks, each a fork of this
    process (milliseconds) or a fresh interpreter as torchrun starts (``"spawn"``: ``work`` must be importable);
    the JSON of what each rank returned, in rank order."""
    mp.start_processes(_rank_main, args=(world_size, str(tmp_path), work, args), nprocs=world_size, join=True,
                       start_method=start_method)
    return [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(world_size)]


def _rank_main(rank: int, world_size: int, workdir: str, work: Callable[..., Any], args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = work(rank, world_size, workdir, *args)
        Path(workdir, f"result{rank}.json").write_text(json.dumps(result))
    finally:
        dist.barrier()  # every rank done with its collectives before gloo is torn down (teardown races abort)
        dist.destroy_process_group()
