"""Bridges to the Hugging Face stack.

    plora_kernels.integrations.transformers.PLoRACallback   periodic unloading inside a transformers.Trainer
    plora_kernels.integrations.from_peft                     a PEFT LoRA model -> a plain model with PLoRALinear

Both submodules import their library (transformers, peft) when they are imported, so this package stays
importable without either; ``from_peft`` is resolved on first use for the same reason.
"""
from __future__ import annotations

__all__ = ["from_peft", "PLoRACallback"]


def __getattr__(name: str):
    # lazy: importing plora_kernels.integrations must not import peft or transformers (seconds, optional deps)
    if name == "from_peft":
        from .peft import from_peft

        return from_peft
    if name == "PLoRACallback":
        from .transformers import PLoRACallback

        return PLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
