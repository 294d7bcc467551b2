"""Training drivers: periodic unloading, the study's rule for the unload interval, and the stage-aware LR schedule."""
from .schedule import stage_cosine_schedule, stage_lr_factor
from .unloader import PeriodicUnloader, auto_every, unload_generator, unload_seed

__all__ = ["PeriodicUnloader", "auto_every", "stage_cosine_schedule", "stage_lr_factor", "unload_generator",
           "unload_seed"]
