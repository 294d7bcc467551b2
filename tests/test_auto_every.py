"""auto_every (the unload interval ``plora study`` supports for a run's length) and ``every="auto"`` in
PeriodicUnloader and stage_cosine_schedule."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import plora_kernels as pk
from plora_kernels import PeriodicUnloader, apply_plora, auto_every, stage_cosine_schedule
from plora_kernels.train import stage_lr_factor


def _model():
    torch.manual_seed(0)
    return apply_plora(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), r=2, alpha=4)


def _opt(model):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("steps,every", [
    (0, 1), (1, 2), (150, 151), (399, 400),     # below 400 steps: longer than the run, i.e. no unload
    (400, 80), (799, 80), (800, 80),            # stages of at least 80 steps
    (1000, 100), (5000, 500), (10_000, 1000),   # at most 10 stages
])
def test_values_at_the_boundaries(steps, every):
    assert auto_every(steps) == every
    assert isinstance(auto_every(steps), int)


def test_never_unloads_below_400_steps_and_has_5_to_10_stages_of_80_plus_above():
    for n in range(0, 400):
        assert auto_every(n) > n
    for n in list(range(400, 2001)) + [4321, 65_536, 10**7]:
        e = auto_every(n)
        assert e >= 80 and 5 <= n // e <= 10, (n, e)


def test_parameters_of_the_rule():
    assert auto_every(100, min_stage=10, min_stages=5, max_stages=10) == 10
    assert auto_every(49, min_stage=10, min_stages=5) == 50
    assert auto_every(np.int64(1000)) == 100  # any integral type


@pytest.mark.parametrize("arg,exc,words", [
    (-1, ValueError, "total_steps"), (400.0, TypeError, "total_steps"), ("400", TypeError, "total_steps"),
    (True, TypeError, "total_steps"), (None, TypeError, "total_steps"), (torch.tensor(400), TypeError, "total_steps"),
])
def test_bad_total_steps_is_refused_naming_it(arg, exc, words):
    with pytest.raises(exc, match=words):
        auto_every(arg)


@pytest.mark.parametrize("kw,words", [(dict(min_stage=0), "min_stage"), (dict(min_stages=0), "min_stages"),
                                      (dict(max_stages=1.5), "max_stages"), (dict(min_stages=11), "min_stages")])
def test_bad_rule_parameters_are_refused(kw, words):
    with pytest.raises((TypeError, ValueError), match=words):
        auto_every(1000, **kw)


def test_the_study_uses_the_library_rule():
    from plora_kernels import study

    assert study.auto_every is pk.auto_every is pk.train.auto_every
    assert (study.MIN_STAGE, study.MIN_STAGES, study.MAX_STAGES) == (80, 5, 10)
    assert study.resolve_every("auto", 1000) == 100


# ------------------------------------------------------------------------------------------ PeriodicUnloader
def test_unloader_auto_resolves_from_total_steps_and_state_dict_stores_the_int():
    model = _model()
    u = PeriodicUnloader(model, None, "auto", total_steps=1000, seed=3)  # no optimizer: every step() counts
    assert u.every == 100 and u.total_steps == 1000
    for _ in range(250):
        u.step()
    assert u.num_unloads == 2
    state = u.state_dict()
    assert state["every"] == 100 and state["step_count"] == 250

    again = _model()
    v = PeriodicUnloader(again, _opt(again), every="auto", total_steps=1000, seed=0)
    v.load_state_dict(state)
    assert (v.every, v.step_count, v.num_unloads, v.seed) == (100, 250, 2, 3)
    w = PeriodicUnloader(again, _opt(again), 100)  # the same run with the interval spelled out
    w.load_state_dict(state)
    with pytest.raises(ValueError, match="every"):  # a run of another length resolves to another interval
        PeriodicUnloader(again, _opt(again), "auto", total_steps=2000).load_state_dict(state)


def test_unloader_auto_without_total_steps_is_refused_naming_it():
    model = _model()
    with pytest.raises(ValueError, match="total_steps"):
        PeriodicUnloader(model, _opt(model), "auto")
    with pytest.raises(TypeError, match="total_steps"):
        PeriodicUnloader(model, _opt(model), "auto", total_steps=800.0)
    with pytest.raises(ValueError, match="total_steps"):
        PeriodicUnloader(model, _opt(model), "auto", total_steps=0)


@pytest.mark.parametrize("every", ["Auto", "80", 0, -5, 2.5, True, None])
def test_unloader_bad_every_names_it(every):
    model = _model()
    with pytest.raises(ValueError, match="every"):
        PeriodicUnloader(model, _opt(model), every, total_steps=800)


def test_unloader_auto_in_a_short_run_warns_and_never_unloads():
    model = _model()
    w0 = [layer.weight.clone() for _, layer in pk.plora_layers(model)]
    with pytest.warns(UserWarning, match="total_steps=300.*plain LoRA"):
        u = PeriodicUnloader(model, _opt(model), "auto", total_steps=300)
    assert u.every == 301
    assert not any(u.step() for _ in range(300))
    assert u.num_unloads == 0
    assert all(torch.equal(layer.weight, w) for (_, layer), w in zip(pk.plora_layers(model), w0))


def test_unloader_int_every_is_unchanged_and_takes_no_warning():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u = PeriodicUnloader(model, None, 3)  # total_steps is optional with an int every
        assert PeriodicUnloader(model, _opt(model), np.int64(500), total_steps=300).every == 500
    assert [u.step() for _ in range(6)] == [False, False, True, False, False, True]


# ------------------------------------------------------------------------------------------- the schedule
def test_schedule_auto_is_the_default_and_matches_the_unloader():
    model = _model()
    for steps in (300, 1000):
        opt = _opt(model)
        sched = stage_cosine_schedule(opt, total_steps=steps, warmup=5, restart_warmup=3)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        every = auto_every(steps)
        want = [1e-2 * stage_lr_factor(s, steps, every, warmup=5, restart_warmup=3) for s in range(steps)]
        assert lrs == pytest.approx(want)
        explicit = stage_cosine_schedule(_opt(model), steps, every="auto", warmup=5, restart_warmup=3)
        assert explicit.lr_lambdas[0](every) == sched.lr_lambdas[0](every)
    # 1000 steps: re-warm-ups after the unloads at 100, 200, ...; 300 steps: one stage, no re-warm-up
    assert stage_lr_factor(100, 1000, 100, 5, 3) < stage_lr_factor(99, 1000, 100, 5, 3)


@pytest.mark.parametrize("every", ["never", 0, 1.5])
def test_schedule_bad_every_names_it(every):
    with pytest.raises(ValueError, match="every"):
        stage_cosine_schedule(_opt(_model()), 100, every=every)
