"""plora_kernels: Triton (and CUDA) kernels for PeriodicLoRA training.

    lora_linear(x, weight, lora_A, lora_B, scaling, bias=None)   fused, differentiable LoRA linear
    unload_(weight, lora_A, lora_B, scaling, *, momentum, rounding, generator)   in-place merge + reset
    PLoRALinear, apply_plora, unload_all_, merge_plora           module layer
    PeriodicUnloader, stage_cosine_schedule                      training driver
    load_plora(model_or_class, path), save_plora(model, path)    checkpoints that restore exactly or refuse
    auto_every(total_steps)                                      the study's unload interval for a run
    implementation(lora_linear=..., unload=...)                  choose an op's implementation in a block
"""
from ._backend import implementation
from .checkpoint import load_plora, save_plora
from .nn import PLoRALinear, apply_plora, merge_plora, plora_layers, unload_all_
from .ops import lora_linear, unload_
from .train import PeriodicUnloader, auto_every, stage_cosine_schedule
from .version import VERSION

__version__ = VERSION
__all__ = [
    "lora_linear", "unload_", "PLoRALinear", "apply_plora", "unload_all_", "merge_plora", "plora_layers",
    "PeriodicUnloader", "stage_cosine_schedule", "auto_every", "implementation", "load_plora", "save_plora",
]
