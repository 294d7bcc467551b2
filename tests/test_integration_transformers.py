"""PLoRA inside transformers: the Trainer callback (unloads, logs, exact resume), the stage schedule through
``Trainer(optimizers=...)``, PEFT interop (from_peft), and the README's transformers example, run as written.

Tiny LlamaForCausalLM models built from a config: nothing is downloaded, each Trainer run takes about a second.
"""
import json
import math
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import plora_kernels as pk  # noqa: E402
from plora_kernels.integrations.transformers import STATE_FILE, PLoRACallback, merged_update_sq_norm  # noqa: E402
from plora_kernels.train.schedule import stage_lr_factor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, BATCH = 64, 16, 4


def tiny_config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaConfig(**{**base, **kw})


def tiny_plora_model(seed=0, **kw):
    torch.manual_seed(seed)
    return pk.apply_plora(LlamaForCausalLM(tiny_config()), r=4, alpha=8, **kw)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(TrainerCallback):
    """Ends training after ``step`` (the Trainer still saves that step's checkpoint first): an interruption."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(output_dir, model, callbacks, max_steps, *, ga=1, resume=None, lr=1e-2, save_steps=3, optimizers=None,
          **args_kw):
    args = TrainingArguments(str(output_dir), max_steps=max_steps, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ga, learning_rate=lr, save_steps=save_steps,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, **args_kw)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(max_steps * BATCH * ga),
                      callbacks=callbacks, optimizers=optimizers or (None, None))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def plora_logs(trainer):
    return [(h["step"], h.get("plora/unloads"), h.get("plora/delta_norm"))
            for h in trainer.state.log_history if "loss" in h]


# ------------------------------------------------------------------------------------------- callback
def test_resume_mid_stage_is_bit_identical(tmp_path):
    """every=4, 10 steps: unloads at 4 and 8. A run stopped at its step-6 checkpoint (mid-stage) and resumed
    in a fresh process state (new model, new Trainer, new callback) ends bit-identical to the straight run."""
    full_model = tiny_plora_model()
    full = train(tmp_path / "full", full_model, [PLoRACallback(every=4)], max_steps=10)

    part = train(tmp_path / "part", tiny_plora_model(), [PLoRACallback(every=4), StopAt(6)], max_steps=10)
    assert part.state.global_step == 6
    ckpt = tmp_path / "part" / "checkpoint-6"
    saved = json.loads((ckpt / STATE_FILE).read_text())
    assert (saved["step_count"], saved["num_unloads"], saved["every"]) == (6, 1, 4)

    # a different initial model and a different output folder: everything must come from the checkpoint
    resumed_model = tiny_plora_model(seed=123)
    callback = PLoRACallback(every=4)
    resumed = train(tmp_path / "resumed", resumed_model, [callback], max_steps=10, resume=str(ckpt))

    assert callback.unloader.step_count == 10 and callback.unloader.num_unloads == 2
    for _, layer in pk.plora_layers(resumed_model):
        assert int(layer.num_unloads) == 2
    want, got = full_model.state_dict(), resumed_model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # the adapters were trained and unloaded: the weights really moved
    assert any(not torch.equal(layer.weight, base.weight) for (_, layer), (_, base)
               in zip(pk.plora_layers(full_model), pk.plora_layers(tiny_plora_model())))
    # the log history (restored from the checkpoint, then continued) is the straight run's, delta_norm of the
    # step-4 unload included
    full_logs = plora_logs(full)
    assert plora_logs(resumed) == full_logs
    assert [u for _, u, _ in full_logs] == [None] * 3 + [1] * 4 + [2] * 3
    assert all(d > 0 for _, u, d in full_logs if u)

    # transformers' own callback restore replaces the callback by one rebuilt from the checkpoint: same result
    again_model = tiny_plora_model(seed=7)
    again = train(tmp_path / "again", again_model, [PLoRACallback(every=4)], max_steps=10, resume=str(ckpt),
                  restore_callback_states_from_checkpoint=True)
    assert plora_logs(again) == full_logs
    assert all(torch.equal(v, again_model.state_dict()[k]) for k, v in want.items())


class Probe(TrainerCallback):
    """Records, around PLoRACallback's on_step_end, what the unload should merge and what it reset."""

    def __init__(self, every, before):
        self.every, self.before, self.expected_norms, self.reset_ok = every, before, [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % self.every:
            return
        layers = [layer for _, layer in pk.plora_layers(model)]
        if self.before:  # explicit ||(1-m) s B A||_F over all layers, with the full out x in product
            sq = sum(float(((1 - lay.momentum) * lay.scaling * (lay.lora_B @ lay.lora_A)).double().pow(2).sum())
                     for lay in layers)
            self.expected_norms.append(math.sqrt(sq))
        else:  # "zero" policy: Adam moments and step count of every adapter parameter are zero
            self.reset_ok.append(all(bool((v == 0).all()) for lay in layers for p in (lay.lora_A, lay.lora_B)
                                     for v in optimizer.state[p].values() if torch.is_tensor(v)))


def test_gradient_accumulation_unloads_once_per_optimizer_step(tmp_path):
    """ga=2, 6 optimizer steps (12 micro-batches), every=2: 3 unloads (6 if it counted micro-batches), each
    after an optimizer step, with the adapters' Adam state zeroed and the logged delta_norm exact."""
    model = tiny_plora_model()
    before, after = Probe(2, before=True), Probe(2, before=False)
    callback = PLoRACallback(every=2)
    trainer = train(tmp_path, model, [before, callback, after], max_steps=6, ga=2)
    assert trainer.state.global_step == 6
    assert callback.unloader.num_unloads == 3 and callback.unloader.step_count == 6
    assert {int(layer.num_unloads) for _, layer in pk.plora_layers(model)} == {3}
    logs = plora_logs(trainer)
    assert [u for _, u, _ in logs] == [None, 1, 1, 2, 2, 3]
    logged_norms = [d for step, _, d in logs if step % 2 == 0]
    assert logged_norms == pytest.approx(before.expected_norms, rel=1e-5) and len(logged_norms) == 3
    assert after.reset_ok == [True, True, True]
    # the Trainer hands callbacks accelerate's optimizer wrapper; the unloader holds the torch optimizer
    assert type(callback.unloader.optimizer) is torch.optim.AdamW


def test_stage_cosine_schedule_through_trainer_optimizers(tmp_path):
    """stage_cosine_schedule passed as Trainer(optimizers=(opt, sched)) drives the LR of every step: warmup,
    cosine, and the re-warmup after each unload. Also: momentum is set on every layer, policy "scale"."""
    model = tiny_plora_model()
    steps, every, lr = 12, 4, 1e-2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = pk.stage_cosine_schedule(opt, total_steps=steps, every=every, warmup=2, restart_warmup=2)
    callback = PLoRACallback(every=every, momentum=0.5)
    trainer = train(tmp_path, model, [callback], max_steps=steps, optimizers=(opt, sched), save_steps=100)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    want = [lr * stage_lr_factor(s, steps, every, warmup=2, restart_warmup=2) for s in range(steps)]
    assert logged == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert logged[every] < logged[every - 1]  # the re-warmup after the first unload is visible
    assert {layer.momentum for _, layer in pk.plora_layers(model)} == {0.5}
    assert callback.unloader.optimizer_reset == "scale" and callback.unloader.num_unloads == 3


def test_merged_update_norm_from_gram_matrices():
    torch.manual_seed(0)
    model = tiny_plora_model()
    for i, (_, layer) in enumerate(pk.plora_layers(model)):
        with torch.no_grad():
            layer.lora_B.normal_()  # non-zero adapters: B is zero at init
        layer.momentum = 0.25 * (i % 3)
    want = sum(((1 - lay.momentum) * lay.scaling * (lay.lora_B @ lay.lora_A)).double().pow(2).sum()
               for _, lay in pk.plora_layers(model))
    assert float(merged_update_sq_norm(model)) == pytest.approx(float(want), rel=1e-5)
    assert merged_update_sq_norm(nn.Linear(2, 2)) is None


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        PLoRACallback(every=0)
    with pytest.raises(ValueError, match="every"):
        PLoRACallback(every=2.0)
    with pytest.raises(ValueError, match="momentum"):
        PLoRACallback(every=2, momentum=1.0)
    with pytest.raises(ValueError, match="optimizer_reset"):
        PLoRACallback(every=2, optimizer_reset="reset")
    with pytest.raises(TypeError, match="seed"):
        PLoRACallback(every=2, seed="0")
    with pytest.raises(ValueError, match="PLoRALinear"):  # a model that was never patched
        PLoRACallback(every=2).on_train_begin(None, SimpleNamespace(global_step=0), None,
                                              model=nn.Sequential(nn.Linear(2, 2)), optimizer=None)


# ------------------------------------------------------------------------------- every="auto" (the default)
def test_callback_default_every_is_auto_resolved_from_max_steps():
    callback = PLoRACallback()
    assert callback.every == "auto" and callback.state()["args"]["every"] == "auto"
    for max_steps, every in ((400, 80), (800, 80), (1000, 100), (5000, 500)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            callback.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=max_steps), None,
                                    model=tiny_plora_model(), optimizer=None)
        assert callback.unloader.every == every == pk.auto_every(max_steps)
        assert callback.state()["attributes"]["_checkpoint_state"]["every"] == every  # the int, for checkpoints
        assert callback.state()["args"]["every"] == "auto"  # what rebuilds the callback
    with pytest.raises(ValueError, match="every"):
        PLoRACallback(every="sometimes")
    assert PLoRACallback(every=7).every == 7


