"""Model patching: put PLoRALinear layers into a model, unload them all, merge them back out.

Tied weights. A Linear whose weight is shared with another parameter of the model (an LM head tied to the input
embedding, two Linear layers holding one Parameter) cannot carry an adapter that is periodically merged into that
weight: every unload would move the other module too, and the model's output would jump at each stage. The
policy, the same everywhere:

- :func:`apply_plora` and :func:`plora_kernels.integrations.from_peft` untie such a layer, with a warning: the
  PLoRALinear gets its own copy of the weight, the other modules keep the original, and the model's
  ``config.tie_word_embeddings`` is set to False so that transformers does not tie them again;
- :func:`merge_plora` gives each merged layer its own weight (the function the model computed is kept), so a
  layer that was tied again after patching is untied, with the same warning;
- :func:`unload_all_` and :class:`plora_kernels.PeriodicUnloader` refuse a layer whose weight is shared, and
  change nothing.

The PLoRA record. :func:`apply_plora` records each call's settings on the model (target_modules, r, alpha,
momentum, rounding, lora_dropout, adapter_dtype, the number of layers it patched, with a format version and the
package version): on a transformers model as ``model.config.plora``, which transformers writes into every
``config.json`` (``save_pretrained`` and so each Trainer ``checkpoint-N``) with no hook; on any other module as an
attribute, which :func:`plora_kernels.save_plora` writes to ``plora_config.json``. :func:`plora_kernels.load_plora`
replays it to rebuild the patched model and refuses a checkpoint patched differently. :func:`merge_plora` clears it
(the merged model is plain).
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from ..ops.checks import shares_memory
from .linear import PLoRALinear, check_layer_args, unload_layers_

LAYER_KWARGS = ("momentum", "rounding", "adapter_dtype", "lora_dropout")

# The PLoRA record (see the module docstring). RECORD_FORMAT goes up when a reader of an older format could
# misread a newer record; plora_kernels.load_plora refuses a format it does not know.
RECORD_FORMAT = 1
RECORD_KEY = "plora"                 # model.config.plora on a transformers model, hence "plora" in config.json
_RECORD_ATTR = "_plora_record"       # on any other module
RECORD_SETTINGS = ("target_modules", "r", "alpha", "momentum", "rounding", "lora_dropout", "adapter_dtype")


def _check_model(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")


def plora_layers(model: nn.Module) -> Iterator[tuple[str, PLoRALinear]]:
    """(name, layer) for every PLoRALinear in ``model``, in module order."""
    _check_model(model, "plora_layers")
    return ((name, module) for name, module in model.named_modules() if isinstance(module, PLoRALinear))


# --------------------------------------------------------------------------------------------- the record
def record_config(model: nn.Module):
    """The transformers config that carries the record into config.json, or None for another module."""
    config = getattr(model, "config", None)
    if (config is not None and callable(getattr(config, "to_json_string", None))
            and callable(getattr(model, "save_pretrained", None))):
        return config
    return None


def plora_record(model: nn.Module) -> dict | None:
    """The PLoRA record of ``model`` (a copy): ``{"format", "package_version", "calls": [settings of each
    apply_plora call]}``, or None when nothing is recorded (see the module docstring)."""
    config = record_config(model)
    record = getattr(config, RECORD_KEY, None) if config is not None else vars(model).get(_RECORD_ATTR)
    return copy.deepcopy(record) if record is not None else None


def set_plora_record(model: nn.Module, record: dict | None) -> None:
    """Store ``record`` (a copy) as the model's PLoRA record; None removes it."""
    config = record_config(model)
    if record is None:
        if config is not None and hasattr(config, RECORD_KEY):
            delattr(config, RECORD_KEY)
        vars(model).pop(_RECORD_ATTR, None)
        return
    record = copy.deepcopy(record)
    if config is not None:
        setattr(config, RECORD_KEY, record)
    else:
        vars(model)[_RECORD_ATTR] = record


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _new_record(calls: list[dict]) -> dict:
    from ..version import VERSION

    return {"format": RECORD_FORMAT, "package_version": VERSION, "calls": calls}


