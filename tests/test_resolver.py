"""The implementation resolver: one precedence (code, then environment, then the measured default), the names
``plora info`` prints, and the measured-default table re-derived from the benchmark records."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plora_kernels as pk
from plora_kernels import _backend, defaults

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("PLORA_BACKEND", "PLORA_LINEAR_KERNEL", "PLORA_UNLOAD_KERNEL", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_cpu_tensors_default_to_the_reference(clean_env):
    t = torch.empty(3)
    assert _backend.resolve("lora_linear", t) == "torch" and _backend.resolve("unload", t) == "torch"


def test_precedence_code_then_op_variable_then_backend(clean_env):
    pytest.importorskip("triton")
    clean_env.setenv("TRITON_INTERPRET", "1")  # lets Triton run CPU tensors, so every choice is runnable
    t = torch.empty(3)
    clean_env.setenv("PLORA_BACKEND", "triton")
    assert _backend.resolve("lora_linear", t) == "triton"
    clean_env.setenv("PLORA_LINEAR_KERNEL", "torch")  # one op's variable beats PLORA_BACKEND
    assert _backend.resolve("lora_linear", t) == "torch" and _backend.resolve("unload", t) == "triton"
    with pk.implementation(lora_linear="triton-tma"):  # code beats both
        assert _backend.resolve("lora_linear", t) == "triton-tma"
        with pk.implementation(lora_linear=None, unload="torch"):  # None leaves an op to the outer rule
            assert _backend.resolve("lora_linear", t) == "triton-tma" and _backend.resolve("unload", t) == "torch"
    assert _backend.resolve("lora_linear", t) == "torch"  # restored on exit


def test_the_choice_is_what_runs(clean_env):
    """lora_linear really takes the resolved implementation: counted at the Triton GEMM's entry."""
    pytest.importorskip("triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    from plora_kernels.ops.triton import lora_matmul as lm

    calls = []
    original = lm.lora_matmul
    clean_env.setattr(lm, "lora_matmul", lambda *a, **k: calls.append(k.get("tma")) or original(*a, **k))
    x, W, A, B = torch.randn(5, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    pk.lora_linear(x, W, A, B, 0.5)
    assert calls == []
    with pk.implementation(lora_linear="triton"):
        pk.lora_linear(x, W, A, B, 0.5)
    assert calls == [False, False]


@pytest.mark.parametrize("bad,match", [
    (dict(lora_linear="cublas"), r"implementation\(lora_linear=...\) must be one of"),
    (dict(unload="triton-tma"), r"implementation\(unload=...\) must be one of"),
    (dict(matmul="torch"), r"op must be one of"),
])
def test_bad_choices_in_code_name_the_op(clean_env, bad, match):
    with pytest.raises(ValueError, match=match):
        with pk.implementation(**bad):
            pass


def test_bad_environment_values_name_the_variable(clean_env):
    clean_env.setenv("PLORA_UNLOAD_KERNEL", "fast")
    with pytest.raises(ValueError, match="PLORA_UNLOAD_KERNEL must be one of"):
        _backend.resolve("unload", torch.empty(1))
    clean_env.delenv("PLORA_UNLOAD_KERNEL")
    clean_env.setenv("PLORA_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PLORA_BACKEND must be one of"):
        _backend.resolve("unload", torch.empty(1))


def test_an_unrunnable_choice_says_why(clean_env):
    with pk.implementation(unload="cuda"):
        with pytest.raises(RuntimeError, match="code asks for unload=cuda, which cannot run here"):
            _backend.resolve("unload", torch.empty(1))


def test_plora_info_prints_the_resolver_answer_per_op(clean_env):
    clean_env.setenv("PLORA_LINEAR_KERNEL", "torch")
    out = subprocess.run([sys.executable, "-m", "plora_kernels.cli", "info"], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(None, 1) if "  " not in line else [p.strip() for p in line.split("  ", 1)]
                 for line in out.stdout.splitlines() if line.strip())
    assert lines["lora_linear on CPU tensors"].strip() == "torch (PLORA_LINEAR_KERNEL)"
    assert lines["unload on CPU tensors"].strip() == "torch (default)"


def test_measured_defaults_match_the_records():
    """defaults.MEASURED is what benchmarks/make_defaults.py derives from benchmarks/results/ (never hand-edited)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_defaults.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unmeasured_shapes_get_the_safe_default(monkeypatch):
    monkeypatch.setattr(defaults, "arch", lambda device: "sm_90")
    dev = torch.device("cpu")
    assert defaults.measured_default("lora_linear", dev, torch.bfloat16, 8192 + 5) == \
        defaults.MEASURED[("sm_90", "lora_linear", "bf16", 8192)][0]
    assert defaults.measured_default("lora_linear", dev, torch.float16, 8192) == "torch"  # nothing measured
    assert defaults.measured_default("unload", dev, torch.bfloat16, None) == "triton"


# --- the support window and what each implementation needs ----------------------------------------------------

@pytest.fixture
def fake_gpu(clean_env):
    """A CUDA device of a chosen architecture and a chosen Triton version, without either: sets
    (arch, triton version) for the resolver's requirement checks."""
    from plora_kernels.ops.triton import limits

    state = {"arch": 90, "triton": _backend.TRITON_NEWEST}
    clean_env.setattr(limits, "arch_of", lambda device: state["arch"] if device.type == "cuda" else 0)
    clean_env.setattr(_backend, "triton_version", lambda: state["triton"])
    clean_env.setattr(defaults, "arch", lambda device: f"sm_{state['arch']}")
    return state


CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("arch,triton,refused", [
    (90, (3, 9), set()), (90, (3, 7), set()),
    (90, (3, 6), {"triton-ws"}),  # Triton 3.6's warp-specialisation pass crashes on the kernel
    (100, (3, 9), {"triton-ws"}),  # Hopper's warp specialisation
    (80, (3, 9), {"triton-ws", "triton-tma"}), (89, (3, 6), {"triton-ws", "triton-tma"}),
    (90, (3, 5), {"triton", "triton-tma", "triton-ws"}),  # below the support window: every Triton kernel
])
def test_the_resolver_refuses_what_cannot_compile_there(fake_gpu, arch, triton, refused):
    fake_gpu.update(arch=arch, triton=triton)
    got = {name for name in _backend.IMPLEMENTATIONS["lora_linear"] if _backend._runnable(name, CUDA)}
    assert got == refused
    assert (_backend._runnable("triton", CUDA) is None) == (triton >= _backend.TRITON_OLDEST)
    for key, why in _backend.refusals(CUDA).items():  # what plora info prints: the reason, with the versions
        assert f"sm_{arch}" in why or "older than the oldest supported" in why, (key, why)


def test_a_refused_choice_raises_and_a_refused_default_falls_back(fake_gpu, monkeypatch):
    fake_gpu.update(arch=90, triton=(3, 6))
    t = type("FakeCudaTensor", (), {"device": CUDA, "dtype": torch.bfloat16})()
    with pk.implementation(lora_linear="triton-ws"):
        with pytest.raises(RuntimeError, match=r"triton-ws.*Triton >= 3.7.*Triton 3.6 on sm_90"):
            _backend.resolve("lora_linear", t)
    monkeypatch.setattr(defaults, "MEASURED", {("sm_90", "lora_linear", "bf16", 8192): ("triton-ws", "test")})
    assert _backend.resolve("lora_linear", t, size=8192) == "torch"  # the measured default refused: the safe one
    fake_gpu.update(triton=(3, 5))  # no Triton kernel at all: the unload's safe default falls to the CUDA twin
    assert _backend.resolve("unload", t) == "cuda"


# --- settings read as their owners read them --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "1", "false", "true", "TRUE", "yes", "on", "off", "no", "2", "banana", ""])
def test_triton_interpret_is_read_as_triton_reads_it(clean_env, value):
    triton = pytest.importorskip("triton")
    clean_env.setenv("TRITON_INTERPRET", value)
    assert _backend.interpreting() == triton.knobs.runtime.interpret


@pytest.mark.parametrize("value,tunes", [(None, True), ("1", True), ("true", True), ("on", True), ("0", False),
                                         ("false", False), ("OFF", False), ("", True)])
def test_plora_autotune_values(clean_env, value, tunes):
    if value is not None:
        clean_env.setenv("PLORA_AUTOTUNE", value)
    assert _backend.autotuning() is tunes


def test_an_odd_plora_autotune_is_refused_by_name(clean_env):
    clean_env.setenv("PLORA_AUTOTUNE", "banana")
    with pytest.raises(ValueError, match="PLORA_AUTOTUNE.*banana"):
        _backend.autotuning()
    assert "refused" in _backend.settings()["PLORA_AUTOTUNE"]  # and plora info shows it


def test_implementation_blocks_exited_out_of_order_leave_nothing(clean_env):
    outer = pk.implementation(lora_linear="triton")
    inner = pk.implementation(lora_linear="torch", unload="torch")
    outer.__enter__()
    inner.__enter__()
    assert _backend._requested("lora_linear") == ("torch", "code")
    outer.__exit__(None, None, None)  # the outer block ends first (two generators, say)
    assert _backend._requested("lora_linear") == ("torch", "code")  # the inner block is still active
    inner.__exit__(None, None, None)
    assert _backend._requested("lora_linear") == (None, "default") and _backend._requested("unload")[0] is None


def test_plora_info_shows_every_setting_as_read_and_every_refusal(clean_env):
    """TRITON_INTERPRET=false is off for Triton, so for us too: CPU tensors run torch, and Triton is listed as not
    runnable on the CPU with the reason; an odd PLORA_AUTOTUNE is shown refused, not silently taken as on."""
    pytest.importorskip("triton")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "false", "PLORA_AUTOTUNE": "banana"}
    env.pop("PLORA_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "plora_kernels.cli", "info"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "'false' -> off" in text and "'banana' -> refused" in text and "supported triton" in text
    assert "lora_linear on CPU tensors" in text and "torch (default)" in text
    assert "not on cpu: lora_linear: triton " in text and "TRITON_INTERPRET=1" in text