@pytest.mark.parametrize("max_steps", [None, 0, -1, 10.0])
def test_callback_auto_without_a_known_run_length_is_a_clear_error(max_steps):
    model = tiny_plora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = SimpleNamespace(global_step=0) if max_steps is None else SimpleNamespace(global_step=0,
                                                                                       max_steps=max_steps)
    with pytest.raises(ValueError, match="max_steps"):
        PLoRACallback(momentum=0.5).on_train_begin(None, state, None, model=model, optimizer=None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(layer.momentum == 0.0 for _, layer in pk.plora_layers(model))


def test_callback_auto_in_a_short_trainer_run_warns_and_trains_plain_lora(tmp_path):
    model = tiny_plora_model()
    callback = PLoRACallback()
    with pytest.warns(UserWarning, match=r"every='auto'.*max_steps=4.*plain LoRA"):
        train(tmp_path, model, [callback], max_steps=4, save_steps=100)
    assert callback.unloader.every == 5 and callback.unloader.num_unloads == 0
    assert all(int(layer.num_unloads) == 0 for _, layer in pk.plora_layers(model))


def test_callback_auto_through_the_trainer_checkpoint_and_resume(tmp_path, monkeypatch):
    """The Trainer's max_steps reaches the rule, the checkpoint stores the resolved interval, and a resumed
    run resolves the same one. A stand-in rule (max_steps // 4) keeps the run at 8 steps."""
    import plora_kernels.integrations.transformers as integration

    monkeypatch.setattr(integration, "auto_every", lambda n: n // 4)
    full_model = tiny_plora_model()
    full = PLoRACallback()
    train(tmp_path / "full", full_model, [full], max_steps=8)
    assert full.unloader.every == 2 and full.unloader.num_unloads == 4

    train(tmp_path / "part", tiny_plora_model(), [PLoRACallback(), StopAt(6)], max_steps=8)
    ckpt = tmp_path / "part" / "checkpoint-6"
    assert json.loads((ckpt / STATE_FILE).read_text())["every"] == 2
    record = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["PLoRACallback"]
    assert record["args"]["every"] == "auto" and record["attributes"]["_checkpoint_state"]["every"] == 2
    resumed_model = tiny_plora_model(seed=5)
    resumed = PLoRACallback()
    train(tmp_path / "resumed", resumed_model, [resumed], max_steps=8, resume=str(ckpt))
    assert (resumed.unloader.every, resumed.unloader.step_count, resumed.unloader.num_unloads) == (2, 8, 4)
    want = full_model.state_dict()
    assert all(torch.equal(v, resumed_model.state_dict()[k]) for k, v in want.items())


class Wrapped(nn.Module):
    """Stands in for DDP / DeepSpeed: the user's model is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_resume_state_from_plora_state_json_and_wrappers(tmp_path):
    """Without the trainer_state.json record, the callback finds plora_state.json in the checkpoint folder;
    without either it warns and derives the stage position from the step. Wrapped models are unwrapped."""
    model = tiny_plora_model()
    n_layers = len(list(pk.plora_layers(model)))
    ckpt = tmp_path / "checkpoint-6"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text(json.dumps({"every": 4, "step_count": 6, "num_unloads": 1, "seed": 7,
                                               "optimizer_reset": "keep", "last_delta_norm": 0.5}))
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    state = SimpleNamespace(global_step=6, stateful_callbacks={})
    callback = PLoRACallback(every=4)
    callback.on_train_begin(args, state, None, model=Wrapped(Wrapped(model)), optimizer=None)
    u = callback.unloader
    assert len(u.layers) == n_layers
    assert (u.step_count, u.num_unloads, u.seed, u.optimizer_reset) == (6, 1, 7, "keep")
    assert callback.last_delta_norm == 0.5

    (ckpt / STATE_FILE).unlink()
    callback = PLoRACallback(every=4)
    with pytest.warns(UserWarning, match="no PLoRA state"):
        callback.on_train_begin(args, state, None, model=model, optimizer=None)
    assert (callback.unloader.step_count, callback.unloader.num_unloads) == (6, 1)

    with pytest.raises(ValueError, match="every"):  # a checkpoint of a run with another stage length
        (ckpt / STATE_FILE).write_text(json.dumps({"every": 5, "step_count": 6, "num_unloads": 1, "seed": 0,
                                                   "optimizer_reset": "zero"}))
        PLoRACallback(every=4).on_train_begin(args, state, None, model=model, optimizer=None)


# ----------------------------------------------------------------------------------------------- PEFT
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(**lora_kw):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ALL_PROJ, **lora_kw}
    model = peft.get_peft_model(base, peft.LoraConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # trained adapters: B is zero at init and would hide any mistake
                p.normal_(0.0, 0.3)
    return model.eval()


def _ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("lora_kw", [
    {},
    {"use_rslora": True, "r": 6, "lora_alpha": 7},  # scaling alpha/sqrt(r), r not a power of two
    {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    {"inference_mode": True},  # frozen PEFT adapters: the PLoRA adapters are trainable all the same
], ids=["plain", "rslora", "patterns", "inference_mode"])
def test_from_peft_same_outputs(lora_kw):
    from plora_kernels.integrations import from_peft

    pm = peft_model(**lora_kw)
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    peft_scalings = {name: (m.r["default"], m.scaling["default"]) for name, m in pm.base_model.model.named_modules()
                     if hasattr(m, "scaling") and isinstance(getattr(m, "scaling"), dict)}
    model = from_peft(pm)
    assert type(model) is LlamaForCausalLM and "peft_config" not in vars(model)
    layers = dict(pk.plora_layers(model))
    assert len(layers) == 2 * len(ALL_PROJ)
    for name, layer in layers.items():
        assert (layer.r, layer.scaling) == peft_scalings[name]  # exact, rsLoRA and patterns included
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and not layer.weight.requires_grad
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_from_peft_merge_save_reload_same_logits(tmp_path):
    from plora_kernels.integrations import from_peft

    pm = peft_model(lora_dropout=0.1, modules_to_save=["lm_head"])
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)  # a trained copy of the head
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    model = from_peft(pm)  # PEFT's lora_dropout is kept
    assert {layer.lora_dropout for _, layer in pk.plora_layers(model)} == {0.1}
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
        pk.merge_plora(model)
        merged = model(input_ids=ids).logits
    assert not list(pk.plora_layers(model))
    # merging rounds W + sBA into fp32 once, and these adapters dominate W (|sBA| ~ 10 |W|): a few ulp of the
    # merged weight reach the logits (max ~4) as up to ~5e-5 depending on the CPU's GEMM blocking
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged)


def test_from_peft_refuses_what_plora_cannot_represent():
    peft = pytest.importorskip("peft")
    from plora_kernels.integrations import from_peft

    with pytest.raises(ValueError, match="variant"):
        from_peft(peft_model(use_dora=True))
    with pytest.raises(ValueError, match="lora_bias"):
        from_peft(peft_model(lora_bias=True))
    with pytest.raises(TypeError, match="Embedding"):
        from_peft(peft_model(target_modules=["embed_tokens", "q_proj"]))
    pm = peft_model()
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="exactly one"):
        from_peft(pm)
    pm = peft_model()
    pm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        from_peft(pm)
    with pytest.raises(TypeError, match="peft_model"):
        from_peft(LlamaForCausalLM(tiny_config()))


# --------------------------------------------------------------------------------------------- README
def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Use with transformers\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "README.md has no '## Use with transformers' section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) == 1, "the section must hold exactly one ```python block"
    return blocks[0]


def test_readme_transformers_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert any(h.get("plora/unloads") for h in trainer.state.log_history)
    assert not list(pk.plora_layers(namespace["model"]))  # merged back into plain Linear layers
    assert list(tmp_path.rglob("config.json")) and list(tmp_path.rglob("model.safetensors"))


# --- issue 14: from_peft keeps what PEFT trains, unties a tied head, changes nothing on an error --------------

@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_from_peft_keeps_the_biases_peft_trains(bias):
    peft = pytest.importorskip("peft")
    from plora_kernels.integrations import from_peft

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(attention_bias=True))
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                   bias=bias))
    trained_bias = {n.replace("base_model.model.", "").replace(".base_layer", "")
                    for n, p in pm.named_parameters() if n.endswith(".bias") and p.requires_grad}
    assert trained_bias  # PEFT trains them
    model = from_peft(pm)
    now = {n for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad}
    assert now == trained_bias
    assert all(not layer.weight.requires_grad for _, layer in pk.plora_layers(model))


def test_from_peft_unties_a_targeted_tied_lm_head():
    peft = pytest.importorskip("peft")
    from plora_kernels.integrations import from_peft

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own warning about a tied target
        pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"from_peft: untied lm_head \(tied to model\.embed_tokens\.weight"):
        model = from_peft(pm)
    emb = model.get_input_embeddings().weight
    assert isinstance(model.lm_head, pk.PLoRALinear) and model.lm_head.weight.data_ptr() != emb.data_ptr()
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
    emb_before = emb.detach().clone()
    pk.unload_all_(model)
    assert torch.equal(emb, emb_before)


def test_from_peft_checks_its_options_before_changing_the_model():
    from plora_kernels.integrations import from_peft

    pm = peft_model()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    modules = [id(m) for m in pm.modules()]
    for kw, exc in ((dict(momentum=1.5), ValueError), (dict(r=2), TypeError), (dict(rounding="up"), ValueError)):
        with pytest.raises(exc):
            from_peft(pm, **kw)
        assert [id(m) for m in pm.modules()] == modules
        assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())


def test_callback_momentum_is_set_only_once_resuming_succeeds(tmp_path):
    model = tiny_plora_model()
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True, resume_from_checkpoint=None)
    saved = {"every": 2, "step_count": 6, "num_unloads": 3, "seed": 0, "optimizer_reset": "scale", "num_layers": 1}
    state = SimpleNamespace(global_step=6, stateful_callbacks={
        "PLoRACallback": {"args": {}, "attributes": {"_checkpoint_state": saved}}})
    callback = PLoRACallback(every=2, momentum=0.5)
    with pytest.raises(ValueError, match="num_layers"):  # a checkpoint of another model
        callback.on_train_begin(args, state, None, model=model, optimizer=None)
    assert callback.unloader is None and all(layer.momentum == 0.0 for _, layer in pk.plora_layers(model))
