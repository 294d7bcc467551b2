"""Module layer: PLoRALinear and model patching."""
from .linear import PLoRALinear
from .patching import apply_plora, merge_plora, plora_layers, unload_all_

__all__ = ["PLoRALinear", "apply_plora", "merge_plora", "plora_layers", "unload_all_"]
