"""unload_: merge the adapter into the base weight in place with one rounding, then reset the adapter.

The rule (this package's; docs/design.md): with c = 1 - momentum,
    W <- round(W + c * s * B A)          computed in fp32 (fp64 for an fp64 W), rounded once into W's dtype
    m = 0: B <- 0, A <- a fresh nn.Linear-style draw;   m > 0: B <- m B, A kept
so for m > 0 the layer's output is unchanged up to rounding: (W + c s B A) + s (m B) A = W + s B A.

Safety: an unload that would put a non-finite value into W raises and leaves W, A, B bit-identical; the check
is exact (ops.merge). Many layers at once (:func:`unload_many_`, used by ``unload_all_`` and
``PeriodicUnloader``): on the kernel path every layer of a model is merged by a few grouped launches with one
host sync, the fresh A's are drawn in one more launch, and B's reset is a multi-tensor op.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .checks import check_generator_device, check_seed, check_unload_args, shares_memory
from .merge import Merge, draw_seeds, merge_many_, reset_adapters_
from .sharded import check_sharded_generator as _check_sharded_generator, is_dtensor, unload_dtensor_


class UnloadSpec(NamedTuple):
    """One layer's unload: the arguments of :func:`unload_`, a label for error messages, and optionally ``seed``,
    an int from which the layer's random streams derive (it replaces ``generator``; the unload driver passes a
    pure function of (seed, unload index, layer))."""
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    momentum: float = 0.0
    rounding: str = "nearest"
    generator: torch.Generator | None = None
    label: str = ""
    seed: int | None = None


def unload_many_(specs: Sequence[UnloadSpec]) -> None:
    """:func:`unload_` for many layers at once: the same result per layer, at a fraction of the overhead.

    Each ``UnloadSpec`` holds one layer's ``unload_`` arguments (and a ``label`` that error messages name). Every
    argument and every merge is checked before the first write, so an error changes no layer (layers sharing one
    weight are merged one after another, each checked against the result of the one before). FSDP2 layers
    (DTensors) are unloaded one by one with :func:`plora_kernels.ops.sharded.unload_dtensor_`, after the others.

    A generator shared by several layers is consumed in layer order: each layer's rounding seed, then its
    fresh-A seed. Per-layer generators give exactly what per-layer ``unload_`` calls give.
    """
    if isinstance(specs, UnloadSpec) or not isinstance(specs, (list, tuple)):
        raise TypeError(f"specs must be a list of UnloadSpec, got {type(specs).__name__}")
    plain, sharded = [], []
    for i, spec in enumerate(specs):
        if not isinstance(spec, UnloadSpec):
            raise TypeError(f"specs[{i}] must be an UnloadSpec, got {type(spec).__name__}")
        try:
            check_seed(spec.seed)
            scaling, momentum = check_unload_args(spec.weight, spec.lora_A, spec.lora_B, spec.scaling, spec.momentum,
                                                  spec.rounding)
            if is_dtensor(spec.weight):  # unloaded by unload_dtensor_ below; its arguments are checked here, up front
                _check_sharded_generator(spec.weight.to_local(), spec.rounding, momentum, spec.generator, spec.seed)
            else:
                check_generator_device(spec.generator, spec.weight)
        except (TypeError, ValueError) as exc:
            if not spec.label:
                raise
            raise type(exc)(f"unload_ ({spec.label}): {exc}") from None  # which layer, in a model-wide unload
        if is_dtensor(spec.weight):
            sharded.append(spec)
        else:
            plain.append(spec._replace(scaling=scaling, momentum=momentum))
    _check_no_cross_overlap(plain)
    # the generators the seeds are drawn from, restored if the merge refuses: an error consumes no random numbers
    generators = {id(g): g for g in (s.generator if s.generator is not None else torch.default_generator
                                     for s in plain if s.seed is None)}
    saved = [(g, g.get_state()) for g in generators.values()]
    try:
        seeds = [draw_seeds(s.weight, s.rounding, s.momentum, s.generator, s.seed) for s in plain]
        merges = [Merge(s.weight, s.lora_A, s.lora_B, (1.0 - s.momentum) * s.scaling, s.rounding, rs)
                  for s, (rs, _) in zip(plain, seeds)]
        with torch.no_grad():
            merge_many_(merges, [s.label for s in plain])
    except Exception:
        for g, state in saved:
            g.set_state(state)
        raise
    with torch.no_grad():
        reset_adapters_([s.lora_A for s in plain], [s.lora_B for s in plain], [s.momentum for s in plain],
                        [init for _, init in seeds])
    for s in sharded:
        unload_dtensor_(s.weight, s.lora_A, s.lora_B, s.scaling, momentum=s.momentum, rounding=s.rounding,
                        generator=s.generator, seed=s.seed)


def _check_no_cross_overlap(specs: Sequence[UnloadSpec]) -> None:
    """No layer's A or B may share memory with another layer's W: the merges write every W while reading every A
    and B (layers sharing one W are fine: they are merged in turn). Linear in the number of layers."""
    if len(specs) < 2:
        return
    weights: dict = {}
    for i, s in enumerate(specs):
        if s.weight.numel():
            weights.setdefault(s.weight.untyped_storage().data_ptr(), []).append(i)
    for j, t in enumerate(specs):
        for name, f in (("lora_A", t.lora_A), ("lora_B", t.lora_B)):
            if not f.numel():
                continue
            for i in weights.get(f.untyped_storage().data_ptr(), ()):
                if i != j and shares_memory(specs[i].weight, f):
                    what = [f"specs[{k}]" + (f" ({specs[k].label})" if specs[k].label else "") for k in (i, j)]
                    raise ValueError(f"{what[1]}.{name} shares memory with {what[0]}.weight; an unload writes W "
                                     "while it reads the factors, so they must be separate tensors")


def unload_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
            momentum: float = 0.0, rounding: str = "nearest", generator: torch.Generator | None = None) -> None:
    """Merge ``scaling * lora_B @ lora_A`` into ``weight`` in place and reset the adapter (PeriodicLoRA).

    Args:
        weight: (out, in) base weight, fp16/bf16/fp32/fp64; updated in place with ONE rounding.
        lora_A: (r, in), lora_B: (out, r), any float dtype; reset in place.
        scaling: alpha / r.
        momentum: m in [0, 1). W gets (1 - m) of the update; m = 0 zeroes B and re-draws A
            (kaiming-uniform, a=sqrt(5)), m > 0 keeps A and scales B by m.
        rounding: "nearest" (round-to-nearest-even) or "stochastic" (unbiased; reproducible from
            ``generator``). Ignored for fp32 and fp64 weights.
        generator: torch.Generator the rounding stream's and A's fresh draw's seeds come from (None: torch's
            default CPU generator). It is read on the host only: a CUDA generator costs no device sync.

    Raises ValueError/TypeError for bad arguments, and ValueError if the merge would write a non-finite
    value into W; in every error case weight, lora_A and lora_B are left bit-identical.

    FSDP2 parameters (DTensors) are unloaded shard by shard without gathering W, see
    :func:`plora_kernels.ops.sharded.unload_dtensor_`. Many layers: :func:`unload_many_`.
    """
    unload_many_([UnloadSpec(weight, lora_A, lora_B, scaling, momentum, rounding, generator)])
