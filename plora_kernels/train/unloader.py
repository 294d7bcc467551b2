"""PeriodicUnloader: the PeriodicLoRA stage driver for a plain training loop."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.linear import unload_layers_
from ..nn.patching import plora_layers
from ..ops import streams

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
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        named = list(plora_layers(model))
        self.layers = [layer for _, layer in named]
        self.names = [name for name, _ in named]
        if not self.layers:
            raise ValueError("model has no PLoRALinear layers; call plora_kernels.apply_plora(model) first")
        if optimizer_reset is None:
            optimizer_reset = "zero" if all(layer.momentum == 0 for layer in self.layers) else "scale"
        if optimizer_reset not in OPTIMIZER_RESETS:
            raise ValueError(f"optimizer_reset must be one of {OPTIMIZER_RESETS} or None, got {optimizer_reset!r}")
        self.optimizer, self.every, self.optimizer_reset, self.seed = optimizer, every, optimizer_reset, int(seed)
        self.step_count = 0
        self.num_unloads = 0

    def step(self) -> bool:
        """Count one optimizer step; unload when a stage ends. Returns True if it unloaded."""
        self.step_count += 1
        if self.step_count % self.every:
            return False
        self.unload()
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
        return {"every": self.every, "step_count": self.step_count, "num_unloads": self.num_unloads,
                "seed": self.seed, "optimizer_reset": self.optimizer_reset}

    def load_state_dict(self, state: dict) -> None:
        if state["every"] != self.every:
            raise ValueError(f"checkpoint has every={state['every']} but this unloader has every={self.every}")
        self.step_count, self.num_unloads = int(state["step_count"]), int(state["num_unloads"])
        self.seed, self.optimizer_reset = int(state["seed"]), state["optimizer_reset"]
