"""PeriodicUnloader (stages, optimizer-state policies, exact resume) and the stage LR schedule."""
import io

import pytest
import torch
from torch import nn

from plora_kernels import PeriodicUnloader, apply_plora, plora_layers, stage_cosine_schedule
from plora_kernels.train import stage_lr_factor


def _model(momentum=0.0, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16)).to(dtype)
    return apply_plora(model, r=2, alpha=4, momentum=momentum)


def _batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 24, generator=g)
    return x.to(dtype), torch.sin(x[:, :16] * 2).to(dtype)


def _train(model, opt, unloader, steps, start=0, dtype=torch.float32):
    for step in range(start, steps):
        x, y = _batch(step, dtype)
        loss = (model(x).float() - y.float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        unloader.step()


def test_unloads_every_n_steps_and_zeroes_adam_state():
    model = _model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=3)
    assert unloader.optimizer_reset == "zero"
    w0 = [layer.weight.clone() for _, layer in plora_layers(model)]
    _train(model, opt, unloader, 7)
    assert unloader.num_unloads == 2
    assert all(int(layer.num_unloads) == 2 for _, layer in plora_layers(model))
    assert all(not torch.equal(layer.weight, w) for (_, layer), w in zip(plora_layers(model), w0))
    _train(model, opt, unloader, 9, start=7)  # the 9th step ends a stage
    for _, layer in plora_layers(model):
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
        for p in (layer.lora_A, layer.lora_B):
            for value in opt.state[p].values():
                assert torch.count_nonzero(value) == 0


