"""PLoRALinear and model patching on a tiny transformers Llama (built from a config, nothing downloaded)."""
import os

import pytest
import torch
from torch import nn

from plora_kernels import PLoRALinear, apply_plora, merge_plora, plora_layers, unload_all_

from helpers import DEVICE

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(DEVICE).eval()


def test_layer_defaults_and_repr():
    layer = PLoRALinear(129, 77, r=3, alpha=6, dtype=torch.bfloat16, device=DEVICE)
    assert layer.scaling == 2.0 and layer.rounding == "stochastic"
    assert layer.lora_A.dtype == torch.float32  # PEFT's default: fp32 adapters on a 16-bit base
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert "r=3" in repr(layer) and "unloads=0" in repr(layer)
    assert PLoRALinear(8, 4).rounding == "nearest"
    with pytest.raises(ValueError, match="r must be a positive int"):
        PLoRALinear(8, 4, r=0)
    with pytest.raises(ValueError, match="momentum"):
        PLoRALinear(8, 4, momentum=1.5)


def test_from_linear_shares_weight_and_starts_exact():
    lin = nn.Linear(129, 77).to(DEVICE)
    layer = PLoRALinear.from_linear(lin, r=4, alpha=8)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    x = torch.randn(3, 5, 129, device=DEVICE)
    assert torch.equal(layer(x), lin(x))  # B = 0 at init: bit-exact
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        PLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_unload_counts_and_merged_linear_matches(backend):
    layer = PLoRALinear(64, 48, r=4, alpha=8, device=DEVICE, momentum=0.2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 64, device=DEVICE)
    merged = layer.merged_linear()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    before = layer(x)
    layer.unload_()
    assert int(layer.num_unloads) == 1 and "unloads=1" in repr(layer)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)  # m > 0: output preserved


