"""plora study: the rule for ``every``, the unload variants it adds, and a tiny end-to-end run (< 60 s)."""
import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from plora_kernels import (
    apply_plora,  # noqa: E402
    study,  # noqa: E402
)


def test_auto_every_rule():
    import plora_kernels

    assert study.auto_every is plora_kernels.auto_every  # one rule: the library's
    m, k = study.MIN_STAGE, study.MIN_STAGES
    assert (m, k, study.MAX_STAGES) == (80, 5, 10)
    for short in (1, 150, 300, k * m - 1):               # room for fewer than k stages: never unload
        assert study.auto_every(short) == short + 1
    assert study.auto_every(k * m) == m                  # 400 steps: five stages of 80
    assert study.auto_every(600) == 80 and study.auto_every(800) == 80
    assert study.auto_every(2000) == 200 and study.auto_every(10_000) == 1000
    for n in range(k * m, 5000, 37):
        e = study.auto_every(n)
        assert e >= m and k <= n // e <= study.MAX_STAGES


def test_resolve_every():
    assert study.resolve_every(25, 150) == 25
    assert study.resolve_every(0.5, 150) == 75
    assert study.resolve_every("auto", 800) == study.auto_every(800)
    for never in (None, 0, "never"):
        assert study.resolve_every(never, 150) == 151
    for bad in (-1, 1.5, "often", True):
        with pytest.raises(ValueError):
            study.resolve_every(bad, 150)


def test_parse_variant():
    c = study._parse_variant("x:every=40,momentum=0.5,optimizer_reset=keep,a_init=keep,steps=300")
    assert c.method == "plora" and c.steps == 300
    assert c.variant["every"] == 40 and c.variant["momentum"] == 0.5 and c.variant["a_init"] == "keep"
    assert c.variant["restart_warmup"] == study.RECOMMENDED_PLORA["restart_warmup"]
    assert study._parse_variant("y:every=0.25").variant["every"] == 0.25
    with pytest.raises(ValueError, match="unknown variant key"):
        study._parse_variant("z:evrey=3")


@pytest.mark.parametrize("a_init", ["redraw", "keep", "rescale"])
def test_study_unloader_a_init(a_init):
    torch.manual_seed(0)
    model = apply_plora(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16)), r=2, alpha=4)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.mul_(3.0)
    a_old, w_old = layer.lora_A.detach().clone(), layer.weight.detach().clone()
    merged = layer.scaling * layer.lora_B.detach() @ a_old
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    u = study._make_unloader(model, opt, every=1, optimizer_reset="zero", seed=0, a_init=a_init)
    opt.step()  # an optimizer step (no gradients: nothing moves); PeriodicUnloader.step() counts real steps only
    assert u.step()
    torch.testing.assert_close(layer.weight, w_old + merged)
    assert float(layer.lora_B.detach().abs().max()) == 0.0
    if a_init == "keep":
        assert torch.equal(layer.lora_A, a_old)
    else:
        assert not torch.equal(layer.lora_A, a_old)
    if a_init == "rescale":
        torch.testing.assert_close(layer.lora_A.norm(), a_old.norm())
    assert len(u.a_norm_ratio) == 1 and u.a_norm_ratio[0] > 1.5  # A was 3x a fresh draw


def test_smoke_study_writes_records(tmp_path, monkeypatch):
    monkeypatch.setenv("PLORA_STUDY_CACHE", str(tmp_path / "cache"))
    files = study._stdlib_files()
    monkeypatch.setattr(study, "_stdlib_files", lambda: files[::4])  # a quarter of the stdlib: quicker corpora
    out = tmp_path / "results"
    res = study.run_study(study.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--smoke", "--jobs", "1", "--no-progress", "--out", str(out), "--variant", "often:every=2"]))
    for kind in ("json", "png", "txt"):
        files = list(out.glob(f"study-*.{kind}"))
        assert len(files) == 1, kind
    assert open(res["files"]["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(open(res["files"]["json"]).read())
    summary = saved["summary"]
    blocks = {k.split(" ")[0] for k in summary}
    assert blocks == {"demo", "pycode"}
    for key, entries in summary.items():
        assert {"LoRA", "PLoRA", "full FT", "often"} <= set(entries), key
        assert entries["LoRA"]["ratio_vs_lora"]["mean"] == 1.0
        # 8 steps is far below two minimum stages: "auto" never unloads, PLoRA is LoRA (one shared run)
        assert entries["PLoRA"]["ratio_vs_lora"]["mean"] == pytest.approx(1.0)
        assert all(v["num_unloads"] == 0 for v in entries["PLoRA"]["per_seed"].values())
        often = entries["often"]["per_seed"]
        assert set(often) == {"0", "1"}  # seeds (JSON keys)
        assert all(v["num_unloads"] == 4 and v["delta_rank"] > 2 for v in often.values())
        for e in entries.values():
            assert all(torch.isfinite(torch.tensor(v["test"])) for v in e["per_seed"].values())
    # every run is recorded with its phase; the LR was chosen on the validation split
    assert {r["phase"] for r in saved["runs"]} == {"tune", "final"}
    assert "x LoRA" in saved["table"] and saved["auto_every"]["min_stage"] == study.MIN_STAGE
