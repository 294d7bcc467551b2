"""plora check: it passes on this machine (the torch path, and the Triton kernels under TRITON_INTERPRET=1), and each
of its checks fails when what it checks is broken (a kernel or the reference made wrong on purpose)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from plora_kernels import check, cli
from plora_kernels._backend import interpreting, triton_available
from plora_kernels.ops import merge, reference, unload as unload_module

# these runs check CPU tensors: the Triton rows run there only in Triton's interpreter (conftest.py turns it on
# when there is no GPU)
INTERPRETED = triton_available() and interpreting()
needs_triton = pytest.mark.skipif(not INTERPRETED, reason="Triton's interpreter is off (TRITON_INTERPRET unset)")


def _run(tmp_path, *flags, capsys=None):
    """``plora check --device cpu`` in this process: (exit status, its record, stdout)."""
    rc = cli.main(["check", "--device", "cpu", "--out", str(tmp_path), "--no-progress", *flags])
    out = capsys.readouterr().out if capsys is not None else ""
    (path,) = tmp_path.glob("check-cpu-*.json")
    return rc, json.loads(path.read_text()), out


def _cells(record, **where):
    return [c for c in record["cells"] if all(c[k] == v for k, v in where.items())]


def _status(record, op, impl, check_name):
    (cell,) = _cells(record, op=op, implementation=impl, check=check_name)
    return cell["status"], cell["error"] or ""


def test_torch_path_on_a_cpu_without_the_interpreter(tmp_path):
    """The command as a user runs it on a CPU: the torch path passes, the Triton kernels and the CUDA twin are n/a
    with the resolver's reason, and so is the second GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "plora_kernels.cli", "check", "--device", "cpu", "--out",
                           str(tmp_path), "--quick"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("check-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["ok"] and record["device"] == "cpu" and record["interpreting"] is False
    assert record["torch"] == torch.__version__ and "triton" in record and record["device_name"].startswith("CPU")
    for cell in record["cells"]:
        if cell["implementation"] == "torch" and cell["check"] != "gpu2":
            assert cell["status"] == "ok" and cell["cases"], cell
        else:
            assert cell["status"] == "n/a", cell
    assert "TRITON_INTERPRET=1" in _status(record, "unload_", "triton", "guard")[1]
    assert "CUDA tensors" in _status(record, "unload_", "cuda", "bits")[1]
    assert "2 GPUs" in _status(record, "lora_linear fwd", "torch", "gpu2")[1]
    out = proc.stdout
    assert "implementation" in out and "bits r<16" in out and "fp32 2e-05" in out and str(path) in out
    assert "n/a: Triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)" in out
    assert "plora check [1/" in proc.stderr  # progress lines where stderr is not a terminal


@needs_triton
def test_every_implementation_under_the_interpreter(tmp_path, capsys):
    """TRITON_INTERPRET=1 (set by conftest.py here): the Triton kernels run on CPU tensors and pass every check."""
    rc, record, out = _run(tmp_path, capsys=capsys)
    assert rc == 0, out
    assert record["interpreting"] is True and record["quick"] is False
    for impl in ("torch", "triton", "triton-tma", "triton-ws"):
        for row in ("lora_linear fwd", "lora_linear bwd"):
            for name in ("fp32", "fp16", "bf16", "dropout"):
                assert _status(record, row, impl, name) == ("ok", ""), (row, impl, name)
    for impl in ("torch", "triton"):
        for name in ("fp32", "fp16", "bf16", "bits", "guard"):
            assert _status(record, "unload_", impl, name) == ("ok", ""), (impl, name)
    (bits,) = _cells(record, op="unload_", implementation="triton", check="bits")
    assert len(bits["cases"]) == 10 and all(c["bit_identical"] for c in bits["cases"])
    (fp16,) = _cells(record, op="lora_linear bwd", implementation="triton", check="fp16")
    assert [c["case"].split(", ")[1] for c in fp16["cases"]] == ["r=1", "r=16", "r=64"]
    assert all(c["tolerance"] == 3e-3 and 0 < c["dx"] < 3e-3 for c in fp16["cases"])
    assert _status(record, "unload_", "cuda", "fp32")[0] == "n/a"


def test_a_wrong_forward_fails_its_cells(tmp_path, capsys, monkeypatch):
    """y off by 2% on the torch path: every forward cell of it fails (dropout's too), the backward ones pass."""
    real = reference.lora_linear_forward

    def off(*args, **kwargs):
        y, xa = real(*args, **kwargs)
        return y * 1.02, xa

    monkeypatch.setattr(reference, "lora_linear_forward", off)
    rc, record, out = _run(tmp_path, "--only", "lora_linear,torch", capsys=capsys)
    assert rc == 1
    for name in ("fp32", "fp16", "bf16", "dropout"):
        status, error = _status(record, "lora_linear fwd", "torch", name)
        assert status == "FAILED" and "y rel. err" in error, (name, error)
        assert _status(record, "lora_linear bwd", "torch", name)[0] == "ok"
    line = next(ln for ln in out.splitlines() if ln.startswith("lora_linear fwd  torch"))
    assert "FAILED: y rel. err" in line
    assert record["ok"] is False and record["counts"]["FAILED"] == 4


@needs_triton
def test_a_wrong_triton_backward_fails(tmp_path, monkeypatch):
    """dB 5% off in the Triton backward's dy pass: its bwd cells fail, naming dB; the forward passes."""
    from plora_kernels.ops.triton import lora_dy_pass as dy_pass

    real = dy_pass.lora_dy_pass
    monkeypatch.setattr(dy_pass, "lora_dy_pass", lambda *a, **k: (lambda g, dB: (g, dB * 1.05))(*real(*a, **k)))
    rc, record, _ = _run(tmp_path, "--only", "lora_linear,triton,fp32,bf16", "--quick")
    assert rc == 1
    for name in ("fp32", "bf16"):
        status, error = _status(record, "lora_linear bwd", "triton", name)
        assert status == "FAILED" and "dB rel. err" in error, error
        assert _status(record, "lora_linear fwd", "triton", name)[0] == "ok"


@needs_triton
def test_one_flipped_bit_fails_the_bit_identity(tmp_path, monkeypatch):
    """The Triton merge writing one bit differently (the last bit of W[0, 0]): bits r<16 fails and says where."""
    from plora_kernels.ops.triton import unload as triton_unload

    real = triton_unload.merge_group_

    def off_by_one_bit(merges, write, **kw):
        flag = real(merges, write=write, **kw)
        if write:
            for m in merges:
                ints = m.weight.view(torch.int32 if m.weight.dtype == torch.float32 else torch.int16)
                ints[0, 0] ^= 1
        return flag

    monkeypatch.setattr(triton_unload, "merge_group_", off_by_one_bit)
    rc, record, _ = _run(tmp_path, "--only", "unload,triton,bits", "--quick")
    assert rc == 1
    status, error = _status(record, "unload_", "triton", "bits")
    assert status == "FAILED" and "not bit-identical" in error and "W [0, 0]" in error, error
    (cell,) = _cells(record, op="unload_", implementation="triton", check="bits")
    assert all(c["W_elements_differing"] == 1 for c in cell["cases"])


def test_a_guard_that_lets_non_finite_values_through_fails(tmp_path, monkeypatch):
    """The check pass made blind (no merge is ever flagged): every refusal case fails on every implementation."""
    monkeypatch.setattr(merge, "_flagged", lambda flags: {})
    impls = "torch,triton" if INTERPRETED else "torch"
    rc, record, _ = _run(tmp_path, "--only", f"unload,guard,{impls}", "--quick")
    assert rc == 1
    for impl in impls.split(","):
        status, error = _status(record, "unload_", impl, "guard")
        assert status == "FAILED" and "no ValueError" in error, error
        (cell,) = _cells(record, op="unload_", implementation=impl, check="guard")
        assert len(cell["failures"]) >= 6


def test_a_wrong_dropout_mask_fails(tmp_path, monkeypatch):
    """The torch path drawing another mask (the next seed's): its dropout cells fail against float64 with the mask
    of ops.streams, and the Triton kernels' against the torch path."""
    real = reference.dropped
    monkeypatch.setattr(reference, "dropped", lambda x, p, seed: real(x, p, seed + 1))
    impls = "torch,triton" if INTERPRETED else "torch"
    rc, record, _ = _run(tmp_path, "--only", f"lora_linear,dropout,{impls}", "--quick")
    assert rc == 1
    for row in ("lora_linear fwd", "lora_linear bwd"):
        assert _status(record, row, "torch", "dropout")[0] == "FAILED"
        if INTERPRETED:
            status, error = _status(record, row, "triton", "dropout")
            assert status == "FAILED" and "vs the torch path" in error, error
            (cell,) = _cells(record, op=row, implementation="triton", check="dropout")
            assert {f["case"] for f in cell["failures"]} == {c["case"] for c in cell["cases"]
                                                            if c["case"].endswith("vs the torch path")}


def test_a_wrong_merge_and_an_exception_fail(tmp_path, monkeypatch):
    """The reference's merged W 1% off fails the dtype cells of the torch unload; a kernel that raises fails its
    cells with the exception's text."""
    real = reference.merge_value
    monkeypatch.setattr(reference, "merge_value", lambda *a, **k: (real(*a, **k).float() * 1.01).to(a[0].dtype))
    rc, record, _ = _run(tmp_path, "--only", "unload,torch,fp32,fp16,bf16", "--quick")
    assert rc == 1
    for name in ("fp32", "fp16", "bf16"):
        status, error = _status(record, "unload_", "torch", name)
        assert status == "FAILED" and "float64 merge" in error, error
    monkeypatch.setattr(reference, "merge_value", real)

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(unload_module, "merge_many_", boom)
    for f in tmp_path.glob("*.json"):
        f.unlink()
    rc, record, _ = _run(tmp_path, "--only", "unload,torch,fp16")
    assert rc == 1
    status, error = _status(record, "unload_", "torch", "fp16")
    assert status == "FAILED" and error.startswith("RuntimeError: boom (") and "2 more" in error
    (cell,) = _cells(record, op="unload_", implementation="torch", check="fp16")
    assert "Traceback" in cell["failures"][0]["traceback"]


@pytest.mark.parametrize("argv", [["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
                                  ["--device", "tpu"], ["--only", "nonsense"], ["--only", "lora_linear,guard"],
                                  ["--out", "/dev/null/x"]])
def test_bad_flags_exit_2_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", *argv])
    assert exc.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err


def test_long_cells_get_a_footnote():
    cells = [check.Cell("unload_", "torch", "fp16", "FAILED", "x" * 100), check.Cell("unload_", "torch", "guard")]
    lines = check.format_table(cells)
    assert lines[0].split() == ["op", "implementation", "fp16", "guard"]
    assert "[1]" in lines[1] and len(lines[1]) < 100 and lines[1].split()[-1] == "ok"
    assert lines[2] == "[1] FAILED: " + "x" * 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu(tmp_path):
    """On a GPU: every implementation this GPU runs passes (the cuBLAS composition, the Triton kernels, the CUDA twin
    when nvcc is there); what it cannot run is n/a with the resolver's reason."""
    rc = cli.main(["check", "--device", "cuda", "--quick", "--out", str(tmp_path), "--no-progress"])
    (path,) = tmp_path.glob("check-cuda*.json")
    record = json.loads(path.read_text())
    failed = [(c["op"], c["implementation"], c["check"], c["error"]) for c in record["cells"]
              if c["status"] == "FAILED"]
    assert rc == 0 and not failed, failed
    assert record["device"].startswith("cuda:") and record["interpreting"] is False
    for row in ("lora_linear fwd", "lora_linear bwd", "unload_"):
        assert _status(record, row, "torch", "fp16")[0] == "ok"
