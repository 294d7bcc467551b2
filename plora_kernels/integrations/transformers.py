"""PeriodicLoRA inside a ``transformers.Trainer``: :class:`PLoRACallback`.

Two lines in a Trainer script::

    model = plora_kernels.apply_plora(model, r=16, alpha=32)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[PLoRACallback()])

``PLoRACallback()`` picks the unload interval from the run's length (``every="auto"``, the rule of
:func:`plora_kernels.auto_every`); ``PLoRACallback(every=500)`` fixes it.

The callback drives a :class:`plora_kernels.PeriodicUnloader` (built from the Trainer's model and optimizer
when training begins), so the unload rule, the optimizer-state reset and the per-unload seeds are exactly
those of a plain training loop. Its state rides in the Trainer's checkpoints, so
``trainer.train(resume_from_checkpoint=...)`` repeats the uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..nn.patching import RECORD_KEY, plora_layers
from ..ops.checks import check_int, check_momentum
from ..train.unloader import (
    OPTIMIZER_RESETS,
    PeriodicUnloader,
    auto_every,
    check_every,
    is_auto,
    no_plora_layers_error,
    warn_auto_without_unload,
)

STATE_FILE = "plora_state.json"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / DeepSpeed (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (and similar ``.optimizer`` wrappers).

    The wrapper forwards ``.state`` today; unwrapping makes the reset touch the real state whatever it forwards."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def merged_update_sq_norm(model: nn.Module) -> torch.Tensor | None:
    """Sum over PLoRALinear layers of ``||(1 - m) s B A||_F^2``: the squared norm of what an unload merges now.

    ``||B A||_F^2 = trace((BᵀB)(AAᵀ))``: two r×r Gram matrices per layer, never the out×in product B A.
    Returns a 0-d fp32 tensor on the first layer's device (no host sync), or None without layers."""
    return _sq_norm([layer for _, layer in plora_layers(model)])


@torch.no_grad()
def _sq_norm(layers) -> torch.Tensor | None:
    total = None
    for layer in layers:
        a, b = layer.lora_A.float(), layer.lora_B.float()
        # both Grams are symmetric, so the trace of their product is the sum of their elementwise product
        sq = ((b.t() @ b) * (a @ a.t())).sum().clamp_min(0.0)
        sq = sq * ((1.0 - layer.momentum) * layer.scaling) ** 2
        total = sq if total is None else total + sq.to(total.device)
    return total


