"""Checkpoints of a PLoRA-patched model: ``load_plora`` restores them exactly, or refuses, naming what differs.

A save mid-run (after optimizer steps and an unload) restored with load_plora into a fresh model continues
training bit for bit like the uninterrupted run; plain ``from_pretrained`` (what a user does without us) drops
the adapters, which is the failure this module exists for. Tiny LlamaForCausalLM models built from a config:
nothing is downloaded.
"""
import json
import os
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import plora_kernels as pk  # noqa: E402
from plora_kernels.checkpoint import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from plora_kernels.nn.patching import plora_record  # noqa: E402

VOCAB, SEQ, BATCH = 64, 16, 4
TARGETS = ["q_proj", "v_proj", "up_proj"]
PATCH = dict(r=4, alpha=8, lora_dropout=0.1)


def tiny_config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaConfig(**{**base, **kw})


def fresh_plain(seed=0, **config_kw):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**config_kw))


def fresh(seed=0, targets=TARGETS, config_kw=None, **patch):
    model = pk.apply_plora(fresh_plain(seed, **(config_kw or {})), targets, **{**PATCH, **patch})
    return model.train()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(model, optimizer, unloader, data):
    for x in data:
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        unloader.step()


@torch.no_grad()
def logits(model, x):
    was = model.training
    model.eval()
    try:
        return model(input_ids=x).logits
    finally:
        model.train(was)


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def save_run(model, optimizer, unloader, folder, *, with_model=True):
    """What a user saves mid-run: the model (save_pretrained), the optimizer, the unloader and the RNG."""
    if with_model:
        model.save_pretrained(folder)
    torch.save({"optimizer": optimizer.state_dict(), "unloader": unloader.state_dict(),
                "rng": torch.get_rng_state()}, os.path.join(folder, "train_state.pt"))


def resume_run(model, folder, every):
    state = torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
    optimizer = make_optimizer(model)
    optimizer.load_state_dict(state["optimizer"])
    unloader = pk.PeriodicUnloader(model, optimizer, every=every)
    unloader.load_state_dict(state["unloader"])
    torch.set_rng_state(state["rng"])
    return optimizer, unloader


EVERY, STEPS, SAVE_AT = 3, 10, 5


@pytest.fixture(scope="module")
def straight_run():
    """The uninterrupted run: 10 steps, an unload every 3 (at 3, 6, 9), LoRA dropout on."""
    data = batches(STEPS)
    model = fresh()
    optimizer = make_optimizer(model)
    unloader = pk.PeriodicUnloader(model, optimizer, every=EVERY)
    train(model, optimizer, unloader, data)
    assert unloader.num_unloads == 3
    return model, data


@pytest.fixture
def mid_run_checkpoint(tmp_path):
    """The same run interrupted after step 5 (one unload done, mid-stage), saved as a user would."""
    data = batches(STEPS)
    model = fresh()
    optimizer = make_optimizer(model)
    unloader = pk.PeriodicUnloader(model, optimizer, every=EVERY)
    train(model, optimizer, unloader, data[:SAVE_AT])
    assert unloader.num_unloads == 1
    folder = str(tmp_path / "ckpt")
    save_run(model, optimizer, unloader, folder)
    return folder, model


@pytest.mark.parametrize("into", ["class", "unpatched instance", "patched instance"])
def test_resume_mid_run_is_bit_exact(straight_run, mid_run_checkpoint, into):
    ref, data = straight_run
    folder, saved = mid_run_checkpoint
    record = json.load(open(os.path.join(folder, "config.json")))["plora"]  # the record, in config.json
    assert record["format"] == 1 and record["package_version"] == pk.__version__
    assert record["calls"] == [{"target_modules": sorted(TARGETS), "r": 4, "alpha": 8.0, "momentum": 0.0,
                                "rounding": None, "lora_dropout": 0.1, "adapter_dtype": None, "layers": 6}]
    torch.manual_seed(12345)  # a fresh process's RNG: the resume restores the saved one
    if into == "class":
        model = pk.load_plora(LlamaForCausalLM, folder)
    elif into == "unpatched instance":
        model = pk.load_plora(fresh_plain(seed=7), folder)
    else:
        model = pk.load_plora(fresh(seed=7), folder)
    model.train()
    assert_same_state(model, saved)  # exactly the saved model: W, adapters, unload counts
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, pk.PLoRALinear) and layer.lora_dropout == 0.1 and int(layer.num_unloads) == 1
    optimizer, unloader = resume_run(model, folder, EVERY)
    train(model, optimizer, unloader, data[SAVE_AT:])
    assert unloader.num_unloads == 3
    assert_same_state(model, ref)  # bit for bit the uninterrupted run
    x = batches(1, seed=99)[0]
    assert torch.equal(logits(model, x), logits(ref, x))


