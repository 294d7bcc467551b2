"""Issue 23, item 1: the rounding of an unload follows the weight's dtype *at the unload*, in the pipelines users
write: a model patched in fp32 and then cast (``.to(torch.bfloat16)``, ``.half()``, a cast by accelerate) must
round stochastically like a model built in 16 bits, or a stage's update below half an ulp is erased at every
unload (measured before the fix: 38% of the summed update reached W, against 100% for a model built in bf16).

The measure: over many unloads, the share of the summed merged update ``sum (1-m) s B A`` (in fp64, from the
factors just before each unload) that reached W: ``<W_end - W_0, U> / <U, U>``. Stochastic rounding is unbiased,
so it is 1 up to the rounding noise (a few percent at these sizes); nearest rounding erases most of it.
"""
import os
import warnings

import pytest
import torch
from torch import nn

import plora_kernels as pk
from plora_kernels import PeriodicUnloader, PLoRALinear, apply_plora, plora_layers, unload_all_
from plora_kernels.ops.unload import unload_many_

os.environ.setdefault("HF_HUB_OFFLINE", "1")

UNLOADS = 100
TINY = 2e-4  # lora_B's entries: the merged update is ~1/3 of a bf16 half-ulp of W's entries, erased by nearest


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))


class Ledger:
    """What the unloads should have merged, against what reached W."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.w0 = [layer.weight.detach().double().clone() for layer in self.layers]
        self.want = [torch.zeros_like(w) for w in self.w0]

    def record(self):  # call just before an unload
        for layer, acc in zip(self.layers, self.want):
            b, a = layer.lora_B.detach().double(), layer.lora_A.detach().double()
            acc += (1 - layer.momentum) * layer.scaling * (b @ a)

    def share(self) -> float:
        got = [layer.weight.detach().double() - w0 for layer, w0 in zip(self.layers, self.w0)]
        num = sum(float((g * u).sum()) for g, u in zip(got, self.want))
        return num / sum(float((u * u).sum()) for u in self.want)


def _tiny_B_(layers, g, tiny=TINY):
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * tiny)


def _nothing_lost(share):
    assert 0.9 < share < 1.1, f"only {share:.0%} of the summed update reached W"


# ------------------------------------------------------------------------------------------ the pipelines

def test_apply_plora_then_to_bf16_in_a_training_loop_loses_nothing():
    """``apply_plora(model).to(torch.bfloat16)``, an SGD loop and PeriodicUnloader: every stage's update counts."""
    model = apply_plora(_mlp(), r=4, alpha=8).to(torch.bfloat16)
    layers = [layer for _, layer in plora_layers(model)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    unloader = PeriodicUnloader(model, opt, every=1, seed=0)
    ledger = Ledger(layers)
    g = torch.Generator().manual_seed(1)
    for _ in range(UNLOADS):
        x = torch.randn(16, 64, generator=g).to(torch.bfloat16)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ledger.record()
        assert unloader.step()
    assert unloader.num_unloads == UNLOADS
    _nothing_lost(ledger.share())
    assert all(layer.rounding == "stochastic" for layer in layers)


def test_model_half_then_unload_all_loses_nothing():
    model = apply_plora(_mlp(), r=4, alpha=8)
    model.half()
    layers = [layer for _, layer in plora_layers(model)]
    ledger, g = Ledger(layers), torch.Generator().manual_seed(2)
    for _ in range(UNLOADS):
        _tiny_B_(layers, g, TINY / 8)  # fp16 keeps 3 more bits than bf16
        ledger.record()
        unload_all_(model)
    _nothing_lost(ledger.share())


def test_layer_cast_after_construction_then_unload_loses_nothing():
    layer = PLoRALinear(64, 48, r=4, alpha=8)  # fp32: nothing to choose yet
    assert layer.rounding == "nearest"
    layer.to(torch.bfloat16)
    assert layer.rounding == "stochastic"  # decided from W's dtype now
    ledger, g = Ledger([layer]), torch.Generator().manual_seed(3)
    for _ in range(UNLOADS):
        _tiny_B_([layer], g)
        ledger.record()
        layer.unload_()
    _nothing_lost(ledger.share())
    layer.float()
    assert layer.rounding == "nearest"


def test_unload_many_of_cast_layers_loses_nothing():
    layers = [PLoRALinear(64, 48, r=4, alpha=8).to(torch.bfloat16) for _ in range(2)]
    ledger, g = Ledger(layers), torch.Generator().manual_seed(4)
    for i in range(UNLOADS):
        _tiny_B_(layers, g)
        ledger.record()
        unload_many_([layer.unload_spec(seed=1000 * i + k) for k, layer in enumerate(layers)])
    _nothing_lost(ledger.share())


def test_trainer_callback_on_a_model_cast_after_patching_loses_nothing(tmp_path):
    """A transformers Trainer with PLoRACallback on ``apply_plora(model).to(torch.bfloat16)``; a callback placed
    before PLoRACallback records what each unload merges."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from plora_kernels.integrations.transformers import PLoRACallback

    every = 2

    class Record(TrainerCallback):
        def __init__(self):
            self.ledger = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.ledger = Ledger(layer for _, layer in plora_layers(model))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                self.ledger.record()

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    model = apply_plora(LlamaForCausalLM(config), r=4, alpha=8).to(torch.bfloat16)
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(str(tmp_path), max_steps=40, per_device_train_batch_size=4, learning_rate=2e-5,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    record, callback = Record(), PLoRACallback(every=every)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": t, "labels": t} for t in ids],
            callbacks=[record, callback]).train()
    assert callback.unloader.num_unloads == 20
    _nothing_lost(record.ledger.share())


# ------------------------------------------------------------------------------------------ explicit rounding

def test_explicit_nearest_into_a_16_bit_weight_warns_once_per_model():
    model = apply_plora(_mlp(), r=4, alpha=8, rounding="nearest").to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"rounding='nearest'.*bfloat16") as record:
        unload_all_(model)
    message = str(record[0].message)
    assert "'0'" in message and "'2'" in message and "stochastic" in message and "None" in message
    assert len([w for w in record if "rounding='nearest'" in str(w.message)]) == 1  # one warning for the model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unload_all_(model)  # the same layers again: no second warning
        PeriodicUnloader(model, None, every=1).step()
        # explicit stochastic, and nearest into fp32 (nothing to choose), say nothing
        unload_all_(apply_plora(_mlp(), r=4, rounding="stochastic").to(torch.bfloat16))
        unload_all_(apply_plora(_mlp(), r=4, rounding="nearest"))
    assert all(layer.rounding == "nearest" for _, layer in plora_layers(model))  # explicit: kept


def test_rounding_none_is_kept_until_the_unload_and_can_be_set_back():
    layer = PLoRALinear(8, 4, rounding="nearest", dtype=torch.bfloat16)
    assert layer.rounding == "nearest"
    layer.rounding = None  # back to "follow the weight"
    assert layer.rounding == "stochastic"
    with pytest.raises(ValueError, match="rounding"):
        layer.rounding = "up"
    assert "rounding='stochastic'" in repr(layer)


# ------------------------------------------------------------------------------------------ fp32 adapters

def test_cast_the_base_keep_fp32_adapters():
    """``model.to(torch.bfloat16)`` casts lora_A/lora_B too; ``adapters_to_(torch.float32)`` puts them back to
    fp32 (the recommended setup: PEFT's default, and what apply_plora gives a model already in bf16), keeping the
    Parameter objects, so an optimizer built before still holds them."""
    model = apply_plora(_mlp(), r=4, alpha=8)
    params = [p for p in model.parameters() if p.requires_grad]
    model.to(torch.bfloat16)
    assert {p.dtype for p in params} == {torch.bfloat16}  # what a plain cast does
    for _, layer in plora_layers(model):
        assert layer.adapters_to_(torch.float32) is layer
    assert [p for p in model.parameters() if p.requires_grad] == params  # the same Parameters
    assert all(layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
               for _, layer in plora_layers(model))
    # the same as a model cast first and patched after
    other = apply_plora(_mlp().to(torch.bfloat16), r=4, alpha=8)
    assert [p.dtype for p in other.parameters()] == [p.dtype for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=2)
    layers = [layer for _, layer in plora_layers(model)]
    ledger, g = Ledger(layers), torch.Generator().manual_seed(5)
    for _ in range(4):
        loss = model(torch.randn(8, 64, generator=g).to(torch.bfloat16)).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if unloader.will_unload():
            ledger.record()
        unloader.step()
    assert unloader.num_unloads == 2 and all(p.dtype == torch.float32 for p in params)
    _nothing_lost(ledger.share())
    with pytest.raises(TypeError, match="dtype"):
        layers[0].adapters_to_(torch.int32)
    assert pk.PLoRALinear(4, 4).adapters_to_(torch.float64).lora_A.dtype == torch.float64