def save_merged(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write ``model`` with ``save_pretrained`` as the plain model :func:`plora_kernels.merge_plora` would make of it
    (each PLoRALinear's weight merged and rounded once, no adapters, no PLoRA record in its config), without
    changing it: the state dict is built one layer at a time, each merged weight moved to the CPU."""
    layers = dict(plora_layers(model))
    state = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            if leaf not in ("weight", "bias"):
                continue  # lora_A, lora_B and the unload count: a plain Linear has none
            if leaf == "weight":
                value = layers[owner].merged_linear(owner).weight
        state[key] = value.detach().to("cpu")
    config = getattr(model, "config", None)
    record = config.__dict__.pop(RECORD_KEY, None) if config is not None else None
    try:
        model.save_pretrained(folder, state_dict=state)
    finally:
        if record is not None:
            setattr(config, RECORD_KEY, record)


class PLoRACallback(TrainerCallback, ExportableState):
    """Unload every PLoRALinear of the Trainer's model every ``every`` optimizer steps.

    A Trainer "step" (``state.global_step``) is an optimizer step: with ``gradient_accumulation_steps=k`` an
    unload happens every ``every * k`` micro-batches. The stages count the optimizer steps that really happened
    (the :class:`PeriodicUnloader`'s step hook): a step the fp16 GradScaler skips on an overflow advances
    ``global_step`` but not the stage. The unload runs in ``on_step_end``, after the optimizer and LR-scheduler
    steps of that step and before the Trainer logs or saves it, so a checkpoint written at an unload step already
    holds the merged weights.

    Args:
        every: stage length in optimizer steps, or "auto" (the default): :func:`plora_kernels.auto_every` of
            the Trainer's ``state.max_steps``, chosen when training begins (ValueError if max_steps is unknown).
            That is ``max(80, max_steps // 10)``, or no unload at all (plain LoRA, with a UserWarning) for a run of
            fewer than 400 steps, the rule ``plora study`` found. The resolved int is what checkpoints store.
        momentum: if given, set as ``momentum`` on every PLoRALinear when training begins (fraction of the
            adapter kept at each unload, in [0, 1)); None keeps each layer's own value.
        optimizer_reset: the adapters' optimizer-state policy at an unload, "zero", "scale" or "keep"; None
            picks "zero" when every layer has momentum 0, else "scale" (see :class:`PeriodicUnloader`).
        seed: base seed of the fresh lora_A draws and of stochastic rounding (the same on every rank).
        merged_output: if given, a folder where the end of training writes the model merged (plain nn.Linear
            layers holding W + s B A, rounded once to nearest, as :func:`plora_kernels.merge_plora` gives) with
            ``save_pretrained``, on the main process: a checkpoint any transformers install loads. The training
            model is left as it is; one layer's merged weight at a time is made, then moved to the CPU.

    Logs (added to each Trainer log after the first unload): ``plora/unloads`` (unloads so far) and
    ``plora/delta_norm`` (Frobenius norm, over all layers together, of the update merged at the last unload).
    Reporting integrations (``report_to``) registered before this callback receive its logs only if it is
    moved to the front: ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(PLoRACallback))``.

    Checkpoints: the unloader's state is stored in ``trainer_state.json`` (transformers' stateful-callback
    record, which travels with the checkpoint folder wherever it is copied) and, for people and tools, in
    ``plora_state.json`` next to it. On resume the callback reads it back itself, so
    ``restore_callback_states_from_checkpoint`` need not be set.
    """

    def __init__(self, every: int | str = "auto", momentum: float | None = None, optimizer_reset: str | None = None,
                 seed: int = 0, merged_output: str | os.PathLike | None = None):
        # checked here as well as in PeriodicUnloader so that a bad value fails when the Trainer is built,
        # not minutes later when training begins
        if not is_auto(every):
            every = check_every(every)  # optimizer steps per stage
        if momentum is not None:
            momentum = check_momentum(momentum)
        if optimizer_reset is not None and optimizer_reset not in OPTIMIZER_RESETS:
            raise ValueError(f"optimizer_reset must be one of {OPTIMIZER_RESETS} or None, got {optimizer_reset!r}")
        check_int("seed", seed, error=TypeError)
        if merged_output is not None and not isinstance(merged_output, (str, os.PathLike)):
            raise TypeError(f"merged_output must be a folder path or None, got {type(merged_output).__name__}")
        self.every, self.momentum, self.optimizer_reset, self.seed = every, momentum, optimizer_reset, seed
        self.merged_output = merged_output
        self.unloader: PeriodicUnloader | None = None
        self._global_step: int | None = None  # the Trainer step the unloader's state belongs to
        self.last_delta_norm: float | None = None
        self._pending_sq_norm: torch.Tensor | None = None  # of the last unload; read only when logging

    # ------------------------------------------------------------------------------------------ driver
    def _resolve_every(self, state) -> int:
        """``every`` as steps: the int given, or for "auto" :func:`auto_every` of the Trainer's ``max_steps``."""
        if not is_auto(self.every):
            return self.every
        max_steps = getattr(state, "max_steps", None)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
            raise ValueError(f"PLoRACallback(every='auto') chooses the unload interval from the run's length, but the "
                             f"Trainer's state.max_steps is {max_steps!r}; set TrainingArguments(max_steps=...) (or "
                             "num_train_epochs with a dataset of known length), or pass an int every")
        return auto_every(max_steps)

    def _build(self, model, optimizer, state) -> PeriodicUnloader:
        """The unloader for ``model``; the layers' momentum is set by :meth:`_apply_momentum` once nothing else can
        fail (an error leaves the model as it was)."""
        if model is None:
            raise ValueError("PLoRACallback needs the Trainer's model (the callback kwarg 'model' was None)")
        model = unwrap_model(model)
        if next(plora_layers(model), None) is None:
            raise no_plora_layers_error(model, "PLoRACallback")
        every = self._resolve_every(state)
        reset = self.optimizer_reset
        if reset is None and self.momentum is not None:  # PeriodicUnloader's default once every layer has it
            reset = "zero" if self.momentum == 0 else "scale"
        return PeriodicUnloader(model, unwrap_optimizer(optimizer), every, optimizer_reset=reset, seed=self.seed)

    def _apply_momentum(self, unloader: PeriodicUnloader) -> None:
        if self.momentum is not None:
            for layer in unloader.layers:
                layer.momentum = float(self.momentum)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # rebuilt on every train() call: the Trainer may have made a new optimizer (or been given a new model)
        unloader = self._build(model, optimizer, state)
        last = self._restore(unloader, args, state) if state.global_step > 0 else None  # resumed from a checkpoint
        max_steps = getattr(state, "max_steps", None)
        if isinstance(max_steps, int) and 0 < max_steps < unloader.every:
            if is_auto(self.every):
                warn_auto_without_unload("PLoRACallback", "max_steps", max_steps)
            else:
                warnings.warn(f"PLoRACallback: every={self.every} is more than the run's max_steps={max_steps}: no "
                              "unload will happen (this trains plain LoRA)", UserWarning, stacklevel=2)
        self._apply_momentum(unloader)
        self.unloader, self.last_delta_norm, self._pending_sq_norm = unloader, last, None
        self._global_step = state.global_step

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.unloader is None:
            unloader = self._build(model, optimizer, state)
            self._apply_momentum(unloader)
            if unloader.counts_optimizer_steps:
                unloader._pending += 1  # built after this step's optimizer step, which its hook did not see
            self.unloader = unloader
        u = self.unloader
        if u.will_unload():  # u.step() below ends the stage and unloads
            # the unload resets the factors: measure what it merges first, on the layers it unloads
            self._pending_sq_norm = _sq_norm(u.layers)
        u.step()  # counts the optimizer steps that happened: none if this one was skipped (fp16 overflow)
        self._global_step = state.global_step

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.merged_output is not None and state.is_world_process_zero and model is not None:
            save_merged(getattr(model, "module", model), self.merged_output)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.unloader is None or self.unloader.num_unloads == 0 or logs is None:
            return
        extra = {"plora/unloads": self.unloader.num_unloads, "plora/delta_norm": self._delta_norm()}
        logs.update(extra)
        # the Trainer appended a copy of ``logs`` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def _delta_norm(self) -> float | None:
        if self._pending_sq_norm is not None:
            self.last_delta_norm = math.sqrt(float(self._pending_sq_norm))
            self._pending_sq_norm = None
        return self.last_delta_norm

    # ------------------------------------------------------------------------------------- checkpoints
    def _saved_state(self) -> dict:
        if self.unloader is not None:
            saved = self.unloader.state_dict()
            if self._global_step is not None:
                saved["global_step"] = self._global_step  # step_count counts real optimizer steps only
        else:  # the Trainer asks before training begins (TrainerState init): a stage driver at step 0 (with
            # every="auto" still unresolved: the run's length is not known yet)
            saved = {"every": self.every, "step_count": 0, "num_unloads": 0, "seed": self.seed,
                     "optimizer_reset": self.optimizer_reset}
        saved["last_delta_norm"] = self._delta_norm()
        return saved

    def state(self) -> dict:
        """ExportableState: what ``trainer_state.json`` records (``args`` rebuild the callback)."""
        return {"args": {"every": self.every, "momentum": self.momentum, "optimizer_reset": self.optimizer_reset,
                         "seed": self.seed},
                "attributes": {"_checkpoint_state": self._saved_state()}}

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):  # e.g. hyperparameter search writes into per-trial folders
            warnings.warn(f"PLoRACallback: checkpoint folder {folder} not found; {STATE_FILE} not written "
                          "(the state is still in trainer_state.json)", stacklevel=2)
            return
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(self._saved_state(), f, indent=1)

    def _restore(self, unloader: PeriodicUnloader, args, state) -> float | None:
        """Load the checkpoint's PLoRA state into ``unloader`` (checked first: an error changes nothing); returns
        the saved ``last_delta_norm``."""
        saved = self._find_saved_state(args, state)
        if saved is None:
            # a checkpoint written without this callback: the stage position follows from the step count alone
            # if ``every`` never changed, which is the best available guess
            warnings.warn(f"PLoRACallback: resuming at step {state.global_step} but the checkpoint has no PLoRA "
                          f"state; assuming every={unloader.every} held throughout", stacklevel=3)
            saved = {"every": unloader.every, "step_count": state.global_step,
                     "num_unloads": state.global_step // unloader.every, "seed": unloader.seed,
                     "optimizer_reset": unloader.optimizer_reset}
        if not isinstance(saved, dict):
            raise ValueError(f"PLoRA state in the checkpoint must be a dict, got {type(saved).__name__}")
        # the Trainer step the state was saved at: "global_step" (the unloader's step_count counts only optimizer
        # steps that happened, fewer when fp16 overflows skipped some); checkpoints before it had step_count
        saved_at = saved.get("global_step", saved.get("step_count"))
        if saved_at is not None and saved_at != state.global_step:
            raise ValueError(f"PLoRA state in the checkpoint is at step {saved_at} but the Trainer "
                             f"resumes at step {state.global_step}; the checkpoint is inconsistent")
        unloader.load_state_dict(saved)
        return saved.get("last_delta_norm")

    def _find_saved_state(self, args, state) -> dict | None:
        record = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(record, list):  # several callbacks of this class: transformers keeps a list
            record = record[0] if record else None
        if isinstance(record, dict) and "_checkpoint_state" in record.get("attributes", {}):
            return record["attributes"]["_checkpoint_state"]
        folders = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folders.insert(0, args.resume_from_checkpoint)
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    return json.load(f)
        return None