def _call_settings(target_modules, r, alpha, momentum, kw, layers: int) -> dict:
    """One apply_plora call's settings, JSON-ready (target_modules as given: None, a regex string, or the sorted
    names)."""
    targets = target_modules if target_modules is None or isinstance(target_modules, str) else \
        sorted(set(target_modules))
    return {"target_modules": targets, "r": int(r), "alpha": float(alpha), "momentum": float(momentum),
            "rounding": kw.get("rounding"), "lora_dropout": float(kw.get("lora_dropout", 0.0)),
            "adapter_dtype": _dtype_name(kw.get("adapter_dtype")), "layers": layers}


def snapshot_record(model: nn.Module) -> dict | None:
    """A record that rebuilds the model's PLoRALinear layers as they are now, for layers no apply_plora call
    recorded (made by ``from_peft`` or by hand): one call per group of equal settings, targeting the layers by
    their full names. None for a model without PLoRALinear layers."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in plora_layers(model):
        rounding = layer.rounding if layer.rounding_is_explicit else None
        key = (layer.r, float(layer.alpha), float(layer.momentum), rounding, float(layer.lora_dropout),
               _dtype_name(layer.lora_A.dtype))
        groups.setdefault(key, []).append(name)
    if not groups:
        return None
    calls = [{"target_modules": sorted(names), "r": r, "alpha": alpha, "momentum": m, "rounding": rounding,
              "lora_dropout": p, "adapter_dtype": dtype, "layers": len(names)}
             for (r, alpha, m, rounding, p, dtype), names in groups.items()]
    return _new_record(calls)


def _warn_stale_record(fn: str, stacklevel: int = 4) -> None:
    warnings.warn(f"{fn}: this model's config records a PLoRA patch (config.{RECORD_KEY}) but the model holds no "
                  "PLoRALinear layer. If it was loaded with from_pretrained from a checkpoint saved before merge_plora "
                  "(a Trainer checkpoint-N, or save_pretrained of a patched model), from_pretrained dropped the live "
                  "adapters (lora_A, lora_B) and the model computes something else than the one saved: load it with "
                  "plora_kernels.load_plora(ModelClass, path) instead. The old record is replaced",
                  UserWarning, stacklevel=stacklevel)


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


def module_matcher(target_modules):
    if target_modules is None:
        return None
    if isinstance(target_modules, str):  # as PEFT: a string is a regex matched against the full name
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {exc}") from None
        return lambda name: pattern.fullmatch(name) is not None
    expected = "None, a regex string or a non-empty list of module names"
    if isinstance(target_modules, (bytes, nn.Module)) or not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules must be {expected}, got {target_modules!r} ({type(target_modules).__name__})")
    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise TypeError(f"target_modules must be {expected}, got {target_modules!r}")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every name it has in ``model``}: a module used at several places (weight sharing by module
    reuse) has several names; named_modules() reports only the first."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        out.setdefault(id(module), []).append(name)
    return out


def _replace(model: nn.Module, aliases: dict[int, list[str]], old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place ``old`` is used."""
    for name in aliases[id(old)]:
        _set_submodule(model, name, new)


def _is_dtensor(t) -> bool:
    from ..ops.sharded import is_dtensor

    return is_dtensor(t)


def _memory_key(t):
    """Tensors that may share memory have equal keys: (device, storage address); a meta tensor, which has no
    memory, is keyed by its identity. None for DTensors (their local shards are FSDP2's business)."""
    if _is_dtensor(t):
        return None
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device, t.untyped_storage().data_ptr())