def test_plain_from_pretrained_drops_the_adapters(mid_run_checkpoint):
    """What fails without load_plora: transformers alone builds nn.Linear layers and drops lora_A/lora_B, so the
    model computes something else; apply_plora on it afterwards warns (the record is still in its config)."""
    folder, saved = mid_run_checkpoint
    plain = LlamaForCausalLM.from_pretrained(folder)
    x = batches(1, seed=99)[0]
    gap = (logits(plain, x) - logits(saved, x)).abs().max().item()
    assert gap > 1e-3  # not the saved model
    assert not any(True for _ in pk.plora_layers(plain))
    assert plain.config.plora["calls"][0]["r"] == 4  # the record survives in its config...
    with pytest.warns(UserWarning, match="load_plora"):  # ...so continuing to train it is flagged
        pk.apply_plora(plain, TARGETS, **PATCH)
    # and load_plora refuses a checkpoint saved from such a model: a record without adapters
    pk.merge_plora(plain)
    assert getattr(plain.config, "plora", None) is None  # merged: plain again, no record
    loaded = pk.load_plora(LlamaForCausalLM, folder)
    assert torch.equal(logits(loaded, x), logits(saved, x))


def test_record_without_adapters_is_refused(mid_run_checkpoint, tmp_path):
    folder, _ = mid_run_checkpoint
    plain = LlamaForCausalLM.from_pretrained(folder)  # adapters dropped, record kept in its config
    plain.save_pretrained(tmp_path / "dropped")
    with pytest.raises(ValueError, match="holds no adapters"):
        pk.load_plora(LlamaForCausalLM, tmp_path / "dropped")
    # save_plora knows better: an unpatched model is saved without a record
    pk.save_plora(plain, tmp_path / "plain")
    assert "plora" not in json.load(open(tmp_path / "plain" / "config.json"))
    loaded = pk.load_plora(LlamaForCausalLM, tmp_path / "plain")
    assert not any(True for _ in pk.plora_layers(loaded))


def test_trainer_checkpoint_restores(tmp_path):
    """A Trainer checkpoint-N (PLoRACallback) restores exactly with load_plora; plain from_pretrained does not."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from plora_kernels.integrations.transformers import PLoRACallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = fresh(lora_dropout=0.0)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=BATCH, learning_rate=1e-2,
                             save_steps=4, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(4 * BATCH), callbacks=[PLoRACallback(every=3)])
    trainer.train()
    folder = tmp_path / "out" / "checkpoint-4"
    loaded = pk.load_plora(LlamaForCausalLM, folder)
    assert_same_state(loaded, model)
    assert int(loaded.model.layers[1].mlp.up_proj.num_unloads) == 1
    x = batches(1, seed=5)[0]
    assert torch.equal(logits(loaded, x), logits(model, x))
    plain = LlamaForCausalLM.from_pretrained(folder)
    assert not torch.equal(logits(plain, x), logits(model, x))


def test_bf16_and_tied_embeddings(tmp_path):
    """A bf16 model with an LM head tied to the embedding (saved once) and fp32 adapters, into the class (the
    checkpoint's dtype) and into an unpatched instance. The models are built as users build them, from_pretrained
    in bf16 (a model cast with .to() has its rotary buffer in bf16, which from_pretrained keeps in fp32: plain
    transformers round trips differ there too)."""
    fresh_plain(tie_word_embeddings=True).save_pretrained(tmp_path / "base")

    def base():
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)

    model = pk.apply_plora(base(), ["q_proj", "o_proj"], r=2, alpha=4)
    with torch.no_grad():
        for _, layer in pk.plora_layers(model):
            layer.lora_B.normal_()
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    model.save_pretrained(tmp_path / "ck")
    x = batches(1)[0]
    for target in (LlamaForCausalLM, base()):
        loaded = pk.load_plora(target, tmp_path / "ck")
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert_same_state(loaded, model)
        assert torch.equal(logits(loaded, x), logits(model, x))


def test_plain_module_save_plora_round_trip(tmp_path):
    """A model without a transformers config: save_plora writes plora_model.pt and plora_config.json."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    model = pk.apply_plora(net(), ["0"], r=2, alpha=4, momentum=0.5)
    pk.apply_plora(model, ["2"], r=3, alpha=3, rounding="stochastic")
    with torch.no_grad():
        for _, layer in pk.plora_layers(model):
            layer.lora_B.normal_()
    folder = pk.save_plora(model, tmp_path / "seq")
    assert sorted(os.listdir(folder)) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert [c["r"] for c in json.load(open(os.path.join(folder, CONFIG_FILE)))["calls"]] == [2, 3]
    loaded = pk.load_plora(net(), folder)
    assert_same_state(loaded, model)
    assert loaded[0].momentum == 0.5 and loaded[2].rounding == "stochastic"
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), model(x))
    # layers made by hand (no apply_plora record): save_plora records them as they are
    hand = net()
    hand[2] = pk.PLoRALinear.from_linear(hand[2], r=2, alpha=5)
    assert plora_record(hand) is None
    pk.save_plora(hand, tmp_path / "hand")
    loaded = pk.load_plora(net(), tmp_path / "hand")
    assert loaded[2].alpha == 5 and isinstance(loaded[0], nn.Linear) and type(loaded[0]) is nn.Linear
    assert_same_state(loaded, hand)


