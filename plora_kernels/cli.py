"""The ``plora`` command line: ``plora demo``, ``plora study``, ``plora info``, ``plora check`` and
``plora bench {linear,unload,train}``."""
from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import subprocess
import sys

BENCHES = ("linear", "unload", "train")


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - report any import failure, not only ImportError
        return "not installed" if isinstance(exc, ImportError) else f"import failed ({type(exc).__name__}: {exc})"
    return str(getattr(mod, "__version__", "unknown"))


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
        release = next((line.strip() for line in out.splitlines() if "release" in line), "")
    except (OSError, subprocess.SubprocessError):
        release = ""
    return f"{path}" + (f" ({release})" if release else "")


def _backend_lines() -> list[tuple[str, str]]:
    """What each op runs on each device kind here, from the resolver the ops themselves call, with the rule that
    decided it (a choice in code, an environment variable, the measured default)."""
    from . import _backend

    rows = []
    for kind, ops in _backend.describe().items():
        for op, answer in ops.items():
            rows.append((f"{op} on {kind.upper()} tensors", answer))
    return rows


def info() -> dict[str, str]:
    """The facts ``plora info`` prints, as an ordered dict."""
    import torch

    import plora_kernels

    rows: dict[str, str] = {
        "plora_kernels": plora_kernels.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        rows["cuda device"] = ", ".join(names)
        rows["torch cuda"] = str(torch.version.cuda)
    else:
        rows["cuda device"] = "none"
    from . import _backend

    rows["supported triton"] = (f"{'.'.join(map(str, _backend.TRITON_OLDEST))} to "
                                f"{'.'.join(map(str, _backend.TRITON_NEWEST))}")
    rows.update(_backend.settings())  # every variable the package reads, as it reads it
    rows.update(_backend_lines())
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:  # what the resolver refuses there, and why
        for key, why in _backend.refusals(device).items():
            rows[f"not on {device}: {key}"] = why
    rows["nvcc"] = _nvcc()
    return rows


def _cmd_study(argv: list[str]) -> int:
    from . import study

    code = study.main(argv)
    return code if isinstance(code, int) else 0


def _cmd_info(args) -> int:
    rows = info()
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    try:
        # a bad flag or an unwritable --out: usage and "plora demo: error: argument --flag: ...", exit status 2
        demo.run_from_args(args, args.parser)
    except ImportError as exc:  # transformers or matplotlib missing: say so, no traceback
        print(f"plora demo: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args) -> int:
    from . import check

    # a bad flag: usage and "plora check: error: argument --flag: ...", exit status 2; a failed cell: exit status 1
    return check.run_from_args(args, args.parser)


def _cmd_bench(args) -> int:
    module_name = f"plora_kernels.bench.{args.name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (module_name, "plora_kernels.bench"):
            print(f"plora bench {args.name}: the benchmark module {module_name} is not available in this install "
                  f"({exc}).", file=sys.stderr)
        else:
            print(f"plora bench {args.name}: a dependency is missing: {exc}. Install the benchmark extras with "
                  "pip install 'plora_kernels[bench]'.", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(f"plora bench {args.name}: {module_name} has no main(argv) function.", file=sys.stderr)
        return 2
    code = entry(list(args.args))
    return code if isinstance(code, int) else 0


def build_parser() -> argparse.ArgumentParser:
    from . import demo

    parser = argparse.ArgumentParser(prog="plora", description="PeriodicLoRA kernels: demo, benchmarks, environment")
    sub = parser.add_subparsers(dest="command", metavar="{demo,study,info,check,bench}")
    sub.required = True

    p_demo = sub.add_parser("demo", help="LoRA vs PLoRA vs full FT on a high-rank task (CPU, about 2 min)",
                            description=demo.__doc__.split("\n")[0])
    demo.add_arguments(p_demo)
    p_demo.set_defaults(func=_cmd_demo, parser=p_demo)

    p_study = sub.add_parser("study", help="LoRA vs PLoRA vs full fine-tuning on the demo's task and real text "
                                           "(the method study; arguments are forwarded, try plora study --help)")
    p_study.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the study")
    p_study.set_defaults(func=lambda args: _cmd_study(list(args.args)))

    p_info = sub.add_parser("info", help="versions, devices and which backend the ops use")
    p_info.set_defaults(func=_cmd_info)

    from . import check

    p_check = sub.add_parser("check", help="self-test of a machine: every op and implementation that runs here "
                                           "against the float64 reference (a table, a JSON record, exit status 1 "
                                           "on a failure)", description=check.__doc__.split("\n")[0])
    check.add_arguments(p_check)
    p_check.set_defaults(func=_cmd_check, parser=p_check)

    p_bench = sub.add_parser("bench", help="run a benchmark: linear, unload or train (arguments are forwarded)",
                             description="Run plora_kernels.bench.<name>.main(args); every argument after the "
                                         "name is forwarded (try: plora bench linear --help).")
    p_bench.add_argument("name", choices=BENCHES)
    p_bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "study":  # forward everything after it untouched, --help included
        return _cmd_study(argv[1:])
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        # forward everything after the name untouched, --help and leading options included
        return _cmd_bench(argparse.Namespace(name=argv[1], args=argv[2:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
