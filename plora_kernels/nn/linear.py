"""PLoRALinear: a drop-in nn.Linear with a periodically unloaded LoRA adapter."""
from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn

from ..ops import lora_linear
from ..ops.checks import (
    FLOAT_DTYPES,
    check_dropout,
    check_factors,
    check_generator,
    check_int,
    check_momentum,
    check_real,
    check_rounding,
    check_scaling,
)
from ..ops.merge import Merge, merge_many_
from ..ops.reference import init_lora_A_
from ..ops.unload import UnloadSpec, unload_many_

HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_rounding(dtype: torch.dtype) -> str:
    """Stochastic for 16-bit weights, where nearest rounding erases updates below half an ulp; "nearest" for
    fp32/fp64 weights, where the rounding is not used (an fp32 merge rounds the fp32 sum, an fp64 one does not
    round)."""
    return "stochastic" if dtype in HALF_DTYPES else "nearest"


class PLoRALinear(nn.Module):
    """``y = x W^T + b + (alpha / r) (x A^T) B^T`` with W, b frozen and A, B trainable (PEFT's names).

    ``unload_()`` merges the adapter into W (one rounding) and resets it, see :func:`plora_kernels.unload_`.

    Args:
        in_features, out_features, bias: as nn.Linear.
        r: adapter rank. alpha: LoRA alpha; ``scaling = alpha / r``.
        momentum: fraction of the adapter kept at each unload (0: merge all and re-initialise).
        rounding: "nearest" or "stochastic"; None (the default) decides at each unload from W's dtype *then*:
            stochastic for fp16/bf16 weights, nothing to choose for fp32/fp64. So a layer built in fp32 and cast
            later (``model.to(torch.bfloat16)``, ``model.half()``) rounds stochastically. ``layer.rounding`` reads
            the rounding the next unload uses; setting it to None goes back to following W. An explicit
            "nearest" into a 16-bit W warns once per layer (it erases updates below half an ulp).
        adapter_dtype: dtype of lora_A/lora_B; None keeps fp32 adapters on a 16-bit base (PEFT's default). A cast
            of the layer (``.to(dtype)``, ``.half()``) casts the adapters too: see :meth:`adapters_to_`.
        lora_dropout: dropout probability on the adapter's input, in training mode only (PEFT's semantics); its
            mask is regenerated from a seed, never stored (see :func:`plora_kernels.lora_linear`).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, bias: bool = True, *,
                 momentum: float = 0.0, rounding: str | None = None, device=None, dtype=None,
                 adapter_dtype: torch.dtype | None = None, lora_dropout: float = 0.0):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            check_int(name, value, minimum=0, error=TypeError)
        momentum = check_layer_args(r, alpha, momentum, rounding, adapter_dtype, lora_dropout)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool (whether the layer has a bias), got {type(bias).__name__}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point dtype (fp16/bf16/fp32/fp64) or None, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=adapter_dtype))
        self.r, self.alpha = r, alpha
        self.momentum = momentum
        self.lora_dropout = float(lora_dropout)
        self.rounding = rounding  # None: decided from W's dtype at each unload (the property below)
        self.register_buffer("num_unloads", torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def rounding(self) -> str:
        """The rounding the next unload uses: the one set explicitly, or (None) the default for W's current dtype,
        "stochastic" for fp16/bf16 and "nearest" (unused) for fp32/fp64."""
        explicit = vars(self).get("_rounding", vars(self).get("rounding"))  # (a layer pickled by an older release)
        return explicit or default_rounding(self.weight.dtype)

    @rounding.setter
    def rounding(self, value: str | None) -> None:
        self._rounding = check_rounding(value, allow_none=True)

    @property
    def rounding_is_explicit(self) -> bool:
        """Whether ``rounding`` was set ("nearest"/"stochastic") rather than following W's dtype (None)."""
        return vars(self).get("_rounding", vars(self).get("rounding")) is not None

    @torch.no_grad()
    def adapters_to_(self, dtype: torch.dtype = torch.float32) -> "PLoRALinear":
        """Cast lora_A and lora_B (and their gradients) to ``dtype`` in place, keeping the Parameter objects (an
        optimizer built before still holds them; cast before its first step, whose state takes their dtype).
        ``model.to(torch.bfloat16)`` casts the adapters with the base; the recommended setup is fp32 adapters on a
        16-bit base (PEFT's default, and what ``apply_plora`` gives a model already in 16 bits)::

            model.to(torch.bfloat16)
            for _, layer in plora_kernels.plora_layers(model):
                layer.adapters_to_(torch.float32)

        Returns the layer. TypeError for a dtype that is not fp16/bf16/fp32/fp64."""
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point dtype (fp16/bf16/fp32/fp64), got {dtype!r}")
        for p in (self.lora_A, self.lora_B):
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
                if p.grad is not None:
                    p.grad = p.grad.to(dtype)
        return self

    def reset_parameters(self) -> None:
        """Base weight as nn.Linear; adapter as PEFT (A kaiming-uniform, B zero, so the adapter starts at 0)."""
        if self.weight.numel():  # nn.Linear(0, n) is allowed; init warns on an empty tensor
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        check_generator(generator)
        if self.lora_A.shape[1]:  # in_features = 0 (as nn.Linear allows): A is empty, nothing to draw
            init_lora_A_(self.lora_A, generator)
        self.lora_B.zero_()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, **kw) -> "PLoRALinear":
        """Wrap an existing nn.Linear; its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_layer_args(r, alpha, kw.get("momentum", 0.0), kw.get("rounding"), kw.get("adapter_dtype"))
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r, alpha, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype, **kw)
        layer.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        adapter_dtype = layer.lora_A.dtype
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=adapter_dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=adapter_dtype))
        layer.num_unloads = torch.zeros((), dtype=torch.long, device=w.device)
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias,
                           self.lora_dropout if self.training else 0.0)

    def unload_(self, generator: torch.Generator | None = None) -> None:
        """Merge the adapter into the weight (momentum rule, one rounding) and reset it; counts unloads. The
        rounding is :attr:`rounding` at this moment (from W's dtype now, unless set); the adapters' gradients are
        dropped (``.grad = None``): they belong to the adapter before the unload."""
        unload_layers_([self], [generator])

    def unload_spec(self, generator: torch.Generator | None = None, label: str = "",
                    seed: int | None = None) -> UnloadSpec:
        """This layer's arguments to :func:`plora_kernels.ops.unload.unload_many_`."""
        return UnloadSpec(self.weight, self.lora_A, self.lora_B, self.scaling, self.momentum, self.rounding,
                          generator, label, seed)  # self.rounding: decided from W's dtype now, if not set

    @torch.no_grad()
    def merged_linear(self, label: str = "") -> nn.Linear:
        """A plain nn.Linear with weight round_nearest(W + s B A); this layer is left unchanged (and no random
        generator is consumed). Raises ValueError, naming ``label``, if the merged weight would not be finite."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        if self.weight.device.type == "meta":
            raise ValueError(f"merge_plora: layer {label!r} is on the meta device (it holds no data); materialise the "
                             "model first")
        check_factors(self.weight, self.lora_A, self.lora_B)
        scaling = check_scaling(self.scaling)
        # the checked merge on a copy of W: one new W-sized tensor and no fp32 W-sized delta; A and B are only read
        weight = self.weight.detach().clone()
        merge_many_([Merge(weight, self.lora_A.detach(), self.lora_B.detach(), scaling, "nearest")], [label])
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, momentum={self.momentum}, rounding={self.rounding!r}"
                f"{'' if self.rounding_is_explicit else ' (from W dtype)'}, "
                f"lora_dropout={self.lora_dropout}, "
                f"unloads={int(self.num_unloads)}")


def check_layer_args(r, alpha, momentum=0.0, rounding=None, adapter_dtype=None, lora_dropout=0.0) -> float:
    """The adapter arguments of :class:`PLoRALinear` (and of apply_plora / from_linear): r a positive int, alpha a
    finite non-zero real, momentum in [0, 1), rounding "nearest", "stochastic" or None, adapter_dtype a float dtype
    or None.
    Returns the momentum as a float. Raises TypeError / ValueError naming the argument."""
    check_int("r", r, minimum=1)
    if check_real("alpha", alpha) == 0.0:
        raise ValueError("alpha must be non-zero: scaling = alpha / r = 0 makes the adapter add nothing and get no "
                         "gradient")
    momentum = check_momentum(momentum)
    check_rounding(rounding, allow_none=True)
    check_dropout(lora_dropout)
    if adapter_dtype is not None and adapter_dtype not in FLOAT_DTYPES:
        raise TypeError(f"adapter_dtype must be a floating-point dtype (fp16/bf16/fp32/fp64) or None, got "
                        f"{adapter_dtype!r}")
    return momentum


def unload_layers_(layers, generators=None, labels=None, seeds=None) -> None:
    """Unload PLoRALinear layers together and count the unloads: on the kernel path they share their checks
    and one host sync (see :func:`plora_kernels.ops.unload.unload_many_`), and nothing changes on an error.
    Each layer rounds as its :attr:`PLoRALinear.rounding` says now (W's current dtype unless set); after the
    unload the adapters' ``.grad`` are None, and an explicit rounding="nearest" into a 16-bit W warns (once per
    layer).

    ``generators``: one per layer (or None: torch's default CPU generator); ``seeds``: one int per layer instead
    (the random streams derive from it on the host); ``labels``: names for error messages.
    """
    layers = list(layers)
    generators = [None] * len(layers) if generators is None else list(generators)
    seeds = [None] * len(layers) if seeds is None else list(seeds)
    labels = [""] * len(layers) if labels is None else list(labels)
    if not len(generators) == len(labels) == len(seeds) == len(layers):
        raise ValueError(f"got {len(layers)} layers, {len(generators)} generators, {len(seeds)} seeds and "
                         f"{len(labels)} labels")
    unload_many_([layer.unload_spec(g, name, seed) for layer, g, name, seed in zip(layers, generators, labels, seeds)])
    if layers:
        torch._foreach_add_([layer.num_unloads for layer in layers], 1)
    for layer in layers:
        # a gradient computed for the adapter before the unload (e.g. half of an accumulated one) belongs to the
        # old A and B: it must never update the fresh A (or the scaled B)
        layer.lora_A.grad = None
        layer.lora_B.grad = None
    _warn_nearest_into_16_bit(layers, labels)


# layers already warned about an explicit rounding="nearest" into a 16-bit weight (once per layer, so once per
# model: a model's layers unload together)
_WARNED_NEAREST: weakref.WeakSet = weakref.WeakSet()


def _warn_nearest_into_16_bit(layers, labels) -> None:
    named = [(layer, label) for layer, label in zip(layers, labels)
             if layer.rounding_is_explicit and layer.rounding == "nearest" and layer.weight.dtype in HALF_DTYPES
             and layer not in _WARNED_NEAREST]
    if not named:
        return
    for layer, _ in named:
        _WARNED_NEAREST.add(layer)
    dtypes = sorted({str(layer.weight.dtype) for layer, _ in named})
    names = [repr(label) for _, label in named if label]
    if names:
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        who = f"PLoRALinear layer{'s' if len(named) > 1 else ''} {shown}"
    else:
        who = f"{len(named)} PLoRALinear layer{'s' if len(named) > 1 else ''}"
    warnings.warn(
        f"{who}: rounding='nearest' set explicitly, with a {' / '.join(dtypes)} weight: round-to-nearest erases "
        "the part of every unload's update below half an ulp of W (2^-9 of |W| in bf16, 2^-12 in fp16), at every "
        "unload, so small stage updates never reach W. Use rounding=None (decided from W's dtype at each unload: "
        "stochastic for fp16/bf16; e.g. layer.rounding = None) or 'stochastic'. To keep 'nearest' and silence this: "
        "warnings.filterwarnings('ignore', message=\".*rounding='nearest'\"). (Warned once per layer.)",
        UserWarning, stacklevel=4)  # the caller of unload_ / unload_all_ / PeriodicUnloader.unload
