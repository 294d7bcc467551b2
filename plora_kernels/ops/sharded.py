"""Row-sharded unloads (FSDP2): each rank merges its rows of W without gathering W.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards W and B by rows (dim 0) across ranks. Row i of
``W + c s B A`` reads only row i of W and B and all of A (r x in, small), so each rank merges its own rows with
its rows of B and the gathered A, and the result is the rows of the single-process unload
(:func:`unload_sharded_` on plain shards, :func:`unload_dtensor_` on DTensors).

Random streams (ops.streams) are counter-based and indexed by the element's logical position, and their seeds
are drawn on the host exactly as the single-process unload draws them: a shard passes its ``row_offset`` and
gets the full W's numbers for its rows, and every rank draws the same full fresh A and keeps its rows of it.
A merge that would write a non-finite value raises on every rank of the group, and nothing is changed on any
rank (one all-reduce of a flag, through the merge engine's ``all_ranks``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .checks import check_generator_device, check_unload_args
from .merge import Merge, draw_seeds, merge_many_, reset_adapters_, stochastic

__all__ = ["is_dtensor", "local_row_range", "unload_sharded_", "unload_dtensor_"]


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (what FSDP2 makes of a parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _groups(group) -> list:
    """A process group, a sequence of them (all-reduced in turn: a mesh's dims), or None (no collective)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return []
    return list(group) if isinstance(group, (list, tuple)) else [group]


def _all_ranks_true(flag: bool, groups: Sequence, device) -> bool:
    """AND of ``flag`` over every rank of ``groups`` (each group in turn; together they span a mesh)."""
    if not groups:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    for g in groups:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g)
    return bool(t.item())


def _needs_generator(weight, rounding, momentum) -> bool:
    return stochastic(weight, rounding) or momentum == 0.0


# ------------------------------------------------------------------------------------------- the merge

def _unload_rows_(weight_shard, lora_A, lora_B_rows, lora_B_local, scaling, momentum, rounding, generator, seed,
                  row_offset, groups) -> None:
    """W rows [row_offset, row_offset + rows) <- the same rows of round(W + (1 - m) s B A), then the reset of
    the full A (the same draw on every rank) and of this rank's B. Raises on every rank of ``groups``, leaving
    everything unchanged everywhere, if any rank's merged rows are not finite."""
    round_seed, init_seed = draw_seeds(weight_shard, rounding, momentum, generator, seed)
    merge = Merge(weight_shard, lora_A, lora_B_rows, (1.0 - momentum) * scaling, rounding, round_seed, row_offset)
    merge_many_([merge], all_ranks=lambda flag: _all_ranks_true(flag, groups, weight_shard.device))
    reset_adapters_([lora_A], [lora_B_local], [momentum], [init_seed])


