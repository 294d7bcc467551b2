"""The benchmark commands run end to end (CPU reference path here; tiny shapes on a GPU) and write their
JSON record and PNG plot; make_report turns records into markdown. Seconds, not minutes."""
import importlib.util
import json
from pathlib import Path

import pytest

from plora_kernels.bench import linear, unload

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--warmup-ms", "2", "--rep-ms", "10"]

pytest.importorskip("matplotlib")


def _make_report():
    spec = importlib.util.spec_from_file_location("make_report", ROOT / "benchmarks" / "make_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one(tmp_path, pattern):
    files = sorted(tmp_path.glob(pattern))
    assert len(files) == 1, files
    return files[0]


def test_linear_quick_writes_json_and_png(tmp_path, capsys):
    rc = linear.main(["--quick", "--out", str(tmp_path), "--shape", "128,256,256", *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "x floor" in out and "TFLOP/s" in out
    record = json.loads(_one(tmp_path, "linear-*.json").read_text())
    png = _one(tmp_path, "linear-*.png")
    assert png.stat().st_size > 1000 and record["plot"] == png.name
    assert record["benchmark"] == "linear"
    assert {"device_name", "torch", "triton", "timestamp_utc"} <= set(record["environment"])
    rows = record["results"]
    assert {(r["mode"], r["contender"]) for r in rows} == {(m, c) for m in linear.MODES for c in linear.CONTENDERS}
    for r in rows:
        assert r["median_ms"] > 0 and r["ratio_to_floor"] > 0
        if r["contender"] != "floor":
            assert r["rel_err_vs_addmm"] < 3e-2  # every contender computes the same thing
    if record["environment"]["device_type"] != "cuda":
        assert "No CUDA GPU" in out


def test_unload_quick_writes_json_and_png(tmp_path, capsys):
    rc = unload.main(["--quick", "--out", str(tmp_path), "--shape", "256,512", *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "% copy" in out
    record = json.loads(_one(tmp_path, "unload-*.json").read_text())
    _one(tmp_path, "unload-*.png")
    rows = {r["contender"]: r for r in record["results"]}
    assert set(rows) == set(unload.CONTENDERS)
    assert rows["copy"]["pct_copy"] == pytest.approx(100.0)
    for name in ("peft", "addmm-fp32", "unload_ nearest", "unload_ stochastic"):
        assert rows[name]["median_ms"] > 0 and rows[name]["bytes"] == 2 * 256 * 512 * 2
    if record["environment"]["device_type"] != "cuda":
        assert "skipped" in rows["merge_ nearest"]


def test_flop_count():
    assert linear.lora_flops(8192, 4096, 4096, 16, "fwd") == 2 * 8192 * 4096 * 4096 * (1 + 16 / 4096 + 16 / 4096)
    assert linear.lora_flops(1, 10, 20, 2, "fwd+bwd") == 4 * 10 * 20 + 6 * 2 * 30


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert linear.main(["--dtype", "int8", "--out", str(tmp_path)]) == 2
    assert unload.main(["--factor-dtype", "fp64", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


@pytest.fixture
def results(tmp_path):
    """A results folder holding one small linear record and one unload record."""
    out = tmp_path / "results"
    out.mkdir()
    assert linear.main(["--quick", "--out", str(out), "--shape", "64,128,128", "--modes", "fwd", *FAST]) == 0
    assert unload.main(["--quick", "--out", str(out), "--shape", "128,256", *FAST]) == 0
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

    # a GPU record (faked from the CPU one) gets the GPU section, the target summary and the memory table
    rec = json.loads(_one(results, "unload-*.json").read_text())
    rec["environment"].update(device_type="cuda", device_name="Fake GPU", torch_cuda="13.0",
                              compute_capability="9.0", sm_count=132, device_memory_gib=79.2)
    for r in rec["results"]:
        if "median_ms" in r:
            r["peak_extra_bytes"] = 4096
    rec["targets"] = [{"what": "unload_ nearest at 8192x8192 r=16 bf16", "value": 90.0, "target": ">= 85.0%",
                       "met": True}]
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    (gpu_dir / "unload-fake-gpu-20000101T000000Z.json").write_text(json.dumps(rec))
    assert report.main(["--results", str(gpu_dir), "--output", str(md)]) == 0
    text = md.read_text()
    assert "No GPU run has been recorded yet" not in text
    assert "Fake GPU" in text and "Targets in the latest GPU run" in text and "peak extra memory" in text


def test_make_report_renders_sweeps_pieces_and_static_records(tmp_path, results):
    """Rows from --sweep / --pieces and the static kernels record each get their own table."""
    report = _make_report()
    lin_path, unl_path = _one(results, "linear-*.json"), _one(results, "unload-*.json")
    lin, unl = json.loads(lin_path.read_text()), json.loads(unl_path.read_text())
    lin["results"].append(dict(lin["results"][0], contender="piece: triton x@W.T", median_ms=0.123,
                               ratio_to_floor=1.5))
    unl["results"].append(dict(unl["results"][0], contender="sweep nearest [32x256 w16]", median_ms=0.0456,
                               pct_copy=77.0))
    lin_path.write_text(json.dumps(lin))
    unl_path.write_text(json.dumps(unl))
    static = {"benchmark": "kernels", "environment": dict(unl["environment"], device_slug="sm90"),
              "config": {"arch": 90, "static": True},
              "results": [{"kernel": "unload", "variant": "production r=16", "registers": 64, "warps_per_sm": 32}]}
    (results / "kernels-sm90-20000101T000000Z.json").write_text(json.dumps(static))
    md = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--output", str(md)]) == 0
    text = md.read_text()
    assert "the fused forward's parts" in text and "| triton x@W.T | 0.1230 (1.500x) |" in text
    assert "ablations of the raw Triton merge" in text, text
    assert "| nearest [32x256 w16] | 0.0456 | 77.0 |" in text
    assert "Compiled kernels (static" in text and "| production r=16 | 64 |" in text
