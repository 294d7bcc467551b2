"""Issue 23, items 3 and 5: only optimizer steps that really happened count, in the loops users write.

``PeriodicUnloader.step()`` may be called on every micro-batch, under accelerate's gradient accumulation (whose
optimizer wrapper steps only on the last micro-batch), or after a step that ``torch.amp.GradScaler`` skipped
(inf gradients): none of these may unload early or twice. Each pipeline here is compared, bit for bit, with the
same training written so that every ``step()`` follows a real optimizer step (micro-batches summed by hand, the
skipped batch left out). Resume stays exact, and with ``lora_dropout > 0`` it is exact once the RNG state is
saved with the checkpoint (what the docs tell users to do).
"""
import io
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from plora_kernels import PeriodicUnloader, apply_plora, plora_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EVERY = 3


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return apply_plora(nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16)), r=2, alpha=4, **kw)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(8, 24, generator=g)
    return x, torch.sin(x[:, :16] * 2)


def _loss(model, i):
    x, y = _batch(i)
    return (model(x) - y).pow(2).mean()


def _reference(optimizer_steps, accumulate=1, skip=(), **opt_kw):
    """The run every pipeline must equal: ``accumulate`` micro-batches per optimizer step (losses divided by
    ``accumulate``, as accelerate does), micro-batches in ``skip`` left out, ``step()`` right after each real
    optimizer step."""
    model = _model()
    opt = torch.optim.AdamW(_params(model), lr=1e-2, **opt_kw)
    unloader = PeriodicUnloader(model, opt, every=EVERY, seed=1)
    batches = [i for i in range(optimizer_steps * accumulate + len(skip)) if i not in skip]
    for k in range(optimizer_steps):
        for i in batches[k * accumulate:(k + 1) * accumulate]:
            (_loss(model, i) / accumulate).backward()
        opt.step()
        opt.zero_grad()
        unloader.step()
    return model, unloader