def check_sharded_generator(weight, rounding, momentum, generator, seed) -> None:
    """A distributed unload draws its random numbers identically on every rank: it needs a generator or a seed."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if generator is None and seed is None:
        if _needs_generator(weight, rounding, momentum):
            raise ValueError(
                "a distributed unload needs a generator seeded identically on every rank (e.g. "
                "plora_kernels.train.unloader.unload_generator(seed, unload_index, layer_index, device)) or a "
                "seed; the global RNG differs between ranks")
    check_generator_device(generator, weight)


# ------------------------------------------------------------------------------------------ public API

def unload_sharded_(weight_shard: torch.Tensor, lora_A: torch.Tensor, lora_B_shard: torch.Tensor, scaling: float,
                    *, momentum: float = 0.0, rounding: str = "nearest", generator: torch.Generator | None = None,
                    row_offset: int = 0, out_features: int | None = None, group=None, seed: int | None = None) -> None:
    """:func:`plora_kernels.unload_` on a row shard of W, in place, without gathering W.

    Args:
        weight_shard: (rows, in): rows ``[row_offset, row_offset + rows)`` of the logical W (out_features, in).
        lora_A: the FULL (r, in) A, identical on every rank (gather it first if it is sharded). Reset in place
            like :func:`plora_kernels.unload_` does (m = 0: a fresh draw, the same on every rank).
        lora_B_shard: (rows, r): the same rows of B. Zeroed (m = 0) or scaled by m in place.
        scaling, momentum, rounding: as :func:`plora_kernels.unload_`.
        generator: seeded identically on every rank; required (or ``seed``) when the unload draws random
            numbers (m = 0, or stochastic rounding of a 16-bit W). It is consumed as the single-process unload of
            the full W would consume it, so the shard gets exactly the rows that unload would write.
        row_offset: index of the shard's first row in the logical W.
        out_features: rows of the logical W (default: row_offset + rows); checked against the shard.
        group: process group (or a sequence of groups) whose ranks together hold W; a merge that would write
            a non-finite value then raises on all of them and changes nothing anywhere. None: no collective.
        seed: an int the unload's random streams derive from, instead of ``generator``.
    """
    rows = weight_shard.shape[0] if isinstance(weight_shard, torch.Tensor) else 0
    scaling, momentum = check_unload_args(weight_shard, lora_A, lora_B_shard, scaling, momentum, rounding)
    if isinstance(row_offset, bool) or not isinstance(row_offset, int) or row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative int, got {row_offset!r}")
    if out_features is None:
        out_features = row_offset + rows
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < row_offset + rows:
        raise ValueError(f"out_features must be an int >= row_offset + rows = {row_offset + rows}, "
                         f"got {out_features!r}")
    check_sharded_generator(weight_shard, rounding, momentum, generator, seed)
    with torch.no_grad():
        _unload_rows_(weight_shard, lora_A, lora_B_shard, lora_B_shard, scaling, momentum, rounding, generator, seed,
                      row_offset, _groups(group))


def local_row_range(t) -> tuple[int, int]:
    """(first row, number of rows) of a DTensor's local tensor within its global tensor.

    Supports Replicate and Shard(0) placements on any mesh (FSDP2, HSDP); DTensor splits a sharded dim like
    ``torch.chunk``, one mesh dimension after another. A plain tensor is all rows.
    """
    if not is_dtensor(t):
        return 0, t.shape[0]
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not in the mesh
        return 0, 0
    start, length = 0, t.shape[0]
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard or placement.dim != 0:
            raise NotImplementedError(
                f"sharded unload supports Replicate and Shard(0) placements, got {t.placements}")
        n = mesh.size(mesh_dim)
        chunk = -(-length // n) if length else 0
        lo = min(coord[mesh_dim] * chunk, length)
        start, length = start + lo, min(chunk, length - lo)
    local = t.to_local()
    if local.shape[0] != length:
        raise RuntimeError(f"local tensor has {local.shape[0]} rows but its placements {t.placements} give {length}")
    return start, length


def _mesh_groups(t) -> list:
    return [t.device_mesh.get_group(d) for d in range(t.device_mesh.ndim)]


def unload_dtensor_(weight, lora_A, lora_B, scaling: float, *, momentum: float = 0.0, rounding: str = "nearest",
                    generator: torch.Generator | None = None, seed: int | None = None) -> None:
    """:func:`plora_kernels.unload_` for FSDP2 parameters (DTensors), in place on the local shards.

    ``weight`` is a DTensor placed Shard(0) or Replicate on each mesh dim (FSDP2's default is Shard(0)).
    ``lora_B`` may be sharded like W (FSDP2's default; no communication) or any other way (gathered: it is
    out x r), or be a plain tensor. ``lora_A`` may be a DTensor with any placement (all-gathered: r x in) or
    a plain tensor identical on every rank (e.g. kept out of FSDP2 with ``ignored_params``). W is never gathered.
    With the same ``generator`` state on every rank the result
    equals, row for row, :func:`plora_kernels.unload_` on the full tensors, and every rank's share of the fresh
    A is its rows of one common draw.

    Call it between steps (after ``optimizer.step()``), when FSDP2 holds the parameters sharded.
    """
    if not is_dtensor(weight):
        raise TypeError(f"weight must be a DTensor (an FSDP2 parameter), got {type(weight).__name__}; "
                        "use plora_kernels.unload_ for plain tensors")
    scaling, momentum = check_unload_args(weight, lora_A, lora_B, scaling, momentum, rounding)
    w_local = weight.to_local()
    check_sharded_generator(w_local, rounding, momentum, generator, seed)
    row_offset, rows = local_row_range(weight)
    with torch.no_grad():
        a_full = lora_A.full_tensor() if is_dtensor(lora_A) else lora_A
        if is_dtensor(lora_B):
            b_local = lora_B.to_local()
            aligned = lora_B.device_mesh == weight.device_mesh and lora_B.placements == weight.placements
            b_rows = b_local if aligned else lora_B.full_tensor()[row_offset:row_offset + rows]
        else:
            b_local = lora_B
            b_rows = lora_B[row_offset:row_offset + rows]
        _unload_rows_(w_local, a_full, b_rows, b_local, scaling, momentum, rounding, generator, seed, row_offset,
                      _mesh_groups(weight))
        if is_dtensor(lora_A) and momentum == 0.0:  # A was re-drawn: keep this rank's part of the common draw
            from torch.distributed.tensor import distribute_tensor

            # src_data_rank=None: every rank cuts its part from its own (identical) copy, no communication
            mine = distribute_tensor(a_full, lora_A.device_mesh, lora_A.placements, src_data_rank=None)
            lora_A.to_local().copy_(mine.to_local())
