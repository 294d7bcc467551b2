"""PeriodicUnloader: the PeriodicLoRA stage driver for a plain training loop."""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ..nn.linear import unload_layers_
from ..nn.patching import check_untied, plora_layers
from ..ops import streams
from ..ops.checks import check_int

OPTIMIZER_RESETS = ("zero", "scale", "keep")


def unload_seed(seed: int, unload_index: int, layer_index: int) -> int:
    """The seed of one layer's unload, a pure function of (seed, unload, layer), computed on the host.

    Deriving it rather than drawing from a global RNG makes every data-parallel rank draw the same fresh
    lora_A and the same stochastic rounding, and makes a resumed run repeat the uninterrupted one.
    """
    return streams.seed_for(seed, unload_index, layer_index)


def unload_generator(seed: int, unload_index: int, layer_index: int, device) -> torch.Generator:
    """A generator for one layer's unload, a pure function of (seed, unload, layer), for APIs that take one
    (``unload_``, ``unload_dtensor_``)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + unload_index * 10_007 + layer_index) % (2**63 - 1))
    return g


class PeriodicUnloader:
    """Unload every PLoRALinear of ``model`` every ``every`` optimizer steps and reset their Adam state.

    Call :meth:`step` once after each ``optimizer.step()``.

    Args:
        model: a model holding PLoRALinear layers (see :func:`plora_kernels.apply_plora`).
        optimizer: the optimizer over the adapters; its per-parameter state for lora_A/lora_B is reset.
        every: stage length in optimizer steps.
        optimizer_reset: "zero" (moments and step count zeroed: a fresh Adam for the adapter), "scale"
            (moments multiplied by the layer's momentum), or "keep". None: "zero" when every layer has
            momentum 0, else "scale".
        seed: base seed for the fresh lora_A draws and stochastic rounding (same on every rank).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, every: int, *,
                 optimizer_reset: str | None = None, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module holding PLoRALinear layers, got {type(model).__name__}")
        check_optimizer(optimizer)
        check_int("every", every, minimum=1)
        seed = check_int("seed", seed, error=TypeError)
        if optimizer_reset is not None and optimizer_reset not in OPTIMIZER_RESETS:
            raise ValueError(f"optimizer_reset must be one of {OPTIMIZER_RESETS} or None, got {optimizer_reset!r}")
        named = list(plora_layers(model))
        self.layers = [layer for _, layer in named]
        self.names = [name for name, _ in named]
        if not self.layers:
            raise ValueError("model has no PLoRALinear layers; call plora_kernels.apply_plora(model) first")
        check_untied(model, named, "PeriodicUnloader")
        if optimizer is not None:
            held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())}
            if not any(id(p) in held for layer in self.layers for p in (layer.lora_A, layer.lora_B)):
                warnings.warn("PeriodicUnloader: the optimizer holds none of the adapters' parameters (lora_A, "
                              "lora_B), so it does not train them and their optimizer state is never reset; build the "
                              "optimizer after apply_plora, over the model's trainable parameters", stacklevel=2)
        if optimizer_reset is None:
            optimizer_reset = "zero" if all(layer.momentum == 0 for layer in self.layers) else "scale"
        self.optimizer, self.every, self.optimizer_reset, self.seed = optimizer, every, optimizer_reset, seed
        self.step_count = 0
        self.num_unloads = 0

    def step(self) -> bool:
        """Count one optimizer step; unload when a stage ends. Returns True if it unloaded. If the unload raises
        (e.g. a merge that would not be finite), nothing changes, the step count included."""
        if (self.step_count + 1) % self.every:
            self.step_count += 1
            return False
        self.unload()
        self.step_count += 1
        return True

    @torch.no_grad()
    def unload(self) -> None:
        """Unload every layer now (together: one host sync on the kernel path) and reset the adapters'
        optimizer state per policy."""
        seeds = [unload_seed(self.seed, self.num_unloads, i) for i in range(len(self.layers))]
        unload_layers_(self.layers, labels=self.names, seeds=seeds)
        self._reset_optimizer_state()
        self.num_unloads += 1

    def _reset_optimizer_state(self) -> None:
        if self.optimizer is None or self.optimizer_reset == "keep":
            return
        zero = []
        for layer in self.layers:
            for p in (layer.lora_A, layer.lora_B):
                for key, value in self.optimizer.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if self.optimizer_reset == "zero":
                        zero.append(value)  # moments and the step count: Adam's bias correction restarts too
                    elif key != "step" and value.shape == p.shape:
                        value.mul_(layer.momentum)  # as B: not _foreach_mul_, which rounds the scalar first
        if zero:
            torch._foreach_zero_(zero)  # one multi-tensor launch per device and dtype, not a few per layer

    def state_dict(self) -> dict:
        """The stage position and the unload settings, plus the layers (their number and names) it drives, which
        :meth:`load_state_dict` checks: the per-layer random streams derive from each layer's index."""
        return {"every": self.every, "step_count": self.step_count, "num_unloads": self.num_unloads,
                "seed": self.seed, "optimizer_reset": self.optimizer_reset, "num_layers": len(self.layers),
                "layer_names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. Every entry is checked before any is applied (ValueError or
        TypeError naming the key; the unloader is unchanged on an error). ``num_layers`` and ``layer_names`` are
        optional (older checkpoints lack them); when present they must match this unloader's layers, compared
        without the names' DDP / torch.compile / FSDP wrapper prefixes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict (PeriodicUnloader.state_dict()), got {type(state).__name__}")
        missing = [k for k in ("every", "step_count", "num_unloads", "seed", "optimizer_reset") if k not in state]
        if missing:
            raise ValueError(f"state is missing the keys {missing}; expected the dict PeriodicUnloader.state_dict() "
                             f"returns, got keys {sorted(state)}")
        every = check_int("state['every']", state["every"], minimum=1)
        if every != self.every:
            raise ValueError(f"checkpoint has every={every} but this unloader has every={self.every}")
        step_count = check_int("state['step_count']", state["step_count"], minimum=0)
        num_unloads = check_int("state['num_unloads']", state["num_unloads"], minimum=0)
        seed = check_int("state['seed']", state["seed"], error=TypeError)
        reset = state["optimizer_reset"]
        if reset not in OPTIMIZER_RESETS:
            raise ValueError(f"state['optimizer_reset'] must be one of {OPTIMIZER_RESETS}, got {reset!r}")
        if state.get("num_layers") is not None:
            n = check_int("state['num_layers']", state["num_layers"], minimum=0)
            if n != len(self.layers):
                raise ValueError(f"state['num_layers'] is {n} but this unloader drives {len(self.layers)} PLoRALinear "
                                 "layers: the checkpoint is from another model (or another apply_plora targeting)")
        if state.get("layer_names") is not None:
            names = state["layer_names"]
            if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
                raise TypeError(f"state['layer_names'] must be a list of str, got {type(names).__name__}")
            ours = [_plain_name(x) for x in self.names]
            theirs = [_plain_name(x) for x in names]
            if theirs != ours:
                diff = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
                raise ValueError(f"state['layer_names'] does not match this unloader's layers (first difference at "
                                 f"index {diff}: {theirs[diff:diff + 1]} vs {ours[diff:diff + 1]}; {len(theirs)} vs "
                                 f"{len(ours)} layers): the checkpoint is from another model")
        self.step_count, self.num_unloads, self.seed, self.optimizer_reset = step_count, num_unloads, seed, reset


# module-name components that wrappers (DDP, DataParallel, torch.compile, FSDP1, activation checkpointing) insert
_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def _plain_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def check_optimizer(optimizer) -> None:
    """None, a torch optimizer, or an optimizer-like object with a ``state`` mapping (what the reset touches)."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return
    if not isinstance(getattr(optimizer, "state", None), Mapping):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None), got {type(optimizer).__name__}")
