"""Ops: the pure-torch reference, the Triton kernels and the autograd/torch.library glue around them."""
from .lora_linear import lora_linear
from .unload import unload_

__all__ = ["lora_linear", "unload_"]