def tied_weights(model: nn.Module, layers: Iterable[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """{layer name: names of the other parameters and buffers of ``model`` sharing memory with its weight} for each
    (name, layer) of ``layers`` whose weight is tied (the same Parameter, or a view of its storage). The layer's
    own weight under each of its names (a module used at several places) is not a tie."""
    holders: dict = {}
    for other, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if t is not None and (key := _memory_key(t)) is not None:
            holders.setdefault(key, []).append((other, t))
    aliases = _aliases(model)
    out = {}
    for name, layer in layers:
        w = layer.weight
        key = _memory_key(w)
        own = {f"{alias}.weight" if alias else "weight" for alias in aliases.get(id(layer), [name])}
        others = [other for other, t in holders.get(key, ()) if other not in own
                  and (t is w or (key[0] != "meta" and shares_memory(t, w)))] if key is not None else []
        if others:
            out[name] = others
    return out


def untie_config_(model: nn.Module) -> None:
    """Keep transformers from tying the weights again (``tie_weights`` reads ``config.tie_word_embeddings``)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def warn_untied(fn: str, tied: dict[str, list[str]], stacklevel: int = 3) -> None:
    pairs = "; ".join(f"{name} (tied to {', '.join(others)})" for name, others in tied.items())
    warnings.warn(f"{fn}: untied {pairs}: each adapted layer now has its own copy of the weight and the other "
                  "modules keep the original, since an unload or merge into a shared weight would change them too; "
                  "config.tie_word_embeddings was set to False", UserWarning, stacklevel=stacklevel)


def apply_plora(model: nn.Module, target_modules: str | Iterable[str] | None = None, r: int = 8,
                alpha: float = 16, **kw) -> nn.Module:
    """Replace matching nn.Linear layers by PLoRALinear (in place) and freeze everything but the adapters.

    Args:
        target_modules: None for every nn.Linear except the LM head / a Linear tied to the input
            embedding; a list of names matched as PEFT does (exact or dotted suffix, e.g. "q_proj"); or a
            regex string matched against the full module name.
        r, alpha, **kw: passed to :meth:`PLoRALinear.from_linear` (momentum, rounding, adapter_dtype, lora_dropout).

    May be called several times (e.g. a different r per group of modules): layers that are already PLoRALinear
    are left as they are, and their adapters stay trainable. A targeted Linear whose weight is tied to another
    parameter (e.g. an LM head tied to the input embedding) is untied with a warning (see the module docstring).

    The call's settings are recorded on the model (``model.config.plora`` on a transformers model, so in every
    config.json it saves; see the module docstring), which :func:`plora_kernels.load_plora` replays to restore a
    checkpoint saved before :func:`merge_plora`.

    Returns the same model. Raises TypeError / ValueError naming the argument for bad arguments and ValueError if
    nothing matched; every check runs before the model is changed, so an error leaves it as it was.
    """
    _check_model(model, "apply_plora")
    if isinstance(model, (nn.Linear, PLoRALinear)):
        raise TypeError(f"apply_plora: model is itself a {type(model).__name__}; apply_plora patches the layers "
                        "inside a model in place and cannot replace the model object. Use "
                        "PLoRALinear.from_linear(layer, r=..., alpha=...) for one layer, or wrap it: "
                        "apply_plora(nn.Sequential(layer))")
    unknown = sorted(set(kw) - set(LAYER_KWARGS))
    if unknown:
        raise TypeError(f"apply_plora got unexpected keyword arguments {unknown}; it takes target_modules, r, alpha "
                        f"and {', '.join(LAYER_KWARGS)}")
    return patch_model(model, target_modules, r, alpha, kw, replay=False)


def _targets(target_modules):
    """target_modules with an iterator read once into a list (it is matched, then recorded)."""
    if target_modules is None or isinstance(target_modules, (str, bytes, nn.Module)) \
            or not isinstance(target_modules, Iterable):
        return target_modules
    return list(target_modules)


def _select(model: nn.Module, target_modules, taken: set[int] = frozenset()) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) that apply_plora(model, target_modules) patches, leaving out the modules whose ids
    are in ``taken`` (those an earlier call of a plan patches). Raises for a bad target_modules."""
    match = module_matcher(target_modules)
    skip = _output_head_ids(model) if match is None else set()
    return [(name, m) for name, m in model.named_modules()
            if name and type(m) is nn.Linear and id(m) not in skip and id(m) not in taken
            and (match is None or match(name))]


def plan_calls(model: nn.Module, calls: list[dict]) -> list[list[str]]:
    """The names of the layers each recorded apply_plora call would patch in ``model``, replayed in order,
    without changing the model. ValueError (naming the call) for a call that would patch nothing."""
    taken: set[int] = set()
    out = []
    for i, call in enumerate(calls):
        chosen = _select(model, call["target_modules"], taken)
        if not chosen:
            raise ValueError(f"apply_plora call {i + 1} of {len(calls)} in the record (target_modules="
                             f"{call['target_modules']!r}) matches no nn.Linear of this model")
        taken.update(id(m) for _, m in chosen)
        out.append([name for name, _ in chosen])
    return out


def patch_model(model: nn.Module, target_modules, r, alpha, kw: dict, replay: bool) -> nn.Module:
    """apply_plora once its model and keywords are checked; ``replay``: rebuilding a recorded call (no warning
    about an untied weight or a stale record: the run that made the record gave them)."""
    target_modules = _targets(target_modules)
    momentum = check_layer_args(r, alpha, **kw)
    chosen = _select(model, target_modules)
    if not chosen:
        match = module_matcher(target_modules)
        done = [name for name, _ in plora_layers(model) if match is None or match(name)]
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        hint = f"; already PLoRALinear: {done[:20]}" if done else ""
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear; linear layers are: "
                         f"{linears[:20]}{hint}")
    before = list(plora_layers(model))
    earlier = {id(p) for _, layer in before for p in (layer.lora_A, layer.lora_B)}
    record = plora_record(model)
    if record is not None and not before:  # a record without layers: stale (see _warn_stale_record)
        if not replay:
            _warn_stale_record("apply_plora")
        record = None
    elif record is None and before:  # layers no call recorded (from_peft, by hand): record them as they are
        record = snapshot_record(model)
    tied = tied_weights(model, chosen)
    # everything that can fail is done: build the new layers (this draws their A's), then change the model
    new = [(name, PLoRALinear.from_linear(linear, r=r, alpha=alpha, **kw)) for name, linear in chosen]
    for p in model.parameters():
        if id(p) not in earlier:  # an earlier call's adapters keep their requires_grad
            p.requires_grad_(False)
    aliases = _aliases(model)
    for (name, layer), (_, linear) in zip(new, chosen):
        if name in tied:
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        _replace(model, aliases, linear, layer)  # at every place the Linear is used
    if tied:
        untie_config_(model)
        if not replay:
            warn_untied("apply_plora", tied, stacklevel=4)
    record = record or _new_record([])
    record["calls"].append(_call_settings(target_modules, r, alpha, momentum, kw, len(new)))
    set_plora_record(model, record)
    return model


