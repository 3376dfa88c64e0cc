"""torch.distributed plumbing for the fit: shards, the exact gather-merge, agreement on errors and cache hits.

Every rank merges the same gathered statistics in the same (rank) order, so all
ranks end with bit-identical results. Every collective is reached by every
rank, also when one of them failed, so a failure is reported everywhere instead
of leaving the other ranks waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .stats import ChannelStats

__all__ = ["Ranks", "current_ranks", "shard", "agree", "gather_merge", "on_root"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a process group, and where that group's collectives run."""

    group: Any
    rank: int
    world_size: int
    device: torch.device


def current_ranks(process_group: Any = None) -> Ranks | None:
    """The given or default initialized process group, or None when the fit runs alone."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    backend = dist.get_backend(process_group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Ranks(process_group, dist.get_rank(process_group), dist.get_world_size(process_group), device)


def shard(indices: Sequence[int], ranks: Ranks) -> Sequence[int]:
    """This rank's disjoint share: every ``world_size``-th index. No padding, nothing skipped."""
    return indices[ranks.rank :: ranks.world_size]


def agree(ranks: Ranks, error: BaseException | None, payload: Any) -> list[Any]:
    """Exchange each rank's outcome; raise on every rank if any rank failed, else return all payloads."""
    gathered: list[Any] = [None] * ranks.world_size
    message = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(gathered, (message, payload), group=ranks.group)
    failures = [(rank, msg) for rank, (msg, _) in enumerate(gathered) if msg is not None]
    if error is not None:
        raise _on_rank(error, ranks.rank) from error
    if failures:
        rank, msg = failures[0]
        raise RuntimeError(f"The fit failed on rank {rank} of {ranks.world_size}: {msg}")
    return [payload for _, payload in gathered]


def _on_rank(error: BaseException, rank: int) -> BaseException:
    try:
        return type(error)(f"rank {rank}: {error}")
    except Exception:
        return RuntimeError(f"rank {rank}: {type(error).__name__}: {error}")


def gather_merge(ranks: Ranks, stats: ChannelStats) -> ChannelStats:
    """All ranks' statistics merged exactly (float64 Chan merge, in rank order)."""
    local = torch.stack(list(stats.to_dict().values())).to(ranks.device)  # ChannelStats field order
    gathered = [torch.empty_like(local) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, local, group=ranks.group)
    merged = ChannelStats.empty(stats.num_channels)
    for rows in gathered:
        merged = merged.merge(ChannelStats(*rows.cpu().unbind(0)))
    # Value counts (clip=) are integers, added exactly in any order; a rank that read nothing has none.
    values: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(values, stats.values, group=ranks.group)
    parts = [part for part in values if part is not None]
    if not parts:
        return merged
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return merged.with_values(total)


def on_root(ranks: Ranks | None, function: Callable[[], T]) -> T:
    """Run ``function`` on rank 0 only (here, when alone); every rank gets its result, or its error."""
    if ranks is None:
        return function()
    error, result = None, None
    if ranks.rank == 0:
        try:
            result = function()
        except Exception as caught:
            error = caught
    return agree(ranks, error, result)[0]
