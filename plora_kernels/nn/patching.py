"""Model patching: put PLoRALinear layers into a model, unload them all, merge them back out."""
from __future__ import annotations

import re
from typing import Iterable, Iterator

from torch import nn

from .linear import PLoRALinear, unload_layers_


def plora_layers(model: nn.Module) -> Iterator[tuple[str, PLoRALinear]]:
    """(name, layer) for every PLoRALinear in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, PLoRALinear):
            yield name, module


def _output_head_ids(model: nn.Module) -> set[int]:
    """ids of the LM head and of any Linear tied to the input embedding: never adapted by default."""
    ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Linear):
        ids.add(id(head))
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is not None and hasattr(emb, "weight"):
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight is emb.weight:
                ids.add(id(module))
    return ids


def _matcher(target_modules: str | Iterable[str] | None):
    if target_modules is None:
        return None
    if isinstance(target_modules, str):  # as PEFT: a string is a regex matched against the full name
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) for s in suffixes):
        raise TypeError(f"target_modules must be None, a regex string or a non-empty list of names, got {target_modules!r}")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_plora(model: nn.Module, target_modules: str | Iterable[str] | None = None, r: int = 8,
                alpha: float = 16, **kw) -> nn.Module:
    """Replace matching nn.Linear layers by PLoRALinear (in place) and freeze everything but the adapters.

    Args:
        target_modules: None for every nn.Linear except the LM head / a Linear tied to the input
            embedding; a list of names matched as PEFT does (exact or dotted suffix, e.g. "q_proj"); or a
            regex string matched against the full module name.
        r, alpha, **kw: passed to :meth:`PLoRALinear.from_linear` (momentum, rounding, adapter_dtype).

    Returns the same model. Raises ValueError if nothing matched.
    """
    match = _matcher(target_modules)
    skip = _output_head_ids(model) if match is None else set()
    chosen = [(name, m) for name, m in model.named_modules()
              if type(m) is nn.Linear and id(m) not in skip and (match is None or match(name))]
    if not chosen:
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear; linear layers are: {linears[:20]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        _set_submodule(model, name, PLoRALinear.from_linear(linear, r=r, alpha=alpha, **kw))
    return model


def unload_all_(model: nn.Module, generator=None) -> int:
    """Unload every PLoRALinear in ``model`` together (one host sync on the kernel path; an error changes no
    layer there); returns how many were unloaded. A shared ``generator`` is consumed in the fixed order
    :func:`plora_kernels.ops.unload.unload_many_` documents."""
    named = list(plora_layers(model))
    unload_layers_([layer for _, layer in named], [generator] * len(named), [name for name, _ in named])
    return len(named)


def merge_plora(model: nn.Module) -> nn.Module:
    """Replace every PLoRALinear by a plain nn.Linear holding the merged weight (in place); returns the model."""
    for name, layer in list(plora_layers(model)):
        _set_submodule(model, name, layer.merged_linear())
    return model