def test_scale_policy_scales_moments_by_momentum():
    model = _model(momentum=0.25)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=2)
    assert unloader.optimizer_reset == "scale"
    _train(model, opt, unloader, 1)
    layer = next(iter(plora_layers(model)))[1]
    before = {k: v.clone() for k, v in opt.state[layer.lora_B].items()}
    x, y = _batch(1)
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    mid = {k: v.clone() for k, v in opt.state[layer.lora_B].items()}
    unloader.step()  # ends the stage
    after = opt.state[layer.lora_B]
    torch.testing.assert_close(after["exp_avg"], mid["exp_avg"] * 0.25)
    torch.testing.assert_close(after["exp_avg_sq"], mid["exp_avg_sq"] * 0.25)
    assert torch.equal(after["step"], mid["step"]) and not torch.equal(mid["step"], before["step"])


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="every must be a positive int"):
        PeriodicUnloader(model, None, every=0)
    with pytest.raises(ValueError, match="optimizer_reset must be one of"):
        PeriodicUnloader(model, None, every=2, optimizer_reset="clear")
    with pytest.raises(ValueError, match="no PLoRALinear layers"):
        PeriodicUnloader(nn.Linear(3, 3), None, every=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_mid_stage_is_bit_identical(dtype):
    """Checkpoint at step 5 (mid-stage, every=4), resume in a fresh process-like setup, compare to the
    uninterrupted run bit for bit; bf16 exercises stochastic rounding's derived generators."""
    steps, cut = 11, 5

    def fresh():
        model = _model(dtype=dtype)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        return model, opt, PeriodicUnloader(model, opt, every=4, seed=3)

    model, opt, unloader = fresh()
    _train(model, opt, unloader, steps, dtype=dtype)

    model2, opt2, unloader2 = fresh()
    _train(model2, opt2, unloader2, cut, dtype=dtype)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "unloader": unloader2.state_dict()}, buf)
    del model2, opt2, unloader2
    buf.seek(0)
    ckpt = torch.load(buf)
    model3, opt3, unloader3 = fresh()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    unloader3.load_state_dict(ckpt["unloader"])
    _train(model3, opt3, unloader3, steps, start=cut, dtype=dtype)
    assert unloader3.num_unloads == unloader.num_unloads == 2
    for (k, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(a, b), k


def test_plora_beats_lora_on_a_high_rank_target():
    """Fit y = x W*^T where W* - W0 is full rank: rank-2 LoRA plateaus, rank-2 PLoRA keeps going."""
    torch.manual_seed(0)
    n = 32
    target = nn.Linear(n, n, bias=False)
    losses = {}
    for name, every in (("lora", None), ("plora", 25)):
        torch.manual_seed(1)
        model = apply_plora(nn.Sequential(nn.Linear(n, n, bias=False)), r=2, alpha=2)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        unloader = PeriodicUnloader(model, opt, every=every) if every else None
        for step in range(400):
            x = torch.randn(64, n)
            loss = (model(x) - target(x).detach()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if unloader:
                unloader.step()
        x = torch.randn(512, n)
        losses[name] = (model(x) - target(x)).pow(2).mean().item()
    assert losses["plora"] < 0.5 * losses["lora"], losses


def test_stage_schedule_shape():
    f = [stage_lr_factor(s, total_steps=100, every=20, warmup=5, restart_warmup=3, min_lr_ratio=0.1)
         for s in range(100)]
    assert f[0] < f[4] < f[5] == pytest.approx(1.0, abs=1e-3)  # warmup then the envelope's top
    assert f[20] < f[19] and f[20] < f[21] < f[22] < f[23]  # re-warmup after the unload at step 20
    assert f[99] >= 0.1 and f[99] < f[50]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = stage_cosine_schedule(opt, total_steps=100, every=20, warmup=5, restart_warmup=3, min_lr_ratio=0.1)
    for s in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(f[s])
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="every must be a positive int"):
        stage_cosine_schedule(opt, 10, 0)


# --- issue 14: checkpoints that do not fit, nonsense schedules, a failed stage end -------------------------------

class _Wrapped(nn.Module):
    """Stands in for DDP / torch.compile: the user's model is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_state_dict_records_the_layers_and_a_checkpoint_of_another_model_is_refused():
    model = _model()
    unloader = PeriodicUnloader(model, None, every=2, seed=3)
    unloader.step()
    state = unloader.state_dict()
    assert state["num_layers"] == 2 and state["layer_names"] == ["0", "2"]
    PeriodicUnloader(_Wrapped(_model()), None, every=2).load_state_dict(state)  # wrapper prefixes are ignored
    bigger = apply_plora(nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 16)), r=2)
    other = PeriodicUnloader(bigger, None, every=2)
    with pytest.raises(ValueError, match="num_layers"):
        other.load_state_dict(state)
    assert (other.step_count, other.num_unloads, other.seed) == (0, 0, 0)  # unchanged
    with pytest.raises(ValueError, match="layer_names"):
        PeriodicUnloader(_model(), None, every=2).load_state_dict({**state, "layer_names": ["0", "1"]})
    legacy = {k: v for k, v in state.items() if k not in ("num_layers", "layer_names")}
    fresh = PeriodicUnloader(_model(), None, every=2)
    fresh.load_state_dict(legacy)  # older checkpoints carry no layer list
    assert (fresh.step_count, fresh.seed) == (1, 3)


@pytest.mark.parametrize("state,match", [
    ({"every": 2, "step_count": -1, "num_unloads": 0, "seed": 0, "optimizer_reset": "zero"}, "step_count"),
    ({"every": 2, "step_count": 4, "num_unloads": 2, "seed": 0, "optimizer_reset": "reset"}, "optimizer_reset"),
    ({"every": 2, "step_count": 4, "seed": 0, "optimizer_reset": "zero"}, "num_unloads"),
])
def test_load_state_dict_refuses_nonsense_and_changes_nothing(state, match):
    unloader = PeriodicUnloader(_model(), None, every=2)
    with pytest.raises(ValueError, match=match):
        unloader.load_state_dict(state)
    assert (unloader.step_count, unloader.num_unloads, unloader.optimizer_reset) == (0, 0, "zero")


def test_a_refused_unload_at_a_stage_end_changes_nothing():
    model = _model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=2)
    _train(model, opt, unloader, 1)
    layer = model[2]
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    opt.zero_grad()
    opt.step()  # the stage's 2nd optimizer step (no gradients: nothing moves); step() counts real steps only
    def bits(t):  # raw bytes: the NaN compares equal to itself
        return t.detach().reshape(-1).view(torch.uint8).clone()

    saved = ({k: bits(v) for k, v in model.state_dict().items()},
             {id(p): {k: bits(v) for k, v in s.items()} for p, s in opt.state.items()})
    with pytest.raises(ValueError, match=r"unload_ \(2\): lora_B contains non-finite"):
        unloader.step()
    assert unloader.step_count == 1 and unloader.num_unloads == 0  # the stage end can be retried
    assert all(torch.equal(bits(v), saved[0][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(bits(v), saved[1][id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


def test_periodic_unloader_refuses_a_non_optimizer_before_unloading():
    model = _model()
    w = [layer.weight.clone() for _, layer in plora_layers(model)]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        PeriodicUnloader(model, [p for p in model.parameters() if p.requires_grad], every=1)
    assert all(torch.equal(layer.weight, w0) for (_, layer), w0 in zip(plora_layers(model), w))


@pytest.mark.parametrize("kw,match", [(dict(warmup=-1), "warmup"), (dict(warmup=11), "warmup"),
                                      (dict(restart_warmup=-2), "restart_warmup"), (dict(min_lr_ratio="0"), "min_lr")])
def test_stage_schedule_refuses_nonsense(kw, match):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises((ValueError, TypeError), match=match):
        stage_cosine_schedule(opt, total_steps=10, every=2, **kw)
    assert opt.param_groups[0]["lr"] == 1.0 and "initial_lr" not in opt.param_groups[0]
    stage_cosine_schedule(opt, total_steps=10, every=20, warmup=10)  # the edges are fine: one stage, all warmup


def test_an_optimizer_without_the_adapters_is_flagged():
    model = _model()
    frozen = [p for p in model.parameters() if not p.requires_grad]  # e.g. built before apply_plora
    with pytest.warns(UserWarning, match="holds none of the adapters"):
        PeriodicUnloader(model, torch.optim.SGD(frozen, lr=0.1), every=2)
