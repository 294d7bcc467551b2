"""Distributed PeriodicLoRA: data parallel (DDP) and sharded (FSDP2) unloads.

DDP needs nothing from this module: every rank holds all of W, A and B, and :class:`PeriodicUnloader`
derives each unload's random streams from (seed, unload index, layer index), so every rank merges with the
same stochastic rounding and draws the same fresh A. :func:`unsynced_replicas` checks that bit for bit.

FSDP2 shards W and B by rows; :func:`unload_dtensor_` and :func:`unload_sharded_` (from
:mod:`plora_kernels.ops.sharded`, re-exported here) merge each rank's rows without gathering W.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .ops.sharded import is_dtensor, local_row_range, unload_dtensor_, unload_sharded_

__all__ = ["is_dtensor", "local_row_range", "unload_sharded_", "unload_dtensor_", "unsynced_replicas",
           "replicas_in_sync"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes (so -0.0 != 0.0 and NaNs compare by payload)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def unsynced_replicas(tensors: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], group=None) -> list[str]:
    """Names of the tensors that are NOT bit-identical on every rank of ``group`` (the same list on every rank).

    ``tensors``: a module (its parameters and buffers) or ``(name, tensor)`` pairs. For DDP models: after
    any number of steps and unloads, every replica must hold the same W, A and B. DTensors are skipped
    (their shards differ by design). Costs one broadcast per tensor; meant for tests and debugging.
    """
    if isinstance(tensors, torch.nn.Module):
        items = list(tensors.named_parameters()) + list(tensors.named_buffers())
    else:
        items = list(tensors)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    differ = []
    for name, t in items:
        if is_dtensor(t):
            continue
        mine = _bits(t)
        theirs = mine.clone()
        dist.broadcast(theirs, src=src, group=group)
        bad = torch.tensor([0 if torch.equal(mine, theirs) else 1], dtype=torch.int32, device=t.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        if bad.item():
            differ.append(name)
    return differ


replicas_in_sync = unsynced_replicas  # the earlier name, which read as the opposite of what it returns
