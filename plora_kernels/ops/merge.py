"""The merge engine: W <- round(W + coef B A) for many layers, checked exactly before anything is written.

The guard. An unload must never write a non-finite value into W, and must leave W, A and B bit-identical when it
refuses. A bound on |W + coef B A| needs max|W|, and a cached max|W| can go stale without notice: writes through
``.data``, through a tensor sharing W's storage or through a tied weight do not bump W's version counter. So
there is no cache: a check pass reads W and evaluates every merged value exactly as the writing pass will (same
kernel source, no FMA contraction), and only then does the writing pass run. It reads W once more: 1.5x the
bytes of a bare merge. A value no larger in magnitude than W's largest finite cannot round to a non-finite one,
so the check compares and needs no rounding; only when some value is larger (or not finite) does an exact check
round it with the writing pass's random stream, so a finite merge is never refused. A non-finite factor makes
the merged values it touches non-finite, so the same pass covers the factors.

Every layer's check runs before the first write, with one host read for all of them. Layers that share one
weight (tied) are merged in turn, each checked against the result of the one before. Paths: the Triton kernel
(CUDA tensors, or CPU tensors under the interpreter) launches once per group of layers with equal dtypes, the
csrc/ CUDA twin (``PLORA_UNLOAD_KERNEL=cuda``) once per layer, and the torch reference computes each merged W
as a new tensor (the CPU path; it runs the check pass too, so it also changes nothing on an error).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from .._backend import resolve
from . import reference, streams

__all__ = ["Merge", "merge_many_", "draw_seeds", "reset_adapters_", "stochastic", "factor_error", "overflow_error"]


class Merge(NamedTuple):
    """One merge: W (or rows [row_offset, ...) of a larger logical W) <- round(W + coef B A), with the rounding
    stream of ``seed`` (see ops.streams). What the engine takes: a user's ``UnloadSpec`` (ops.unload) becomes one
    once its scaling and momentum are folded into ``coef`` and its seed is drawn, and an FSDP2 row shard
    (ops.sharded) once its row offset is known."""
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    coef: float
    rounding: str
    seed: int = 0
    row_offset: int = 0


def _prefix(label: str) -> str:
    return f"unload_ ({label})" if label else "unload_"


def factor_error(name: str, label: str = "") -> ValueError:
    return ValueError(f"{_prefix(label)}: {name} contains non-finite values; weight, lora_A and lora_B were "
                      "left unchanged")


def overflow_error(weight: torch.Tensor, label: str = "") -> ValueError:
    return ValueError(
        f"{_prefix(label)}: merging would write a non-finite value into the {weight.dtype} weight (overflow or a "
        "non-finite entry already in it); weight, lora_A and lora_B were left unchanged")


def _error(m: Merge, label: str) -> ValueError:
    """The refusal of merge ``m``, naming a non-finite factor when there is one (read on the error path only)."""
    for name, t in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
        if not bool(torch.isfinite(t).all()):
            return factor_error(name, label)
    return overflow_error(m.weight, label)


def merge_path(m: Merge) -> str:
    """Which implementation merges ``m``: "triton", "cuda" (the csrc/ twin) or "torch" (the reference)."""
    impl = resolve("unload", m.weight)
    if impl == "cuda" and torch.float64 in (m.weight.dtype, m.lora_A.dtype, m.lora_B.dtype):
        return "triton"  # the twin has no fp64 path
    return impl


def _twin():
    from . import cuda_unload

    if not cuda_unload.available():
        raise RuntimeError("PLORA_UNLOAD_KERNEL=cuda needs nvcc (or $PLORA_CSRC_LIB, a prebuilt library) to build "
                           "csrc/plora_unload.cu")
    return cuda_unload


def _run(batches: list[tuple[str, list[int]]], merges: Sequence[Merge], write: bool,
         exact: bool = False) -> list[tuple[list[int], torch.Tensor]]:
    """One pass over the batches: the write, the quick check or the exact check. Returns (merge indices, flag
    tensor) per batch. An exact flag is 1 + the position in its batch of a merge with a non-finite result, or 0;
    the Triton kernel's quick flag is 1 when its batch needs the exact check (the other paths are always exact).
    """
    flags = []
    for path, idx in batches:
        if path == "triton":
            from .triton.unload import merge_group_

            flags.append((idx, merge_group_([merges[i] for i in idx], write=write, exact=exact)))
            continue
        for i in idx:  # one layer at a time
            m = merges[i]
            if path == "cuda":
                flag = _twin().merge_(m.weight, m.lora_A, m.lora_B, m.coef, m.rounding, m.seed, write=write,
                                      row_offset=m.row_offset)
            else:
                new = reference.merge_value(m.weight, m.lora_A, m.lora_B, m.coef, m.rounding, m.seed, m.row_offset)
                if write:
                    m.weight.copy_(new)
                flag = (~torch.isfinite(new)).any().to(torch.int32).reshape(1)
            flags.append(([i], flag))
    return flags


def _batches(merges: Sequence[Merge]) -> list[tuple[str, list[int]]]:
    """The merges by path, the Triton ones grouped by device and :func:`group_key`; empty weights are skipped."""
    out: dict = {}
    for i, m in enumerate(merges):
        if not m.weight.numel():
            continue
        path = merge_path(m)
        if path == "triton":
            from .triton.unload import group_key

            key = (path, m.weight.device, group_key(m))
        else:
            key = (path, m.weight.device, i)
        out.setdefault(key, (path, []))[1].append(i)
    return list(out.values())


def _flagged(flags: list[tuple[list[int], torch.Tensor]]) -> dict[int, int]:
    """{first merge index of a batch: its flag} for the batches whose flag is set; one host read per device."""
    by_device: dict = {}
    for idx, flag in flags:
        by_device.setdefault(flag.device, []).append((idx, flag))
    out = {}
    for items in by_device.values():
        values = torch.cat([f.reshape(1) for _, f in items]).tolist()
        out.update({idx[0]: int(v) for (idx, _), v in zip(items, values) if v})
    return out


def _first_bad(flags: list[tuple[list[int], torch.Tensor]]) -> int | None:
    """The index of a merge whose exact check failed, or None."""
    firsts = {idx[0]: idx for idx, _ in flags}
    return next((firsts[first][v - 1] for first, v in _flagged(flags).items()), None)


def _tied_runs(merges: Sequence[Merge]) -> list[list[int]]:
    """The merges in order, cut where a weight's storage repeats: a layer whose weight an earlier one in its run
    merges into (tied weights, or views of one storage) must be checked against that merge's result, so it
    starts the next run."""
    runs, seen = [[]], set()
    for i, m in enumerate(merges):
        storage = m.weight.untyped_storage().data_ptr() if m.weight.numel() else None
        if storage in seen:
            runs.append([])
            seen = set()
        runs[-1].append(i)
        if storage is not None:
            seen.add(storage)
    return [run for run in runs if run]


def merge_many_(merges: Sequence[Merge], labels: Sequence[str] | None = None,
                all_ranks: Callable[[bool], bool] | None = None) -> None:
    """Merge every ``Merge`` in place, or raise and change nothing (tied weights: see the module docstring).

    ``labels`` name the layers in error messages. ``all_ranks(flag)``, for row-sharded weights, returns the AND
    of ``flag`` over every rank holding a shard, so that an overflow on any rank raises on all of them before
    any rank writes.
    """
    labels = list(labels) if labels is not None else [""] * len(merges)
    with torch.no_grad():
        for run in _tied_runs(merges):
            part = [merges[i] for i in run]
            batches = _batches(part)
            flagged = _flagged(_run(batches, part, write=False))  # the one host read of an unload
            bad = next((idx[flagged[idx[0]] - 1] for path, idx in batches
                        if path != "triton" and idx[0] in flagged), None)  # those checks are exact
            suspect = [(path, idx) for path, idx in batches if path == "triton" and idx[0] in flagged]
            if bad is None and suspect:  # rare: a value near or past W's largest finite, or not finite
                bad = _first_bad(_run(suspect, part, write=False, exact=True))
            ok = bad is None
            if all_ranks is not None:
                ok = all_ranks(ok)
            if not ok:
                if bad is None:  # another rank's shard failed
                    raise overflow_error(part[0].weight, labels[run[0]]) from None
                raise _error(part[bad], labels[run[bad]])
            _run(batches, part, write=True)
            for path, idx in batches:
                if path != "torch":  # raw kernel writes are invisible to autograd's version counter otherwise
                    for i in idx:
                        torch.autograd.graph.increment_version(part[i].weight)


def stochastic(weight: torch.Tensor, rounding: str) -> bool:
    """Whether the merge draws a rounding stream: stochastic rounding into a 16-bit W."""
    return rounding == "stochastic" and weight.dtype in (torch.float16, torch.bfloat16)


def draw_seeds(weight, rounding, momentum, generator, seed=None) -> tuple[int, int]:
    """(rounding seed, fresh-A seed) of one unload, on the host. From ``seed`` when given; else drawn from
    ``generator`` in that order, each only when the unload needs it (0 otherwise)."""
    if seed is not None:
        return streams.seed_for(seed, 0), streams.seed_for(seed, 1)
    round_seed = streams.draw_seed(generator) if stochastic(weight, rounding) else 0
    init_seed = streams.draw_seed(generator) if momentum == 0.0 else 0
    return round_seed, init_seed


def reset_adapters_(lora_As, lora_Bs, momenta, init_seeds) -> None:
    """The adapters after an unload: m = 0 zeroes B (one multi-tensor op) and re-draws A (one launch per device
    and dtype on the kernel path); m > 0 scales B by m."""
    drawn: dict = {}
    for a, m, seed in zip(lora_As, momenta, init_seeds):
        if m == 0.0 and a.numel() and resolve("unload", a) != "torch":
            drawn.setdefault((a.device, a.dtype), ([], []))
            drawn[(a.device, a.dtype)][0].append(a)
            drawn[(a.device, a.dtype)][1].append(seed)
    if drawn:
        from .triton.unload import init_lora_A_group_

        for tensors, seeds in drawn.values():
            init_lora_A_group_(tensors, seeds)
    done = {id(a) for tensors, _ in drawn.values() for a in tensors}
    rest = [(a, b, m, s) for a, b, m, s in zip(lora_As, lora_Bs, momenta, init_seeds) if id(a) not in done]
    zero_b = [b for a, b, m, s in zip(lora_As, lora_Bs, momenta, init_seeds) if m == 0.0 and id(a) in done]
    if zero_b:
        torch._foreach_zero_(zero_b)
    if rest:
        reference.reset_factors_(*map(list, zip(*rest)))