def _assert_same(model, want):
    for (k, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k


def _layer_unloads(model):
    return [int(layer.num_unloads) for _, layer in plora_layers(model)]


# ------------------------------------------------------------------------------------------ micro-batches

def test_step_called_on_every_micro_batch_counts_optimizer_steps():
    """Gradient accumulation by hand, ``unloader.step()`` after every micro-batch: 12 calls, 6 optimizer steps,
    every=3: 2 unloads, each after a real step (before the fix: 4, two of them mid-accumulation)."""
    model = _model()
    opt = torch.optim.AdamW(_params(model), lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=EVERY, seed=1)
    unloaded = []
    for i in range(12):
        (_loss(model, i) / 2).backward()
        if i % 2 == 1:
            opt.step()
            opt.zero_grad()
        unloaded.append(unloader.step())
    assert unloader.num_unloads == 2 and unloader.step_count == 6
    assert [i for i, u in enumerate(unloaded) if u] == [5, 11]  # the micro-batches that ended optimizer steps 3, 6
    want, _ = _reference(6, accumulate=2)
    _assert_same(model, want)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): reset them around a test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_gradient_accumulation_unloads_once_per_optimizer_step(fresh_accelerate_state):
    """accelerate's documented loop: ``optimizer.step()`` on every micro-batch inside
    ``accelerator.accumulate(model)`` (the wrapper steps the torch optimizer on the last one only), and
    ``unloader.step()`` after it."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = _model()
    opt = torch.optim.AdamW(_params(model), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    unloader = PeriodicUnloader(model, opt, every=EVERY, seed=1)
    for i in range(12):
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, i))
            opt.step()
            opt.zero_grad()
            unloader.step()
    assert unloader.num_unloads == 2 and unloader.step_count == 6
    assert _layer_unloads(model) == [2, 2]
    want, _ = _reference(6, accumulate=2)
    _assert_same(accelerator.unwrap_model(model), want)


# ------------------------------------------------------------------------------------------ skipped steps

def _scaler_run(fused, total=7, bad=2, cut=None):
    """A GradScaler loop (``scaler.step(opt); scaler.update(); unloader.step()``) whose micro-batch ``bad`` has an
    inf loss: GradScaler skips that optimizer step. With ``cut``, the run is checkpointed after ``cut`` batches and
    resumed in fresh objects."""
    def fresh():
        model = _model()
        opt = torch.optim.AdamW(_params(model), lr=1e-2, fused=fused)
        return model, opt, torch.amp.GradScaler("cpu"), PeriodicUnloader(model, opt, every=EVERY, seed=1)

    model, opt, scaler, unloader = fresh()
    for i in range(total):
        if cut is not None and i == cut:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                        "unloader": unloader.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model, opt, scaler, unloader = fresh()
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            scaler.load_state_dict(ckpt["scaler"])
            unloader.load_state_dict(ckpt["unloader"])
        loss = _loss(model, i) * (float("inf") if i == bad else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        unloader.step()
    return model, unloader, scaler


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_a_step_gradscaler_skips_does_not_count(fused):
    """7 batches, the third with inf gradients: 6 real optimizer steps, unloads after real steps 3 and 6, the same
    weights as the run without that batch. Fused AdamW steps through the skip itself (GradScaler passes it
    ``found_inf``); that skip does not count either."""
    model, unloader, scaler = _scaler_run(fused)
    assert scaler.get_scale() == 2.0 ** 15  # the scaler did skip one step (and halved its scale)
    assert unloader.num_unloads == 2 and unloader.step_count == 6
    want, _ = _reference(6, skip=(2,), fused=fused)
    _assert_same(model, want)


def test_resume_after_a_skipped_step_is_exact():
    model, unloader, _ = _scaler_run(False)
    for cut in (2, 3, 5):  # just before the skip, just after it, mid-stage after the first unload
        resumed, resumed_unloader, _ = _scaler_run(False, cut=cut)
        assert resumed_unloader.state_dict() == unloader.state_dict()
        _assert_same(resumed, model)


def test_a_step_saved_between_optimizer_step_and_unloader_step_is_not_lost():
    """A checkpoint taken after ``opt.step()`` but before ``unloader.step()`` carries that step."""
    model = _model()
    opt = torch.optim.AdamW(_params(model), lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=2)
    _loss(model, 0).backward()
    opt.step()
    state = unloader.state_dict()
    again = PeriodicUnloader(model, torch.optim.AdamW(_params(model), lr=1e-2), every=2)
    again.load_state_dict(state)
    assert not again.step() and again.step_count == 1


def test_an_old_state_dict_without_the_new_keys_still_loads():
    unloader = PeriodicUnloader(_model(), None, every=2)
    unloader.load_state_dict({"every": 2, "step_count": 3, "num_unloads": 1, "seed": 4, "optimizer_reset": "zero"})
    assert (unloader.step_count, unloader.num_unloads, unloader.seed) == (3, 1, 4)
    assert unloader.step()  # the 4th step ends the stage


def test_an_unload_clears_the_adapters_gradients():
    """A gradient computed for the adapter before an unload (a half-accumulated one, say) must never reach the
    fresh lora_A: the unload sets the adapters' .grad to None."""
    model = _model()
    opt = torch.optim.SGD(_params(model), lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=1)
    _loss(model, 0).backward()
    opt.step()
    _loss(model, 1).backward()  # the next step's first micro-batch, before the unload
    assert all(p.grad is not None for p in _params(model))
    assert unloader.step()
    assert all(p.grad is None for p in _params(model))


# ------------------------------------------------------------------------------------------ the Trainer

