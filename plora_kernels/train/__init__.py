"""Training drivers: periodic unloading and the stage-aware LR schedule."""
from .schedule import stage_cosine_schedule, stage_lr_factor
from .unloader import PeriodicUnloader, unload_generator, unload_seed

__all__ = ["PeriodicUnloader", "stage_cosine_schedule", "stage_lr_factor", "unload_generator", "unload_seed"]
