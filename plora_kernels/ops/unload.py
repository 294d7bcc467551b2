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

    Refused with ValueError, naming the specs, before anything changes: the same layer twice (its update would be
    merged twice), one lora_A shared by layers of momentum 0 and > 0, one lora_B shared by layers of which one has
    momentum > 0 (see ``_check_no_repeats``), and a factor sharing memory with another layer's weight.
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
    _check_no_repeats(specs)
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


def _spec_name(specs: Sequence[UnloadSpec], k: int) -> str:
    return f"specs[{k}]" + (f" ({specs[k].label})" if specs[k].label else "")


def _check_no_repeats(specs: Sequence[UnloadSpec]) -> None:
    """Factors that two specs share, where the unload would go wrong (checked before anything is written):

    - the same layer twice (one weight, one lora_A, one lora_B): its update would be merged twice;
    - one lora_A for layers of momentum 0 and momentum > 0: the m = 0 unload re-draws the A that the m > 0 layer
      keeps (with its B scaled by m), which changes that layer's function;
    - one lora_B for layers of which one has momentum > 0: each unload scales (or zeroes) B, so it would be scaled
      twice, m_i m_j, or zeroed under the m > 0 layer.

    Layers sharing one weight with their own factors are fine (they merge in turn), and so are factors shared by
    layers that all reset them the same way (all m = 0, or lora_A with all m > 0). Linear in the number of layers
    (only specs whose factors share a storage are compared)."""
    if len(specs) < 2:
        return
    groups: dict = {}
    for i, s in enumerate(specs):
        for kind in ("lora_A", "lora_B"):
            t = _local(getattr(s, kind))
            if t.numel() and not t.is_meta:
                groups.setdefault((kind, t.device, t.untyped_storage().data_ptr()), []).append(i)
    for (kind, _, _), idx in groups.items():
        for n, i in enumerate(idx):
            for j in idx[n + 1:]:
                si, sj = specs[i], specs[j]
                if not shares_memory(_local(getattr(si, kind)), _local(getattr(sj, kind))):
                    continue
                other = "lora_B" if kind == "lora_A" else "lora_A"
                wi, wj, oi, oj = (_local(x) for x in (si.weight, sj.weight, getattr(si, other), getattr(sj, other)))
                if shares_memory(oi, oj) and (shares_memory(wi, wj) or (not wi.numel() and wi is wj)):
                    raise ValueError(f"{_spec_name(specs, j)} repeats {_spec_name(specs, i)}: the same layer (weight, "
                                     "lora_A and lora_B) twice would merge its update twice; pass each layer once")
                mi, mj = float(si.momentum), float(sj.momentum)
                if kind == "lora_A" and (mi == 0.0) != (mj == 0.0):
                    raise ValueError(f"{_spec_name(specs, j)}.lora_A is the lora_A of {_spec_name(specs, i)} (one "
                                     f"storage), with momentum {mj} and {mi}: the momentum-0 unload re-draws lora_A "
                                     "while the other keeps it with lora_B scaled, which would change that layer's "
                                     "output; give each layer its own lora_A, or both momentum 0 or both > 0")
                if kind == "lora_B" and (mi > 0.0 or mj > 0.0):
                    raise ValueError(f"{_spec_name(specs, j)}.lora_B is the lora_B of {_spec_name(specs, i)} (one "
                                     f"storage), with momentum {mj} and {mi}: each unload resets lora_B (zeroes it "
                                     "at momentum 0, scales it by m > 0), so a shared lora_B would be reset twice; "
                                     "give each layer its own lora_B")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, else the tensor."""
    return t.to_local() if is_dtensor(t) else t


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
                    what = [_spec_name(specs, k) for k in (i, j)]
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