def _trainer_run(tmp_path, out, callbacks, resume=None, **model_kw):
    """A 10-step Trainer run of a tiny Llama patched with apply_plora (checkpoints every 5 steps); returns the
    model and the Trainer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    model = apply_plora(LlamaForCausalLM(config), r=4, alpha=8, **model_kw)
    ids = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(str(tmp_path / out), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=5, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": t, "labels": t} for t in ids],
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _stop_at(step):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return StopAt()


def test_trainer_step_skipped_by_the_optimizer_wrapper_does_not_count(tmp_path, fresh_accelerate_state):
    """Inside a Trainer, an optimizer step skipped the way accelerate's wrapper skips one on an fp16 overflow
    (the torch optimizer's step is not called; simulated: fp16 GradScaler needs a GPU) is not counted by
    PLoRACallback either: the unloads follow the real optimizer steps, and resuming from a checkpoint taken after
    the skip works and ends where the straight run ends."""
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from plora_kernels.integrations.transformers import PLoRACallback

    class SkipStep(TrainerCallback):
        """Makes the torch optimizer skip the step of Trainer step ``skip`` (1-based), as GradScaler does."""

        def __init__(self, skip):
            self.skip = skip

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step + 1 != self.skip:
                return
            inner = optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
            before = inner.__dict__.get("step")  # the LR scheduler's wrapper of the step, if any

            def skipped(*a, **k):  # no update and no step hooks, as GradScaler's skip; then the real step back
                if before is None:
                    del inner.step
                else:
                    inner.step = before

            inner.step = skipped

    callback = PLoRACallback(every=4)
    model, trainer = _trainer_run(tmp_path, "full", [SkipStep(3), callback])
    assert trainer.state.global_step == 10
    assert callback.unloader.step_count == 9 and callback.unloader.num_unloads == 2  # after real steps 4 and 8
    unloads = [h.get("plora/unloads") for h in trainer.state.log_history if "loss" in h]
    assert unloads == [None] * 4 + [1] * 4 + [2] * 2  # the unloads at Trainer steps 5 and 9

    _trainer_run(tmp_path, "part", [SkipStep(3), PLoRACallback(every=4), _stop_at(5)])
    resumed_cb = PLoRACallback(every=4)
    resumed, _ = _trainer_run(tmp_path, "resumed", [resumed_cb], resume=str(tmp_path / "part" / "checkpoint-5"))
    assert (resumed_cb.unloader.step_count, resumed_cb.unloader.num_unloads) == (9, 2)
    _assert_same(resumed, model)


def test_trainer_resume_with_lora_dropout_is_exact(tmp_path, fresh_accelerate_state):
    """With lora_dropout > 0 a Trainer resumed mid-stage ends bit-identical to the straight run: the masks come
    from torch's RNG, which the Trainer saves in each checkpoint and restores (docs/transformers.md)."""
    pytest.importorskip("transformers")
    from plora_kernels.integrations.transformers import PLoRACallback

    full, _ = _trainer_run(tmp_path, "full", [PLoRACallback(every=4)], lora_dropout=0.2)
    _trainer_run(tmp_path, "part", [PLoRACallback(every=4), _stop_at(5)], lora_dropout=0.2)
    resumed, _ = _trainer_run(tmp_path, "resumed", [PLoRACallback(every=4)], lora_dropout=0.2,
                              resume=str(tmp_path / "part" / "checkpoint-5"))
    assert all(layer.lora_dropout == 0.2 for _, layer in plora_layers(resumed))
    _assert_same(resumed, full)


def test_callback_on_a_peft_wrapped_model_names_the_way_out():
    """TRL's ``SFTTrainer(peft_config=...)`` hands the Trainer a PeftModel with PEFT LoRA layers: the callback
    must say how to get PLoRALinear layers instead."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from plora_kernels.integrations.transformers import PLoRACallback

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, max_position_embeddings=32)
    pm = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"apply_plora.*plora_kernels\.integrations\.peft\.from_peft"):
        PLoRACallback(every=2).on_train_begin(None, SimpleNamespace(global_step=0), None, model=pm, optimizer=None)


# ------------------------------------------------------------------------------------------ lora_dropout resume

def test_resume_with_lora_dropout_is_exact_when_the_rng_state_is_saved():
    """lora_dropout draws its masks' seeds from torch's default generator (so ``torch.manual_seed`` reproduces a
    run); a resumed run repeats the straight one when the checkpoint also holds ``torch.get_rng_state()``
    (the Trainer saves it itself; a plain loop must, as docs/transformers.md and the README say). Without it the
    masks differ."""
    steps, cut = 8, 5

    def fresh():
        model = _model(lora_dropout=0.25)
        opt = torch.optim.AdamW(_params(model), lr=1e-2)
        return model, opt, PeriodicUnloader(model, opt, every=EVERY, seed=1)

    def train(model, opt, unloader, start, stop):
        model.train()
        for i in range(start, stop):
            _loss(model, i).backward()
            opt.step()
            opt.zero_grad()
            unloader.step()

    torch.manual_seed(7)
    model, opt, unloader = fresh()
    train(model, opt, unloader, 0, steps)

    torch.manual_seed(7)
    part = fresh()
    train(*part, 0, cut)
    buf = io.BytesIO()
    torch.save({"model": part[0].state_dict(), "opt": part[1].state_dict(), "unloader": part[2].state_dict(),
                "rng": torch.get_rng_state()}, buf)
    for restore_rng in (True, False):
        buf.seek(0)
        ckpt = torch.load(buf)
        torch.manual_seed(99)  # a new process: another RNG state
        resumed = fresh()
        resumed[0].load_state_dict(ckpt["model"])
        resumed[1].load_state_dict(ckpt["opt"])
        resumed[2].load_state_dict(ckpt["unloader"])
        if restore_rng:
            torch.set_rng_state(ckpt["rng"])
        train(*resumed, cut, steps)
        same = all(torch.equal(a, b) for a, b in zip(resumed[0].state_dict().values(), model.state_dict().values()))
        assert same == restore_rng
