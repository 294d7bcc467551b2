"""plora demo (LoRA vs PLoRA vs full FT on a high-rank task) and the plora command line."""
import json
import math
import sys
import types

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from plora_kernels import cli  # noqa: E402
from plora_kernels.demo import METHODS, run_demo  # noqa: E402


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_run_demo_small_writes_table_png_json(tmp_path):
    out = tmp_path / "demo"
    s = run_demo(steps=12, every=4, rank=2, out=str(out), seed=0, progress=False, verbose=False)
    assert set(s["methods"]) == set(METHODS)
    files = s["files"]
    for key in ("json", "png", "table"):
        assert (out / files[key].split("/")[-1]).is_file()
    with open(files["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["steps"] == 12 and set(saved["methods"]) == set(METHODS)
    table = (out / "table.txt").read_text()
    for word in ("LoRA r=2", "PLoRA r=2", "full FT", "loss removed", "rank(dW)", "step ms", "peak mem", "trainable"):
        assert word in table
    assert _finite(s["initial_loss"]) and s["initial_loss"] > 0
    for name, r in saved["methods"].items():
        for key in ("final_loss", "gap_closed", "gap_closed_vs_full", "delta_rank_mean", "step_ms"):
            assert _finite(r[key]), (name, key, r[key])
        assert len(r["train_losses"]) == 12 and all(map(_finite, r["train_losses"]))
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    m = s["methods"]
    assert m["lora"]["trainable_params"] == m["plora"]["trainable_params"] < m["full"]["trainable_params"]
    assert m["lora"]["delta_rank_mean"] <= 2  # one rank-2 adapter per layer
    assert m["plora"]["num_unloads"] == 3 and m["plora"]["delta_rank_mean"] > 2  # stages add rank
    assert m["full"]["gap_closed_vs_full"] == pytest.approx(1.0)


def test_run_demo_bfloat16_and_method_subset(tmp_path):
    s = run_demo(steps=4, every=2, rank=2, dtype="bfloat16", methods=("plora",), out=str(tmp_path),
                 progress=False, verbose=False, save=False)
    assert list(s["methods"]) == ["plora"] and s["plora_over_lora"] is None
    assert _finite(s["methods"]["plora"]["final_loss"])


def test_run_demo_rejects_bad_arguments():
    with pytest.raises(TypeError, match="unknown"):
        run_demo(rnak=2)
    with pytest.raises(ValueError, match="dtype"):
        run_demo(dtype="float64", save=False)
    with pytest.raises(ValueError, match="every"):
        run_demo(every=0, save=False)


@pytest.mark.slow
def test_plora_closes_more_of_the_gap_than_lora_at_equal_rank():
    # r=2 adapters on 64..128-wide layers, 15 stages: LoRA removes ~1/3 of the loss, PLoRA ~1/2, full FT ~all
    s = run_demo(steps=300, every=20, rank=2, seed=0, progress=False, verbose=False, save=False)
    m = s["methods"]
    lora, plora, full = (m[k]["gap_closed"] for k in ("lora", "plora", "full"))
    assert lora > 0.1
    assert plora > 1.25 * lora, (lora, plora)
    assert full > plora
    assert s["plora_over_lora"] == pytest.approx(plora / lora)
    assert m["plora"]["delta_rank_mean"] > 4 * m["lora"]["delta_rank_mean"]


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("plora_kernels", "python", "torch", "triton", "transformers", "cuda device", "TRITON_INTERPRET",
                "PLORA_BACKEND", "PLORA_LINEAR_KERNEL", "PLORA_UNLOAD_KERNEL", "lora_linear on CPU tensors",
                "unload on CPU tensors", "nvcc"):
        assert key in out, key


def test_bench_forwards_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("plora_kernels.bench.unload")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "plora_kernels.bench.unload", fake)
    assert cli.main(["bench", "unload", "--size", "64", "--help"]) == 0
    assert seen == [["--size", "64", "--help"]]


def test_bench_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "plora_kernels.bench.train", None)  # import raises ModuleNotFoundError
    assert cli.main(["bench", "train"]) == 2
    assert "plora_kernels.bench.train" in capsys.readouterr().err


def test_cli_demo_runs(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "4", "--every", "2", "--rank", "2", "--methods", "lora,plora",
                     "--no-progress", "--out", str(tmp_path)]) == 0
    assert "PLoRA / LoRA" in capsys.readouterr().out
    assert (tmp_path / "results.json").is_file() and (tmp_path / "loss_curves.png").is_file()


# --- issue 14: flags and the output directory are checked before training; usage errors exit 2 -----------------

@pytest.mark.parametrize("flags,flag", [(["--steps", "10", "--every", "50"], "--every"), (["--lr", "inf"], "--lr"),
                                        (["--rank", "1000"], "--rank"), (["--methods", "lora,full,lora"], "--methods")])
def test_cli_demo_bad_flags_are_usage_errors(tmp_path, capsys, flags, flag):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--no-progress", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"plora demo: error: argument {flag}:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was built, trained or written


def test_cli_demo_unwritable_out_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:  # 100000 steps: would run for hours if the check came after training
        cli.main(["demo", "--no-progress", "--steps", "100000", "--out", str(tmp_path / "file" / "out")])
    assert info.value.code == 2 and "argument --out: cannot write" in capsys.readouterr().err


# --- issue 18: every="auto" (the study's rule) is the demo's default -------------------------------------------

def test_demo_every_defaults_to_auto_and_resolves_from_steps():
    import argparse

    from plora_kernels.demo import DEFAULTS, add_arguments, check_config

    assert DEFAULTS["every"] == "auto"
    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).every == "auto"
    assert parser.parse_args(["--every", "auto"]).every == "auto"
    assert parser.parse_args(["--every", "25"]).every == 25
    assert check_config(save=False)[0]["every"] == 80                      # 800 steps: every 80
    assert check_config(save=False, steps=1000)[0]["every"] == 100
    assert check_config(save=False, steps=1000, every=30)[0]["every"] == 30
    assert check_config(save=False, steps=100, methods=("lora", "full"))[0]["every"] == 101  # no PLoRA: no check


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "Auto", "never", ""])
def test_cli_demo_every_flag_refuses_what_is_not_auto_or_a_positive_int(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--no-progress", "--out", str(tmp_path / "out"), "--every", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --every:" in err and "must be a positive int or 'auto'" in err, err
    assert not (tmp_path / "out").exists()


def test_demo_auto_in_a_short_run_is_refused_before_training(tmp_path, capsys):
    """400 steps is the rule's minimum: a shorter PLoRA run with every='auto' would not unload (it is LoRA)."""
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--no-progress", "--steps", "399", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --every: is 'auto'" in err and "400" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="every"):
        run_demo(steps=100, every="sometimes", save=False)
