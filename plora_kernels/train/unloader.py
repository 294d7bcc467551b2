"""PeriodicUnloader: the PeriodicLoRA stage driver for a plain training loop."""
from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ..nn.linear import unload_layers_
from ..nn.patching import check_untied, plora_layers
from ..ops import streams
from ..ops.checks import check_int

OPTIMIZER_RESETS = ("zero", "scale", "keep")

# The rule of :func:`auto_every` (see its docstring for the evidence): stages of at least AUTO_MIN_STAGE steps,
# at most AUTO_MAX_STAGES of them, and no unload in a run with room for fewer than AUTO_MIN_STAGES stages.
AUTO_MIN_STAGE = 80
AUTO_MIN_STAGES = 5
AUTO_MAX_STAGES = 10
AUTO_MIN_STEPS = AUTO_MIN_STAGES * AUTO_MIN_STAGE  # 400: a shorter run does not unload


def auto_every(total_steps: int, *, min_stage: int = AUTO_MIN_STAGE, min_stages: int = AUTO_MIN_STAGES,
               max_stages: int = AUTO_MAX_STAGES) -> int:
    """The unload interval (optimizer steps per stage) for a run of ``total_steps`` optimizer steps.

    With the defaults: a run of fewer than 400 steps gets ``total_steps + 1``, an interval longer than the run,
    which means *never unload*: :class:`PeriodicUnloader` then makes no unload and
    :func:`stage_cosine_schedule` has one stage, which is plain LoRA. A run of 400 steps or more gets
    ``max(80, total_steps // 10)``: stages of at least 80 steps and at most about 10 of them (5 to 10 stages).
    For example 400 -> 80, 800 -> 80, 1000 -> 100, 5000 -> 500. In general: ``total_steps + 1`` below
    ``min_stages * min_stage`` steps, else ``max(min_stage, total_steps // max_stages)``.

    Where the numbers come from: ``plora study`` (``plora_kernels/study.py``; records in
    ``benchmarks/results/study-*.json``), rank-4 adapters, AdamW with a tuned learning rate near 1e-2, batch 16,
    small byte-level Llama models. Each unload zeroes B, so the adapter restarts slowly; in 150-step runs every
    interval tried (10 to 100 steps) lost to plain LoRA (0.86-0.99x of its loss removed). With stages of 80
    steps the extra rank pays back those restarts once the run is long enough: 300 steps tied with LoRA (1.00x on
    Python code, 1.02x on C++ headers), 600 steps won (1.02x and 1.09x), and the 800-step demo task won 1.55x.
    The 80-step minimum was measured at that learning rate and batch size; with a much smaller learning rate,
    stages likely need to be longer.

    ``total_steps`` is a non-negative int (TypeError for another type, ValueError if negative); ``min_stage``,
    ``min_stages`` and ``max_stages`` are positive ints with ``min_stages <= max_stages``.
    """
    total_steps = check_int("total_steps", total_steps, minimum=0, error=TypeError)
    min_stage = check_int("min_stage", min_stage, minimum=1, error=TypeError)
    min_stages = check_int("min_stages", min_stages, minimum=1, error=TypeError)
    max_stages = check_int("max_stages", max_stages, minimum=1, error=TypeError)
    if min_stages > max_stages:
        raise ValueError(f"min_stages must be at most max_stages={max_stages}, got {min_stages}")
    if total_steps < min_stages * min_stage:
        return total_steps + 1  # longer than the run: no unload
    return max(min_stage, total_steps // max_stages)


def is_auto(every) -> bool:
    """Whether ``every`` asks for :func:`auto_every`'s interval (the string "auto")."""
    return isinstance(every, str) and every == "auto"


def warn_auto_without_unload(who: str, steps_name: str, total_steps: int) -> None:
    """The UserWarning of an ``every="auto"`` run too short to unload: it trains plain LoRA."""
    warnings.warn(f"{who}: every='auto' does not unload in a run of fewer than {AUTO_MIN_STEPS} steps "
                  f"({steps_name}={total_steps}; plora study: plain LoRA did as well or better there): this trains "
                  "plain LoRA", UserWarning, stacklevel=3)


def check_every(every, total_steps=None) -> int:
    """``every`` as an int: a positive int is returned as it is, "auto" is :func:`auto_every` of ``total_steps``
    (which it then needs). ValueError naming ``every`` for anything else, naming ``total_steps`` when "auto" comes
    without it; ``total_steps``, when given, must be a positive int (TypeError / ValueError naming it)."""
    if total_steps is not None:
        total_steps = check_int("total_steps", total_steps, minimum=1, error=TypeError)
    if is_auto(every):
        if total_steps is None:
            raise ValueError("every='auto' needs total_steps (the run's optimizer steps) to choose the unload "
                             "interval; pass total_steps=N, or an int every")
        return auto_every(total_steps)
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"every must be a positive int (optimizer steps per stage) or 'auto', got {every!r}"
                         + ("" if isinstance(every, (int, str)) else f" ({type(every).__name__})"))
    return int(every)


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


def inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (and similar ``.optimizer`` wrappers): the one
    whose ``step`` really updates the parameters (the wrapper's ``step`` may do nothing, e.g. mid-accumulation)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def steps_are_observable(optimizer) -> bool:
    """Whether ``optimizer.register_step_post_hook`` sees its real steps: a torch optimizer whose class ``step`` torch
    has wrapped with its hook runner (every optimizer built through ``torch.optim.Optimizer.__init__``)."""
    return (isinstance(optimizer, torch.optim.Optimizer)
            and bool(getattr(type(optimizer).step, "hooked", False))
            and callable(getattr(optimizer, "register_step_post_hook", None)))


def _on_optimizer_step(unloader_ref, optimizer, args, kwargs) -> None:
    """The optimizer's step post-hook: one real step for the unloader (it runs only when ``optimizer.step()`` ran;
    GradScaler does not call it for a step it skips). An optimizer that steps through GradScaler's skip itself
    (``_step_supports_amp_scaling``, e.g. fused Adam) is handed ``found_inf``: that step counts only if it is 0,
    read when the unloader next needs the count."""
    unloader = unloader_ref()
    if unloader is None:
        return
    found_inf = getattr(optimizer, "found_inf", None)
    if isinstance(found_inf, torch.Tensor):
        unloader._maybe_skipped.append(found_inf.detach().clone())
    else:
        unloader._pending += 1


def no_plora_layers_error(model: nn.Module, who: str) -> ValueError:
    """The error for a model without PLoRALinear layers; it names the way out for a PEFT model (e.g. TRL's
    ``SFTTrainer(peft_config=...)`` hands the Trainer a PeftModel with PEFT's LoRA layers)."""
    if any(type(m).__module__.split(".")[0] == "peft" for m in model.modules()):
        return ValueError(f"{who}: model has no PLoRALinear layers; it is a PEFT model (PEFT's LoRA layers, e.g. from "
                          "get_peft_model or TRL's SFTTrainer(peft_config=...)). Call plora_kernels.apply_plora on the "
                          "base model instead of wrapping it with PEFT (and pass no peft_config), or convert a PEFT "
                          "model with plora_kernels.integrations.peft.from_peft(peft_model)")
    return ValueError(f"{who}: model has no PLoRALinear layers; call plora_kernels.apply_plora(model) first")


class PeriodicUnloader:
    """Unload every PLoRALinear of ``model`` every ``every`` optimizer steps and reset their Adam state.

    Call :meth:`step` after each ``optimizer.step()``; calling it more often is harmless. It counts the optimizer
    steps that really happened, seen by a step post-hook on the (torch) optimizer: a ``step()`` after a
    micro-batch that did not step the optimizer (gradient accumulation by hand, or under accelerate's
    ``accumulate``, whose optimizer wrapper steps only on the last micro-batch), or after a step that
    ``torch.amp.GradScaler`` skipped (inf/NaN gradients), counts nothing and cannot unload. With
    ``optimizer=None``, or an optimizer whose steps a hook cannot see (not a ``torch.optim.Optimizer``), every
    call counts as one step.

    An unload sets the adapters' ``.grad`` to None: a gradient of the old adapter never updates the new one.

    Resuming: :meth:`state_dict` / :meth:`load_state_dict` restore the stage exactly. The unloads' random numbers
    derive from ``(seed, unload, layer)``, never from torch's RNG; but ``lora_dropout > 0`` draws its masks from
    torch's default generator, so a plain loop resumes bit for bit only if the checkpoint also holds
    ``torch.get_rng_state()`` (and ``torch.cuda.get_rng_state_all()`` on GPUs), restored on resume, as the
    transformers Trainer does.

    Args:
        model: a model holding PLoRALinear layers (see :func:`plora_kernels.apply_plora`).
        optimizer: the optimizer over the adapters (an accelerate ``AcceleratedOptimizer`` is unwrapped): its steps
            are counted and its per-parameter state for lora_A/lora_B is reset.
        every: stage length in optimizer steps, or "auto": the interval :func:`auto_every` chooses for a run
            of ``total_steps`` steps (which "auto" needs); for a run of fewer than 400 steps that is
            ``total_steps + 1``, so no unload happens (plain LoRA) and a UserWarning says so.
        total_steps: the run's length in optimizer steps; needed only with ``every="auto"``.
        optimizer_reset: "zero" (moments and step count zeroed: a fresh Adam for the adapter), "scale"
            (moments multiplied by the layer's momentum), or "keep". None: "zero" when every layer has
            momentum 0, else "scale".
        seed: base seed for the fresh lora_A draws and stochastic rounding (same on every rank).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, every: int | str, *,
                 total_steps: int | None = None, optimizer_reset: str | None = None, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module holding PLoRALinear layers, got {type(model).__name__}")
        check_optimizer(optimizer)
        optimizer = inner_optimizer(optimizer)
        auto = is_auto(every)
        every = check_every(every, total_steps)  # "auto" -> an int; state_dict() stores that int
        seed = check_int("seed", seed, error=TypeError)
        if optimizer_reset is not None and optimizer_reset not in OPTIMIZER_RESETS:
            raise ValueError(f"optimizer_reset must be one of {OPTIMIZER_RESETS} or None, got {optimizer_reset!r}")
        named = list(plora_layers(model))
        self.layers = [layer for _, layer in named]
        self.names = [name for name, _ in named]
        if not self.layers:
            raise no_plora_layers_error(model, "PeriodicUnloader")
        check_untied(model, named, "PeriodicUnloader")
        if optimizer is not None:
            held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())}
            if not any(id(p) in held for layer in self.layers for p in (layer.lora_A, layer.lora_B)):
                warnings.warn("PeriodicUnloader: the optimizer holds none of the adapters' parameters (lora_A, "
                              "lora_B), so it does not train them and their optimizer state is never reset; build the "
                              "optimizer after apply_plora, over the model's trainable parameters", stacklevel=2)
        if optimizer_reset is None:
            optimizer_reset = "zero" if all(layer.momentum == 0 for layer in self.layers) else "scale"
        if auto and every > total_steps:
            warn_auto_without_unload("PeriodicUnloader", "total_steps", total_steps)
        self.optimizer, self.every, self.optimizer_reset, self.seed = optimizer, every, optimizer_reset, seed
        self.total_steps = total_steps
        self.step_count = 0  # optimizer steps counted by step()
        self.num_unloads = 0
        self._pending = 0  # real optimizer steps the hook saw that step() has not counted yet
        self._maybe_skipped: list[torch.Tensor] = []  # found_inf flags of steps that may have been skipped
        self.counts_optimizer_steps = optimizer is not None and steps_are_observable(optimizer)
        if self.counts_optimizer_steps:
            handle = optimizer.register_step_post_hook(
                lambda opt, args, kwargs, ref=weakref.ref(self): _on_optimizer_step(ref, opt, args, kwargs))
            weakref.finalize(self, handle.remove)  # a dropped unloader stops listening

    def _new_steps(self) -> int:
        """The optimizer steps since the last counted :meth:`step`: the real ones the hook saw, or 1 per call when
        the optimizer's steps cannot be observed."""
        if not self.counts_optimizer_steps:
            return 1
        if self._maybe_skipped:  # one host read, only for an optimizer stepping through GradScaler's skips
            flags = torch.stack([f.reshape(()).float().cpu() for f in self._maybe_skipped]).tolist()
            self._pending += sum(1 for f in flags if f == 0)
            self._maybe_skipped.clear()
        return self._pending

    def will_unload(self) -> bool:
        """Whether the next :meth:`step` call unloads (a stage ends at the optimizer steps taken since the last
        one). It changes nothing."""
        n = self._new_steps()
        return n > 0 and (self.step_count + n) // self.every > self.step_count // self.every

    def step(self) -> bool:
        """Count the optimizer steps taken since the last call (see the class docstring; none after a micro-batch
        or a skipped step, which makes this a no-op); unload when a stage ends. Returns True if it unloaded. If
        several steps passed since the last call and a stage ended among them, it unloads once, now. If the
        unload raises (e.g. a merge that would not be finite), nothing changes, the step count included, and the
        next call retries it."""
        n = self._new_steps()
        if n == 0:
            return False
        ends = (self.step_count + n) // self.every > self.step_count // self.every
        if ends:
            self.unload()
        self.step_count += n
        self._pending = 0
        return ends

    @torch.no_grad()
    def unload(self) -> None:
        """Unload every layer now (together: one host sync on the kernel path) and reset the adapters'
        optimizer state per policy."""
        seeds = [unload_seed(self.seed, self.num_unloads, i) for i in range(len(self.layers))]
        unload_layers_(self.layers, labels=self.names, seeds=seeds)  # also drops the adapters' gradients
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
        :meth:`load_state_dict` checks: the per-layer random streams derive from each layer's index.
        ``pending_steps`` holds optimizer steps taken but not yet counted by :meth:`step` (a checkpoint saved
        between ``optimizer.step()`` and ``unloader.step()``)."""
        pending = self._new_steps() if self.counts_optimizer_steps else 0
        return {"every": self.every, "step_count": self.step_count, "num_unloads": self.num_unloads,
                "seed": self.seed, "optimizer_reset": self.optimizer_reset, "num_layers": len(self.layers),
                "layer_names": list(self.names), "pending_steps": pending}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. Every entry is checked before any is applied (ValueError or
        TypeError naming the key; the unloader is unchanged on an error). ``num_layers``, ``layer_names`` and
        ``pending_steps`` are optional (older checkpoints lack them; no pending step then); ``num_layers`` and
        ``layer_names``, when present, must match this unloader's layers, compared without the names' DDP /
        torch.compile / FSDP wrapper prefixes."""
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
        pending = check_int("state['pending_steps']", state.get("pending_steps") or 0, minimum=0)
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
        self._pending, self._maybe_skipped = pending if self.counts_optimizer_steps else 0, []


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