def test_plain_state_dict_into_a_patched_model(tmp_path, mid_run_checkpoint):
    """A plain state_dict carries no record: load_plora takes it into a model patched the same way (checking the
    layers and ranks) and refuses it into an unpatched one."""
    _, saved = mid_run_checkpoint
    path = tmp_path / "sd.pt"
    torch.save(saved.state_dict(), path)
    loaded = pk.load_plora(fresh(seed=3), path)
    assert_same_state(loaded, saved)
    assert_same_state(pk.load_plora(fresh(seed=4), saved.state_dict()), saved)
    plain = fresh_plain(seed=3)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="no record"):
        pk.load_plora(plain, path)
    assert not any(True for _ in pk.plora_layers(plain))  # unchanged
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    with pytest.raises(ValueError, match="r=4.*r=2"):
        pk.load_plora(fresh(seed=3, r=2), path)
    with pytest.raises(ValueError, match="target_modules"):
        pk.load_plora(fresh(seed=3, targets=["q_proj"]), path)


@pytest.mark.parametrize("setting, patch, message", [
    ("target_modules", dict(targets=["q_proj", "v_proj"]), "target_modules="),
    ("r", dict(r=8), "r=4"),
    ("alpha", dict(alpha=16), "alpha=8.0"),
    ("momentum", dict(momentum=0.5), "momentum=0.0"),
    ("rounding", dict(rounding="nearest"), "rounding=None"),
    ("lora_dropout", dict(lora_dropout=0.0), "lora_dropout=0.1"),
    ("adapter_dtype", dict(adapter_dtype=torch.float64), "adapter_dtype=None"),
])
def test_refuses_a_model_patched_differently(mid_run_checkpoint, setting, patch, message):
    folder, _ = mid_run_checkpoint
    model = fresh(seed=3, **patch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        pk.load_plora(model, folder)
    assert f"{setting}=" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed


def test_check_checkpoint_reads_only_the_patch(mid_run_checkpoint):
    """check_checkpoint (for code that loads the weights itself, as the Trainer does on resume) says what
    load_plora would refuse, and changes nothing."""
    from plora_kernels.checkpoint import check_checkpoint

    folder, _ = mid_run_checkpoint
    model = fresh(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert check_checkpoint(model, folder) is None
    with pytest.raises(ValueError, match="target_modules"):
        check_checkpoint(fresh(seed=3, targets=["q_proj"]), folder)
    with pytest.raises(ValueError, match="r=4"):
        check_checkpoint(fresh(seed=3, r=2), folder)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_refuses_a_second_apply_plora_call(mid_run_checkpoint):
    folder, _ = mid_run_checkpoint
    model = pk.apply_plora(fresh(seed=3), ["k_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="patched by 2"):
        pk.load_plora(model, folder)


def test_refuses_without_record_or_adapters(mid_run_checkpoint, tmp_path):
    folder, saved = mid_run_checkpoint
    # live adapters but the record removed from config.json: loading into a class cannot know the patch
    stripped = tmp_path / "stripped"
    saved.save_pretrained(stripped)
    config = json.load(open(stripped / "config.json"))
    del config["plora"]
    json.dump(config, open(stripped / "config.json", "w"))
    with pytest.raises(ValueError, match="holds live PLoRA adapters.*no record"):
        pk.load_plora(LlamaForCausalLM, stripped)
    # ...but into a model patched the same way it loads (checked on layers and ranks)
    assert_same_state(pk.load_plora(fresh(seed=3), stripped), saved)
    # a merged checkpoint (no adapters) into a patched model
    merged = pk.merge_plora(fresh(seed=1))
    merged.save_pretrained(tmp_path / "merged")
    assert "plora" not in json.load(open(tmp_path / "merged" / "config.json"))
    with pytest.raises(ValueError, match="holds no PLoRA adapters"):
        pk.load_plora(fresh(seed=3), tmp_path / "merged")
    plain = pk.load_plora(LlamaForCausalLM, tmp_path / "merged")  # a plain checkpoint loads as a plain model
    assert_same_state(plain, merged)
    # a record from a newer release
    newer = tmp_path / "newer"
    saved.save_pretrained(newer)
    config = json.load(open(newer / "config.json"))
    config["plora"]["format"] = 99
    json.dump(config, open(newer / "config.json", "w"))
    with pytest.raises(ValueError, match="upgrade plora_kernels"):
        pk.load_plora(LlamaForCausalLM, newer)
    # from_pretrained's keywords belong to a class; a checkpoint of another model
    with pytest.raises(TypeError, match="from_pretrained"):
        pk.load_plora(fresh(seed=3), folder, dtype=torch.float32)
    with pytest.raises(ValueError, match="another model"):
        pk.load_plora(pk.apply_plora(fresh_plain(seed=3, vocab_size=VOCAB * 2), TARGETS, **PATCH), folder)


def test_merge_removes_the_record_and_apply_records_each_call():
    model = fresh()
    pk.apply_plora(model, "model\\.layers\\.0\\.mlp\\.down_proj", r=2, alpha=2)
    calls = model.config.plora["calls"]
    assert [c["target_modules"] for c in calls] == [sorted(TARGETS), "model\\.layers\\.0\\.mlp\\.down_proj"]
    assert [c["layers"] for c in calls] == [6, 1]
    pk.merge_plora(model)
    assert getattr(model.config, "plora", None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # merged, then patched again: no stale-record warning
        pk.apply_plora(model, ["k_proj"], r=2, alpha=2)
    assert len(model.config.plora["calls"]) == 1


def test_the_callback_writes_the_merged_model_at_the_end_when_asked(tmp_path):
    """PLoRACallback(merged_output=...) ends training by writing what merge_plora would make, as a plain
    checkpoint: transformers alone loads it with no unexpected or missing key, its logits are the merged model's,
    its config holds no PLoRA record, and the training model is left patched and unchanged."""
    from transformers import Trainer, TrainingArguments

    from plora_kernels.integrations.transformers import PLoRACallback

    model = fresh(lora_dropout=0.0)
    data = [{"input_ids": x, "labels": x} for x in torch.cat(batches(4)).split(1)]
    args = TrainingArguments(str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no")
    out = tmp_path / "merged"
    Trainer(model=model, args=args, train_dataset=data, callbacks=[PLoRACallback(every=4, merged_output=out)]).train()
    layers = [layer for _, layer in pk.plora_layers(model)]
    assert layers and int(layers[0].num_unloads) >= 1  # still patched, and it unloaded
    assert "plora" not in json.loads((out / "config.json").read_text()) and plora_record(model) is not None

    loaded, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    reference = fresh(lora_dropout=0.0)
    reference.load_state_dict(model.state_dict())
    pk.merge_plora(reference)
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=x).logits, reference.eval()(input_ids=x).logits,
                                   rtol=0, atol=0)
