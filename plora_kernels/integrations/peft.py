"""PEFT interop: turn a PEFT LoRA model into a plain model with PLoRALinear layers (:func:`from_peft`)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.linear import PLoRALinear, check_layer_args
from ..nn.patching import LAYER_KWARGS, tied_weights, untie_config_, warn_untied
from ..ops.checks import article


def _alpha_for(scaling: float, r: int) -> float:
    """An ``alpha`` with ``alpha / r == scaling`` exactly in float arithmetic.

    PEFT's per-layer scaling is alpha/r, or alpha/sqrt(r) with rsLoRA, or an alpha_pattern/rank_pattern value;
    PLoRALinear stores (r, alpha) and computes alpha/r. ``scaling * r / r`` can miss ``scaling`` by an ulp when r
    is not a power of two, so the neighbours are tried too."""
    alpha = scaling * r
    for _ in range(4):
        if alpha / r == scaling:
            return alpha
        alpha = math.nextafter(alpha, math.inf if alpha / r < scaling else -math.inf)
    return scaling * r  # within an ulp of the scaling either way


def _lora_layer_types():
    try:
        from peft import PeftModel
        from peft.tuners.lora import Linear as LoraLinear, LoraLayer, LoraModel
        from peft.utils import ModulesToSaveWrapper
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"from_peft needs peft installed (pip install peft): {exc}") from exc
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - older peft: ModulesToSaveWrapper was the only wrapper
        AuxiliaryTrainingWrapper = ModulesToSaveWrapper
    return PeftModel, LoraModel, LoraLayer, LoraLinear, ModulesToSaveWrapper, AuxiliaryTrainingWrapper


def _check_layer(name: str, layer, lora_linear_cls) -> str:
    """The adapter name of a convertible PEFT LoRA layer; raises naming the layer and the reason otherwise."""
    where = f"from_peft: layer {name!r}"
    if type(layer) is not lora_linear_cls or type(layer.get_base_layer()) is not nn.Linear:
        kind, base = type(layer).__name__, type(layer.get_base_layer()).__name__
        raise TypeError(f"{where} is {article(kind)} on {article(base)}; only LoRA on plain nn.Linear layers can "
                        "become PLoRALinear (not Embedding, Conv, quantized or parameter-targeted layers)")
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(f"{where} holds adapters {adapters}; from_peft converts exactly one adapter "
                         "(delete the others with peft_model.delete_adapter(name), or merge them first)")
    name_ = adapters[0]
    if layer.disable_adapters or name_ not in layer.active_adapters:
        raise ValueError(f"{where}: adapter {name_!r} is disabled or not active, so the PEFT model does not use it; "
                         "enable it (peft_model.set_adapter / enable_adapter_layers) or unload it with PEFT")
    if layer.merged:
        raise ValueError(f"{where}: adapter {name_!r} is merged into the base weight; call "
                         "peft_model.unmerge_adapter() first")
    if layer.use_dora.get(name_, False) or getattr(layer, "lora_variant", {}).get(name_) is not None:
        raise ValueError(f"{where}: adapter {name_!r} is a LoRA variant (use_dora=True or another variant), whose "
                         "output is not x W^T + s (x A^T) B^T; PLoRALinear cannot represent it")
    if layer.lora_bias.get(name_, False):
        raise ValueError(f"{where}: adapter {name_!r} has lora_bias=True (a bias on lora_B); PLoRALinear has none")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{where}: fan_in_fan_out=True (a Conv1D-style transposed weight) is not supported")
    return name_


def from_peft(peft_model: nn.Module, **kw) -> nn.Module:
    """Turn a PEFT LoRA model into its base model with :class:`PLoRALinear` layers computing the same outputs.

    Every ``peft.tuners.lora.Linear`` is replaced by a PLoRALinear sharing the base layer's weight and bias
    (frozen) with a copy of ``lora_A``/``lora_B`` (trainable, even from a PEFT model loaded for inference; in
    their own dtype, PEFT's fp32-on-16-bit default included) and the layer's own scaling: ``alpha / r``,
    ``alpha / sqrt(r)`` with ``use_rslora`` and ``rank_pattern``/``alpha_pattern`` values all carry over,
    represented as ``alpha = scaling * r``.
    ``modules_to_save`` copies replace their originals (as PEFT's ``merge_and_unload`` does). Every other parameter,
    the base layers' weights and biases included (PEFT's ``bias="all"`` / ``"lora_only"`` train biases), keeps its
    ``requires_grad`` as PEFT set it. A LoRA layer whose base weight is tied to another parameter (e.g. an LM head
    tied to the input embedding) is untied with a warning: its PLoRALinear gets its own copy of the weight (see
    :mod:`plora_kernels.nn.patching`). Every layer is converted before the model is changed: an error leaves
    ``peft_model`` as it was.

    Args:
        peft_model: a ``peft.PeftModel`` (or its ``LoraModel``) with one LoRA adapter, active and not merged.
        **kw: passed to :meth:`PLoRALinear.from_linear` (``momentum``, ``rounding``, ``adapter_dtype``: by
            default each adapter keeps PEFT's dtype).

    Returns the unwrapped base model (e.g. the ``LlamaForCausalLM``), not a PeftModel; ``peft_model`` is
    consumed: its layers are moved into the result.

    Raises TypeError for a non-PEFT model or a LoRA layer on something other than nn.Linear, ValueError for
    what PLoRALinear cannot represent (DoRA or other variants, lora_bias, several or disabled adapters, merged
    adapters, fan_in_fan_out, trainable_token_indices). PEFT's ``lora_dropout`` is kept: PLoRALinear applies it
    to the adapter's input in training mode, as PEFT does.
    """
    PeftModel, LoraModel, LoraLayer, LoraLinear, ModulesToSaveWrapper, AuxWrapper = _lora_layer_types()
    unknown = sorted(set(kw) - set(LAYER_KWARGS))
    if unknown:
        raise TypeError(f"from_peft got unexpected keyword arguments {unknown}; it takes {', '.join(LAYER_KWARGS)} "
                        "(r and alpha come from the PEFT adapter)")
    check_layer_args(1, 1.0, **kw)
    if isinstance(peft_model, PeftModel):
        tuner = peft_model.base_model
    elif isinstance(peft_model, LoraModel):
        tuner = peft_model
    else:
        raise TypeError(f"peft_model must be a peft.PeftModel or LoraModel, got {type(peft_model).__name__}")
    if not isinstance(tuner, LoraModel):
        raise TypeError(f"peft_model must hold a LoRA adapter (a LoraModel), got {type(tuner).__name__}")
    configs = getattr(tuner, "peft_config", {})
    if len(configs) > 1:
        raise ValueError(f"peft_model has adapters {sorted(configs)}; from_peft converts exactly one")
    model = tuner.model

    lora_layers, wrappers = [], []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            lora_layers.append((name, module))
        elif isinstance(module, AuxWrapper):
            if not isinstance(module, ModulesToSaveWrapper):
                raise ValueError(f"from_peft: {name!r} is {article(type(module).__name__)} (e.g. "
                                 "trainable_token_indices); only modules_to_save wrappers are supported")
            wrappers.append((name, module))
    if not lora_layers:
        raise ValueError("peft_model has no LoRA layers")
    checked = [(name, layer, _check_layer(name, layer, LoraLinear)) for name, layer in lora_layers]


    # every layer is converted before the first one replaces its PEFT layer: an error changes nothing
    tied = tied_weights(model, [(f"{name}.base_layer", layer.get_base_layer()) for name, layer, _ in checked])
    converted = []
    for name, layer, adapter in checked:
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        r, scaling = down.shape[0], float(layer.scaling[adapter])
        base = layer.get_base_layer()
        dropout = layer.lora_dropout[adapter]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0  # PEFT's p = 0 is an nn.Identity
        new = PLoRALinear.from_linear(base, r=r, alpha=_alpha_for(scaling, r),
                                      **{"adapter_dtype": down.dtype, "lora_dropout": p, **kw})
        new.train(layer.training)  # the PEFT layer's mode: dropout only where PEFT would have applied it
        with torch.no_grad():
            new.lora_A.copy_(down)
            new.lora_B.copy_(up)
        if f"{name}.base_layer" in tied:  # tied (e.g. an LM head to the input embedding): this layer's own copy
            new.weight = nn.Parameter(new.weight.detach().clone(), requires_grad=False)
        # PEFT's bias="all" / "lora_only" train the base layer's bias (and a user may have unfrozen W): keep that
        new.weight.requires_grad_(base.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(base.bias.requires_grad)
        new.train(layer.training)
        converted.append((name, new))
    for name, new in converted:
        model.set_submodule(name, new)
    if tied:
        untie_config_(model)
        warn_untied("from_peft", {name.removesuffix(".base_layer"): others for name, others in tied.items()})
    for name, wrapper in wrappers:
        # PEFT's own unloading of a modules_to_save wrapper: the active trained copy (or the original if none)
        model.set_submodule(name, wrapper.unload_and_optionally_merge_module(merge=False, safe_merge=False,
                                                                             adapter_names=None))
    if "peft_config" in vars(model):
        # PEFT attaches its config to the base model; with no PEFT layer left it would mislead PEFT and
        # transformers (as in PEFT's own unload)
        del model.peft_config
    return model
