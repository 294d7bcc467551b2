"""The benchmark commands run end to end (CPU reference path here; tiny shapes on a GPU) and write their
JSON record and PNG plot; make_report turns records into markdown. Seconds, not minutes."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from plora_kernels import _backend
from plora_kernels.bench import linear, unload

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--warmup-ms", "2", "--rep-ms", "10"]

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these runs check the code paths, not speed, and tiny matmuls on a shared machine's
    spinning thread pool take milliseconds instead of microseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make_report():
    spec = importlib.util.spec_from_file_location("make_report", ROOT / "benchmarks" / "make_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one(tmp_path, pattern):
    files = sorted(tmp_path.glob(pattern))
    assert len(files) == 1, files
    return files[0]


LINEAR_SHAPE = ["--shape", "64,128,128"]  # one tile: the Triton rows run in the interpreter on CPU, a second each


def _linear_rows(record, mode=None, adapter=None):
    return [r for r in record["results"] if not r["contender"].startswith("piece: ")
            and (mode is None or r["mode"] == mode) and (adapter is None or r["adapter_dtype"] == adapter)]


def test_linear_quick_writes_json_and_png(tmp_path, capsys):
    """Every resolver implementation of lora_linear, the default, the floor and PEFT, with fp32 adapters and with
    adapters in x's dtype, forward and forward+backward, checked against fp32 and timed (the interpreter here)."""
    rc = linear.main(["--quick", "--out", str(tmp_path), *LINEAR_SHAPE, *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "x floor" in out and "TFLOP/s" in out and "x peft" in out
    record = json.loads(_one(tmp_path, "linear-*.json").read_text())
    png = _one(tmp_path, "linear-*.png")
    assert png.stat().st_size > 1000 and record["plot"] == png.name
    assert record["benchmark"] == "linear" and record["schema"] == 2 and record["complete"] is True
    assert {"device_name", "torch", "triton", "timestamp_utc"} <= set(record["environment"])
    impls = list(_backend.IMPLEMENTATIONS["lora_linear"])
    assert record["config"]["implementations"] == impls
    assert record["config"]["configs"] == [[64, 128, 128, 16, "bf16", "bf16"], [64, 128, 128, 16, "bf16", "fp32"]]
    on_gpu = record["environment"]["device_type"] == "cuda"
    for mode in linear.MODES:
        for adapter in ("fp32", "bf16"):
            rows = _linear_rows(record, mode, adapter)
            assert [r["contender"] for r in rows] == ["floor", "peft", *impls, "default"]
            by = {r["contender"]: r for r in rows}
            assert by["floor"]["ratio_to_floor"] == pytest.approx(1.0)
            for r in rows:
                assert r.get("skipped") or r["median_ms"] > 0, r
                if r["contender"] != "floor" and not r.get("skipped"):
                    assert r["rel_err"] < 3e-2, r  # every contender computes the same thing
                    assert r["ratio_to_floor"] > 0 and (r["contender"] == "peft" or r["x_vs_peft"] > 0)
            for name in impls:
                r = by[name]
                assert r["implementation"] == name
                if not r.get("skipped"):  # what resolve answered in its forward and backward
                    assert r["ran"] == name and "note" not in r, r
                    if not on_gpu and name.startswith("triton"):
                        assert r["label"] == f"{name} (interpreter)" and "interpreter" in r["timer"]
            d = by["default"]
            assert "implementation" not in d  # benchmarks/make_defaults.py must not count it as an implementation
            assert d["resolved"] in impls and d["label"].startswith(f"default ({d['resolved']}")
            assert d["ran"] == d["resolved"] and d["ratio_to_best"] > 0 and d["best_implementation"] in impls
    if not on_gpu:
        assert "No CUDA GPU" in out and record["targets"] == []
        assert _linear_rows(record)[-1]["resolved"] == "torch"  # CPU tensors default to the reference
        assert all(not r.get("skipped") for r in _linear_rows(record))  # TRITON_INTERPRET=1 (tests/conftest.py)


def test_linear_takes_every_implementation_and_skips_what_cannot_run(tmp_path, monkeypatch):
    """An implementation added to the resolver is timed without touching the bench; one the resolver refuses on this
    device is skipped, with the resolver's reason."""
    monkeypatch.setitem(_backend.IMPLEMENTATIONS, "lora_linear", (*_backend.IMPLEMENTATIONS["lora_linear"], "fake-ws"))
    assert "fake-ws" in linear.contenders()
    rc = linear.main(["--out", str(tmp_path), *LINEAR_SHAPE, "--adapter-dtype", "fp32", "--implementations",
                      "torch,fake-ws", *FAST])
    assert rc == 0
    record = json.loads(_one(tmp_path, "linear-*.json").read_text())
    assert record["config"]["implementations"] == ["torch", "fake-ws"]
    for mode in linear.MODES:
        by = {r["contender"]: r for r in _linear_rows(record, mode)}
        assert list(by) == ["floor", "peft", "torch", "fake-ws", "default"]
        assert "unknown implementation 'fake-ws'" in by["fake-ws"]["skipped"]
        assert "median_ms" not in by["fake-ws"] and by["torch"]["median_ms"] > 0
        assert by["default"]["best_implementation"] == "torch"


def test_linear_interrupted_run_keeps_its_rows(tmp_path, monkeypatch):
    """A run cut off (SIGINT, or SIGTERM from a time limit) has saved every config it finished, says so, exits 130."""
    real, calls = linear.run_config, []

    def second_interrupts(*args, **kwargs):
        calls.append(args[:6])
        if len(calls) == 2:
            raise KeyboardInterrupt("signal 15")
        return real(*args, **kwargs)

    monkeypatch.setattr(linear, "run_config", second_interrupts)
    rc = linear.main(["--out", str(tmp_path), *LINEAR_SHAPE, "--implementations", "torch", "--modes", "fwd", *FAST])
    assert rc == 130
    record = json.loads(_one(tmp_path, "linear-*.json").read_text())
    assert record["complete"] is False and any("INTERRUPTED (signal 15)" in n for n in record["notes"])
    assert {r["adapter_dtype"] for r in record["results"]} == {"bf16"}  # the first config, whole
    assert [r["contender"] for r in record["results"]] == ["floor", "peft", "torch", "default"]


def _linear_row(mode, contender, ms, M=8192, k_in=4096, n_out=4096, adapter="fp32", **extra):
    row = {"mode": mode, "M": M, "in": k_in, "out": n_out, "r": 16, "dtype": "bf16", "adapter_dtype": adapter,
           "contender": contender, "median_ms": ms, **extra}
    if contender in _backend.IMPLEMENTATIONS["lora_linear"]:
        row["implementation"] = contender
    return row


def test_linear_targets():
    """#13's targets from the rows of one run: the default against the floor and PEFT at the target, and against the
    fastest implementation on every config."""
    rows = []
    for adapter, fwd_ms, bwd_ms in (("fp32", 1.04, 2.0), ("bf16", 1.2, 2.3)):
        for mode, ms in (("fwd", fwd_ms), ("fwd+bwd", bwd_ms)):
            rows += [_linear_row(mode, "floor", 1.0 if mode == "fwd" else 2.0, adapter=adapter),
                     _linear_row(mode, "peft", 3.0, adapter=adapter),
                     _linear_row(mode, "torch", ms, adapter=adapter),
                     _linear_row(mode, "triton", ms * 1.1, adapter=adapter),
                     _linear_row(mode, "default", ms, adapter=adapter, resolved="torch")]
    # another shape, where the default (torch) is 5% slower than triton
    rows += [_linear_row("fwd+bwd", "floor", 1.0, M=2048), _linear_row("fwd+bwd", "torch", 1.05, M=2048),
             _linear_row("fwd+bwd", "triton", 1.0, M=2048),
             _linear_row("fwd+bwd", "default", 1.05, M=2048, resolved="torch")]
    linear.derive(rows)
    got = linear.targets(rows)
    by = {(t["id"], "fp32 A,B" in t["what"]): t for t in got}
    assert by[("default_fwd_vs_floor", True)]["value"] == pytest.approx(1.04)
    assert by[("default_fwd_vs_floor", True)]["met"] is True
    assert by[("default_fwd_vs_floor", False)]["met"] is False  # 1.2x
    assert by[("default_fwd+bwd_vs_floor", True)]["value"] == pytest.approx(1.0)
    assert by[("default_fwd+bwd_vs_floor", False)]["met"] is False  # 1.15x
    assert by[("default_vs_peft", True)]["value"] == pytest.approx(1.5) and by[("default_vs_peft", True)]["met"]
    assert by[("default_vs_peft", False)]["met"] is True  # 3 / 2.3 = 1.30x
    best = by[("default_is_fastest_fwd+bwd", False)]
    assert best["met"] is False and best["value"] == 1 and len(best["violations"]) == 1
    assert best["violations"][0]["M"] == 2048 and best["violations"][0]["best"] == "triton"
    assert "M=2048" in best["value_text"] and "1.050x triton" in best["value_text"]
    assert by[("default_is_fastest_fwd", False)]["met"] is True
    assert [r["x_vs_peft"] for r in rows if r["contender"] == "default" and r["mode"] == "fwd"] == \
        [pytest.approx(3.0 / 1.04), pytest.approx(3.0 / 1.2)]
    assert all(r.get("x_vs_peft") is None for r in rows if r["contender"] in ("floor", "peft"))


UNLOAD_SHAPE = ["--shape", "32,64"]  # one 32x64 tile: the Triton rows run in the interpreter on CPU


def test_unload_quick_writes_json_and_png(tmp_path, capsys):
    rc = unload.main(["--quick", "--out", str(tmp_path), *UNLOAD_SHAPE, *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "% copy" in out and "model unload_many_" in out
    record = json.loads(_one(tmp_path, "unload-*.json").read_text())
    png = _one(tmp_path, "unload-*.png")
    assert record["plot"] == png.name and record["schema"] == 2 and record["complete"] is True
    layer = [r for r in record["results"] if r["scope"] == "layer"]
    # every contender, with bf16 factors and with fp32 factors, in one run
    assert {(r["contender"], r["factor_dtype"]) for r in layer} == {(c, f) for c in unload.CONTENDERS
                                                                    for f in ("bf16", "fp32")}
    on_gpu = record["environment"]["device_type"] == "cuda"
    for r in layer:
        assert r["bytes"] == 2 * 32 * 64 * 2  # W read and written once
        assert r.get("skipped") or (r["impl"] and not r["impl"].startswith("error"))  # which implementation ran
        if r["contender"] == "copy":
            assert r["pct_copy"] == pytest.approx(100.0)
        if r["contender"] in unload.BASELINES or r["contender"].startswith("unload_"):
            assert r["median_ms"] > 0 and r["pct_copy"] > 0
        if r["contender"].startswith("unload_"):
            assert r["passes"] == 1.5 and r["pct_floor"] == pytest.approx(1.5 * r["pct_copy"])
            assert r["x_vs_peft"] > 0 and r["x_vs_safe_merge"] > 0
        if r["contender"].startswith("triton "):  # the raw passes: the interpreter here, the GPU there
            assert r["impl"] == ("triton" if on_gpu else "triton (interpreter)") and r["median_ms"] > 0
            assert r["passes"] == (0.5 if " check " in r["contender"] else 1.0)
        if r["contender"].startswith("cuda ") and not on_gpu:
            assert r["skipped"] == "needs a CUDA GPU"
    model = [r for r in record["results"] if r["scope"] == "model"]
    assert [r["contender"] for r in model] == list(unload.MODEL_CONTENDERS)
    for r in model:
        assert r["layers"] == 7 and r["model"] == "micro" and r["median_ms"] > 0 and r["floor_ms"] > 0
        assert r["impl"] and r["r"] == 16 and r["factor_dtype"] == "fp32" and r["rounding"] == "stochastic"
    if not on_gpu:
        assert "No CUDA GPU" in out and record["targets"] == []


def test_unload_model_layers_match_the_train_config():
    """The whole-model rows merge the 112 layers plora bench train adapts in its 1b config."""
    layers = unload.model_layers("1b")
    assert len(layers) == 112
    shapes = {name.split(".")[-1]: (o, i) for name, o, i in layers[:7]}
    assert shapes == {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048), "o_proj": (2048, 2048),
                      "gate_proj": (5632, 2048), "up_proj": (5632, 2048), "down_proj": (2048, 5632)}
    assert sum(o * i for _, o, i in layers) == 16 * (2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 5632 * 2048)


def _train_record(path, env, size, step_ms, r=16, dtype="bf16"):
    rec = {"benchmark": "train", "schema": 1, "environment": env,
           "config": {"size": size, "r": r, "dtype": dtype, "iters": 3, "warmup": 1},
           "results": [{"contender": "full", "status": "ok", "median_ms": step_ms / 2},
                       {"contender": "plora-triton", "status": "ok", "median_ms": step_ms},
                       {"contender": "plora-torch", "status": "error", "error": "x"}]}
    path.write_text(json.dumps(rec))


def test_unload_targets_and_train_join(tmp_path):
    """The targets of #12 from rows of one run; the model's share of a step from a train record."""
    rows = []
    base = {"scope": "layer", "out": 64, "in": 64, "r": 16, "dtype": "bf16", "w_bytes": 8192, "bytes": 16384}
    for f in ("bf16", "fp32"):
        for name, ms in (("copy", 1.0), ("peft", 3.0), ("peft safe_merge", 6.0), ("unload_ nearest", 1.6),
                         ("unload_ stochastic", 2.0)):
            rows.append(dict(base, factor_dtype=f, contender=name, median_ms=ms, peak_extra_bytes=64))
    rows.append({"scope": "model", "model": "micro", "layers": 7, "r": 16, "dtype": "bf16", "factor_dtype": "fp32",
                 "rounding": "stochastic", "w_bytes": 10**6, "bytes": 2 * 10**6,
                 "contender": "model unload_many_ m=0", "median_ms": 2.0})
    env = {"device_type": "cpu", "device_name": "Test CPU"}
    _train_record(tmp_path / "train-cpu-1.json", env, "micro", 100.0)
    _train_record(tmp_path / "train-cpu-2.json", env, "tiny", 1.0)  # another model: not joined
    train = unload.find_train_step(env, "micro", 16, "bf16", [tmp_path, None])
    assert train["step_ms"] == 100.0 and train["contender"] == "plora-triton"
    assert unload.find_train_step(dict(env, device_name="other"), "micro", 16, "bf16", [tmp_path]) is None
    unload.derive(rows, train)
    got = unload.targets(rows, train, key=(64, 64, 16, "bf16"))
    by = {(t["id"], t["what"].split(",")[0], "fp32" in t["what"]): t for t in got}
    pct = by[("unload_pct_copy", "unload_ nearest", False)]
    assert pct["value"] == pytest.approx(62.5) and pct["met"] is True
    assert by[("unload_pct_copy", "unload_ stochastic", True)]["met"] is False  # 50% < 55%
    assert by[("x_vs_peft", "unload_ stochastic", False)]["value"] == pytest.approx(1.5)
    assert by[("x_vs_safe_merge", "unload_ stochastic", False)]["met"] is True  # 3x
    peak = [t for t in got if t["id"] == "unload_peak_extra"]
    assert len(peak) == 1 and peak[0]["met"] is True  # 64 bytes <= 1% of 8192
    model = [t for t in got if t["id"] == "model_pct_of_step"]
    assert len(model) == 1 and model[0]["value"] == pytest.approx(2.0) and model[0]["met"] is True
    assert rows[-1]["pct_of_step"] == pytest.approx(2.0)
    assert unload.targets(rows, None, key=(64, 64, 16, "bf16"))[-1]["met"] is None  # no step: not measured


def test_unload_interrupted_run_keeps_its_rows(tmp_path, monkeypatch):
    """A run cut off (SIGINT, or SIGTERM from a time limit) saves what it measured and exits 130."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(unload, "run_model", interrupt)
    rc = unload.main(["--quick", "--out", str(tmp_path), *UNLOAD_SHAPE, "--factor-dtype", "fp32",
                      "--contenders", "peft,unload_-nearest", *FAST])
    assert rc == 130
    record = json.loads(_one(tmp_path, "unload-*.json").read_text())
    assert record["complete"] is False and any("INTERRUPTED" in n for n in record["notes"])
    assert [r["contender"] for r in record["results"]] == ["copy", "peft", "unload_ nearest"]
    assert record["results"][2]["x_vs_peft"] > 0


def test_flop_count():
    assert linear.lora_flops(8192, 4096, 4096, 16, "fwd") == 2 * 8192 * 4096 * 4096 * (1 + 16 / 4096 + 16 / 4096)
    assert linear.lora_flops(1, 10, 20, 2, "fwd+bwd") == 4 * 10 * 20 + 6 * 2 * 30


@pytest.mark.parametrize("bench,args,flag", [
    (linear, ["--dtype", "int8"], "--dtype"),
    (linear, ["--adapter-dtype", "fp64"], "--adapter-dtype"),
    (linear, ["--implementations", "cublas"], "--implementations"),
    (linear, ["--modes", "bwd"], "--modes"),
    (linear, ["--warmup-ms", "-1"], "--warmup-ms"),
    (linear, ["--rep-ms", "0"], "--rep-ms"),
    (linear, ["--rep-ms", "nan"], "--rep-ms"),
    (linear, ["--ranks", "16,0"], "--ranks"),
    (linear, ["--shape", "8192,0,4096"], "--shape"),
    (linear, ["--shape", "8192,4096"], "--shape"),
    (unload, ["--factor-dtype", "fp64"], "--factor-dtype"),
    (unload, ["--contenders", "merge_ nearest"], "contender"),  # an old row name
    (unload, ["--model", "70b"], "--model"),
    (unload, ["--warmup-ms", "0"], "--warmup-ms"),
    (unload, ["--rep-ms", "-5"], "--rep-ms"),
    (unload, ["--ranks", "-8"], "--ranks"),
    (unload, ["--shape", "0,64"], "--shape"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, bench, args, flag):
    """Refused argparse's way, naming the flag, with exit status 2, before anything runs or is written."""
    assert bench.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"plora bench {bench.__name__.rsplit('.', 1)[-1]}: error:" in err and flag in err, err
    assert not list(tmp_path.iterdir())


@pytest.fixture
def results(tmp_path):
    """A results folder holding one small linear record and one unload record."""
    out = tmp_path / "results"
    out.mkdir()
    assert linear.main(["--quick", "--out", str(out), *LINEAR_SHAPE, "--modes", "fwd", "--adapter-dtype", "fp32",
                        *FAST]) == 0
    assert unload.main(["--quick", "--out", str(out), *UNLOAD_SHAPE, *FAST]) == 0
    return out


def test_make_report(tmp_path, results):
    report = _make_report()
    (results / "broken.json").write_text("{")
    md = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--output", str(md)]) == 0
    text = md.read_text()
    assert "Do not edit by hand" in text and "broken.json" in text
    if not any(json.loads(p.read_text()).get("environment", {}).get("device_type") == "cuda"
               for p in results.glob("*-*.json")):
        assert "No GPU run has been recorded yet" in text
        assert "CPU smoke runs" in text and "### linear" in text and "### unload" in text

    # a GPU record (faked from the CPU one) gets the GPU section, the target summary, the memory column, and
    # the model's share of a step joined from a train record of the same device, model size and rank
    rec = json.loads(_one(results, "unload-*.json").read_text())
    env = dict(rec["environment"], device_type="cuda", device_name="Fake GPU", torch_cuda="13.0",
               compute_capability="9.0", sm_count=132, device_memory_gib=79.2)
    rec["environment"] = env
    for r in rec["results"]:
        if "median_ms" in r:
            r["peak_extra_bytes"] = 4096
    rec["targets"] = unload.targets(rec["results"], None, key=(32, 64, 16, "bf16"))
    assert [t["met"] for t in rec["targets"] if t["id"] == "model_pct_of_step"] == [None, None]
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    (gpu_dir / "unload-fake-gpu-20000101T000000Z.json").write_text(json.dumps(rec))
    _train_record(gpu_dir / "train-fake-gpu-20000101T000000Z.json", dict(env, timestamp_utc="2000-01-01T00:00:00Z"),
                  "micro", 1000.0)
    assert report.main(["--results", str(gpu_dir), "--output", str(md)]) == 0
    text = md.read_text()
    assert "No GPU run has been recorded yet" not in text
    assert "Fake GPU" in text and "Targets in the latest GPU run" in text and "peak extra" in text
    assert "4.0 KiB" in text and "bf16 factors: ms (% copy)" in text and "fp32 factors: ms (% copy)" in text
    assert "whole-model unload" in text and "joined by make_report" in text
    assert "not measured" not in text  # the joined step measured the model targets

    # a run that found its train record itself keeps that join
    train = {"record": "train-own.json", "timestamp_utc": "", "step_ms": 500.0, "contender": "plora-torch"}
    rec["config"]["train_step"] = train
    unload.derive(rec["results"], train)
    rec["targets"] = unload.targets(rec["results"], train, key=(32, 64, 16, "bf16"))
    (gpu_dir / "unload-fake-gpu-20000101T000000Z.json").write_text(json.dumps(rec))
    assert report.main(["--results", str(gpu_dir), "--output", str(md)]) == 0
    text = md.read_text()
    assert "against the 500.0 ms step of plora-torch in `train-own.json` — " in text
    assert "joined by make_report" not in text


def test_make_report_renders_sweeps_pieces_and_static_records(tmp_path, results):
    """Rows from --pieces, the static kernels record and earlier unload records (schema 1, with the --sweep rows
    of the old engine) each get their own table; the older GPU unload record goes under the earlier records."""
    report = _make_report()
    lin_path, unl_path = _one(results, "linear-*.json"), _one(results, "unload-*.json")
    lin = json.loads(lin_path.read_text())
    lin["results"].append(dict(lin["results"][0], contender="piece: triton x@W.T", median_ms=0.123,
                               ratio_to_floor=1.5))
    lin_path.write_text(json.dumps(lin))
    old = json.loads((ROOT / "benchmarks" / "results" / "unload-nvidia-h200-20261126T012127Z.json").read_text())
    old["results"].append(dict(old["results"][0], contender="sweep nearest [32x256 w16]", median_ms=0.0456,
                               pct_copy=77.0))
    (results / "unload-nvidia-h200-20261126T012127Z.json").write_text(json.dumps(old))
    new = json.loads(unl_path.read_text())  # the current engine's record, on the same (faked) GPU, later
    new["environment"] = dict(old["environment"], timestamp_utc="2026-12-01T00:00:00Z")
    (results / "unload-nvidia-h200-20261201T000000Z.json").write_text(json.dumps(new))
    # the linear benchmark: the schema-1 H200 record and a later (faked) GPU record of the current schema
    old_lin = ROOT / "benchmarks" / "results" / "linear-nvidia-h200-20261126T012103Z.json"
    (results / old_lin.name).write_text(old_lin.read_text())
    new_lin = dict(lin, environment=dict(new["environment"], timestamp_utc="2026-12-01T00:00:01Z"))
    new_lin["targets"] = linear.targets(new_lin["results"], target=(64, 128, 128, 16, "bf16"))
    assert {t["id"] for t in new_lin["targets"]} == {"default_fwd_vs_floor", "default_is_fastest_fwd"}
    (results / "linear-nvidia-h200-20261201T000001Z.json").write_text(json.dumps(new_lin))
    static = {"benchmark": "kernels", "environment": dict(new["environment"], device_slug="sm90"),
              "config": {"arch": 90, "static": True},
              "results": [{"kernel": "unload", "variant": "production r=16", "registers": 64, "warps_per_sm": 32}]}
    (results / "kernels-sm90-20000101T000000Z.json").write_text(json.dumps(static))
    md = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--output", str(md)]) == 0
    text = md.read_text()
    assert "the fused forward's parts" in text and "| triton x@W.T | 0.1230 (1.500x) |" in text
    latest, earlier = text.split("## Earlier GPU records")
    assert "### unload — NVIDIA H200 — 2026-12-01T00:00:00Z" in latest and "whole-model unload" in latest
    assert "2026-11-26T01:21:27Z" in earlier and "Earlier unload engine (schema 1)" in earlier
    assert "ablations of the raw Triton merge" in earlier, text
    assert "| nearest [32x256 w16] | 0.0456 | 77.0 |" in earlier
    assert "| 8192 x 8192 | 16 | bf16 | bf16 | 0.0679 (100.0%) | 0.2083 (32.6%) |" in earlier
    # linear: the current schema's tables (shapes down, implementations across) and targets in the latest run, the
    # schema-1 record as it was under the earlier records
    assert "### linear — NVIDIA H200 — 2026-12-01T00:00:01Z" in latest
    assert "**fwd, x and W bf16, A and B fp32**" in latest
    impls = " | ".join(_backend.IMPLEMENTATIONS["lora_linear"])
    assert f"| M | in → out | r | floor ms | peft | {impls} | default | default TFLOP/s |" in latest
    assert "| 64 | 128 → 128 | 16 |" in latest and ", torch) |" in latest  # the default names what it ran
    assert "| linear | NVIDIA H200 | default (torch) fwd / floor, M=64 128->128 r=16 bf16, fp32 A,B |" in latest
    assert "fwd: the default never slower than the fastest implementation" in latest
    assert "### linear — NVIDIA H200 — 2026-11-26T01:21:03Z" in earlier
    assert "Earlier linear benchmark (schema 1)" in earlier
    assert ("| 8192 | 4096 x 4096 | 16 | bf16 | 0.3879 (1.000x) | 0.5066 (1.306x) | 0.4518 (1.165x) | "
            "0.5562 (1.434x) | 498.1 |") in earlier
    assert "Compiled kernels (static" in text and "| production r=16 | 64 |" in text