def check_untied(model: nn.Module, named: list[tuple[str, PLoRALinear]], fn: str) -> None:
    """Refuse PLoRALinear layers whose weight another parameter of ``model`` shares (see the module docstring)."""
    for name, others in tied_weights(model, named).items():
        raise ValueError(f"{fn}: the weight of PLoRALinear {name!r} is shared with {others} (tied); an unload would "
                         "change them too. apply_plora and from_peft untie such layers; give the layer its own "
                         "weight (layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)) "
                         "or stop targeting it")


def unload_all_(model: nn.Module, generator=None) -> int:
    """Unload every PLoRALinear in ``model`` together (one host sync on the kernel path; an error changes no
    layer there); returns how many were unloaded. A shared ``generator`` is consumed in the fixed order
    :func:`plora_kernels.ops.unload.unload_many_` documents. Refuses a layer whose weight is tied to another
    parameter of the model (see the module docstring)."""
    _check_model(model, "unload_all_")
    named = list(plora_layers(model))
    check_untied(model, named, "unload_all_")
    unload_layers_([layer for _, layer in named], [generator] * len(named), [name for name, _ in named])
    return len(named)


def merge_plora(model: nn.Module) -> nn.Module:
    """Replace every PLoRALinear by a plain nn.Linear holding the merged weight (in place); returns the model.

    All or nothing: every merged layer is computed (and checked: a merge that would not be finite raises, naming
    the layer) before the first one replaces its PLoRALinear. No random generator is consumed. Each merged layer
    has its own weight: one tied to another parameter is untied, with a warning (see the module docstring). The
    PLoRA record is removed: the merged model is a plain one.
    """
    _check_model(model, "merge_plora")
    if isinstance(model, PLoRALinear):
        raise TypeError("merge_plora: model is itself a PLoRALinear; merge_plora replaces the layers inside a model "
                        "in place and cannot replace the model object. Use layer.merged_linear() for one layer")
    named = list(plora_layers(model))
    tied = tied_weights(model, named)
    merged = [(layer, layer.merged_linear(name)) for name, layer in named]
    aliases = _aliases(model)
    for layer, linear in merged:
        _replace(model, aliases, layer, linear)  # at every place the layer is used
    set_plora_record(model, None)  # the merged model is plain: nothing for load_plora to patch
    if tied:
        untie_config_(model)
        warn_untied("merge_plora", tied)
    return model