def test_apply_plora_defaults_skip_lm_head_and_keep_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 11), device=DEVICE)
    with torch.no_grad():
        want = model(ids).logits
    apply_plora(model, r=4, alpha=8)
    names = [n for n, _ in plora_layers(model)]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any("lm_head" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # B = 0: patched model is bit-exact at init


def test_apply_plora_tied_head_and_target_modules():
    model = tiny_llama(tie=True)
    apply_plora(model, target_modules=["q_proj", "v_proj"], r=2)
    names = [n for n, _ in plora_layers(model)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    model2 = tiny_llama(tie=True)
    apply_plora(model2, target_modules=r".*layers\.0\.mlp\..*", r=2)
    assert [n.split(".")[-1] for n, _ in plora_layers(model2)] == ["gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_plora(tiny_llama(), target_modules=["nope"])


def test_unload_all_and_merge_plora_on_llama(backend):
    model = tiny_llama()
    apply_plora(model, r=4, alpha=8, momentum=0.0)
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    with torch.no_grad():
        for _, layer in plora_layers(model):
            layer.lora_B.normal_(std=0.05)
        want = model(ids).logits
    merged = merge_plora(tiny_llama())  # no PLoRA layers: a no-op
    assert not list(plora_layers(merged))
    assert unload_all_(model) == 14
    with torch.no_grad():
        after_unload = model(ids).logits  # W holds the update, B = 0: same function
    torch.testing.assert_close(after_unload, want, rtol=1e-4, atol=1e-4)
    merge_plora(model)
    assert not list(plora_layers(model)) and not any(isinstance(m, PLoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


# --- issue 14: patching twice, tied weights, all-or-nothing merges ----------------------------------------------

def test_apply_plora_twice_keeps_the_first_calls_adapters_trainable():
    """A different r per group of modules is two calls; the second must not freeze the first one's adapters."""
    model = tiny_llama()
    apply_plora(model, target_modules=["q_proj", "v_proj"], r=4)
    apply_plora(model, target_modules=["gate_proj", "up_proj", "down_proj"], r=2)
    ranks = {n.split(".")[-1]: layer.r for n, layer in plora_layers(model)}
    assert ranks == {"q_proj": 4, "v_proj": 4, "gate_proj": 2, "up_proj": 2, "down_proj": 2}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n, _ in plora_layers(model) for f in ("lora_A", "lora_B")}
    with pytest.raises(ValueError, match="already PLoRALinear"):  # nothing left to patch in that group
        apply_plora(model, target_modules=["q_proj"], r=8)


def test_tied_lm_head_is_untied_with_a_warning_and_unloads_leave_the_embedding_alone():
    model = tiny_llama(tie=True)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    with torch.no_grad():
        want = model(ids).logits
    with pytest.warns(UserWarning, match=r"untied lm_head \(tied to model\.embed_tokens\.weight\)"):
        apply_plora(model, target_modules=["lm_head", "q_proj"], r=2)
    head = model.lm_head
    assert isinstance(head, PLoRALinear) and head.weight is not emb
    assert head.weight.data_ptr() != emb.data_ptr() and torch.equal(head.weight, emb)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # transformers' own re-tying (save/load, resize) must not undo it
    assert model.lm_head.weight.data_ptr() != emb.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # B = 0: the same function
        head.lora_B.normal_(std=0.1)
        before = model(ids).logits
    emb_before = emb.detach().clone()
    unload_all_(model)
    assert torch.equal(emb, emb_before)  # the unload moved the head only
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)  # no jump at the unload


def test_a_retied_layer_is_refused_by_unloads_and_untied_by_merge_plora():
    from plora_kernels import PeriodicUnloader

    model = tiny_llama(tie=True)
    apply_plora(model, target_modules=["q_proj"], r=2)
    model.lm_head = PLoRALinear.from_linear(model.lm_head, r=2)  # by hand: still shares the embedding's weight
    with torch.no_grad():
        model.lm_head.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    with torch.no_grad():
        want = model(ids).logits
    for refuse in (lambda: unload_all_(model), lambda: PeriodicUnloader(model, None, every=2)):
        with pytest.raises(ValueError, match=r"'lm_head' is shared with \['model\.embed_tokens\.weight'\]"):
            refuse()
    with pytest.warns(UserWarning, match="merge_plora: untied lm_head"):
        merge_plora(model)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)  # the function is kept


def test_targeted_tied_head_merges_saves_and_reloads_consistently(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama(tie=True)
    with pytest.warns(UserWarning, match="untied"):
        apply_plora(model, target_modules=["lm_head"], r=2)
    with torch.no_grad():
        model.lm_head.lora_B.normal_(std=0.1)
    unload_all_(model)
    with torch.no_grad():
        model.lm_head.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    merge_plora(model)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)


def test_merge_plora_is_all_or_nothing_and_draws_no_random_numbers(backend):
    model = tiny_llama()
    apply_plora(model, r=2, alpha=2)
    layers = dict(plora_layers(model))
    last = list(layers)[-1]
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(std=0.05)
        layers[last].lora_A[0, 0] = float("inf")  # only the last layer's merge is refused
    with pytest.raises(ValueError, match=last.replace(".", r"\.")):
        merge_plora(model)
    assert dict(plora_layers(model)) == layers  # no layer was replaced
    with torch.no_grad():
        layers[last].lora_A[0, 0] = 0.0
    rng = torch.get_rng_state()
    merge_plora(model)
    assert torch.equal(torch.get_rng_state(), rng) and not list(plora_layers(model))


def test_bare_layers_are_refused_not_returned_unchanged():
    lin = nn.Linear(8, 4)
    with pytest.raises(TypeError, match="from_linear"):
        apply_plora(lin)
    assert lin.weight.requires_grad and not dict(lin.named_children())
    layer = PLoRALinear(8, 4)
    with pytest.raises(TypeError, match="merged_linear"):
        merge_plora(layer)
    assert not dict(layer.named_children())


def test_a_module_used_twice_is_patched_unloaded_and_merged_everywhere(backend):
    """Weight sharing by module reuse: the same Linear at two places gets one PLoRALinear at both, which is not a
    tie (its adapter is shared too), and merge_plora replaces it at both."""
    import warnings

    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.Tanh(), shared).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "untied" warning
        apply_plora(model, r=2)
    assert isinstance(model[0], PLoRALinear) and model[2] is model[0]
    with torch.no_grad():
        model[0].lora_B.normal_(std=0.1)
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        want = model(x)
    assert unload_all_(model) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model[0].lora_B.normal_(std=0.1)
        want = model(x)
    merge_plora(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
