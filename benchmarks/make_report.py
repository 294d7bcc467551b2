"""Regenerate BENCHMARKS.md from every benchmark record (JSON) in benchmarks/results/.

    python benchmarks/make_report.py [--results benchmarks/results] [--output BENCHMARKS.md]

Every number in BENCHMARKS.md comes from a JSON record written by ``plora bench linear|unload|train`` or
``benchmarks/kernel_resources.py`` (device, versions, shapes and raw medians are in the record); nothing is
typed in by hand. GPU runs are listed first, newest first; records made without a GPU go in a separate
section, labelled as CPU smoke timings of the pure-torch reference path; the latest static compile record
(registers and instructions, no timing) has a section of its own. The ``study-*`` records of ``plora study``
are not benchmarks (README's "When PLoRA helps" sums them up) and are passed over.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"
DEFAULT_OUTPUT = HERE.parent / "BENCHMARKS.md"
sys.path.insert(0, str(HERE.parent))
from plora_kernels.bench import unload  # noqa: E402
from plora_kernels.bench.common import fmt, markdown_table, unique  # noqa: E402


# ------------------------------------------------------------------------------------------- helpers
def _value(t) -> str:
    """A target's value as its record words it (newer records), else the number."""
    return t.get("value_text") or fmt(t.get("value"), ".3f")


def _met(t) -> str:
    met = t.get("met")
    return "not measured" if met is None else ("met" if met else "NOT met")


def _bytes(n) -> str:
    """Bytes for a memory column: KiB below 1 MiB (a table or a flag), MiB above."""
    if n is None:
        return "-"
    return f"{n / 2**10:.1f} KiB" if abs(n) < 2**20 else f"{n / 2**20:.1f} MiB"


def _span(values):
    lo, hi = min(values), max(values)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"


def load_records(results: Path):
    """(records, problems): records are dicts with ``_path``; problems are (file name, reason)."""
    records, problems = [], []
    for path in sorted(results.glob("*.json")):
        if path.name.startswith("study-"):  # plora study's records: README's "When PLoRA helps", not benchmarks
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append((path.name, f"unreadable: {exc}"))
            continue
        if not isinstance(data, dict) or "environment" not in data or "results" not in data:
            problems.append((path.name, "not a plora bench record (no environment/results)"))
            continue
        data["_path"] = path
        records.append(data)
    records.sort(key=lambda d: d["environment"].get("timestamp_utc", ""), reverse=True)
    return records, problems


def _is_gpu(rec) -> bool:
    return rec["environment"].get("device_type") == "cuda"


def _header(rec, output_dir: Path) -> list[str]:
    env = rec["environment"]
    cfg = rec.get("config", {})
    name = rec.get("benchmark", "?")
    lines = [f"### {name} — {env.get('device_name', '?')} — {env.get('timestamp_utc', '?')}", ""]
    versions = [f"plora_kernels {env.get('plora_kernels', '?')}", f"torch {env.get('torch', '?')}",
                f"triton {env.get('triton') or 'not installed'}"]
    if env.get("torch_cuda"):
        versions.append(f"CUDA {env['torch_cuda']}")
    if env.get("compute_capability"):
        versions.append(f"sm_{env['compute_capability'].replace('.', '')}, {env.get('sm_count', '?')} SMs, "
                        f"{env.get('device_memory_gib', '?')} GiB")
    commit = env.get("git_commit")
    if commit:
        versions.append(f"commit {commit[:10]}" + (" (with uncommitted changes)" if env.get("git_dirty") else ""))
    lines.append(f"- **versions**: {'; '.join(versions)}")
    if env.get("env"):
        lines.append("- **environment**: " + ", ".join(f"`{k}={v}`" for k, v in env["env"].items()))
    timer = unique(r.get("timer") for r in rec["results"] if r.get("timer"))
    if cfg.get("static"):  # compiled, not run
        lines.append(f"- **compiled for**: sm_{cfg.get('arch', '?')}, no GPU involved")
    elif "warmup_ms" in cfg:  # the kernel benchmarks: do_bench budgets in milliseconds
        if cfg.get("implementations") is not None:  # linear, schema 2: every implementation, and the default
            ran = ("implementations timed: " + ", ".join(f"**{n}**" for n in cfg["implementations"])
                   + "; the default row runs what the resolver picks")
        else:
            ran = f"ours ran **{cfg.get('ours_backend', '?')}**"
        lines.append(f"- **timing**: {', '.join(timer) or '?'} median (p20/p80 in the record), warm-up "
                     f"{cfg['warmup_ms']} ms, repetition {cfg.get('rep_ms', '?')} ms; {ran}")
    else:  # the training benchmark: whole steps counted
        shape = ", ".join(f"{k} {cfg[k]}" for k in ("size", "hidden", "layers", "seq", "batch", "r", "dtype")
                          if k in cfg)
        lines.append(f"- **timing**: {', '.join(timer) or '?'} median (p20/p80 in the record) over "
                     f"{cfg.get('iters', '?')} steps after {cfg.get('warmup', '?')} warm-up steps; {shape}")
    lines.append(f"- **record**: `{os.path.relpath(rec['_path'], output_dir)}`")
    if rec.get("complete") is False:
        lines.append("- **incomplete run**: it was cut off (time limit or signal); below is what it measured")
    for note in rec.get("notes", []):
        lines.append(f"- {note}")
    for t in rec.get("targets", []):
        lines.append(f"- **target** {t.get('what')}: {_value(t)} (target {t.get('target')}) — {_met(t)}")
    lines.append("")
    return lines


def _contender_legend(rec) -> list[str]:
    cont = rec.get("config", {}).get("contenders") or {}
    if not cont:
        return []
    return ["Contenders: " + "; ".join(f"**{k}** = {v}" for k, v in cont.items()), ""]


# -------------------------------------------------------------------------------------------- linear
def _pieces_table(rows) -> list[str]:
    body = [[str(r["M"]), f"{r['in']} x {r['out']}", str(r["r"]), str(r.get("dtype")),
             str(r.get("adapter_dtype", r.get("dtype"))), r["contender"].removeprefix("piece: "),
             "error" if r.get("error") else _ms_floor(r)] for r in rows]
    return ["**the fused forward's parts** (`--pieces`; ratio to the cuBLAS floor of the same run)", "",
            markdown_table(["M", "in x out", "r", "x,W", "A,B", "part", "ms (x floor)"], body), ""]


def _linear_tables(rec) -> list[str]:
    if rec.get("schema", 1) < 2:
        return _linear_tables_v1(rec)
    return _linear_tables_v2(rec)


def _linear_tables_v1(rec) -> list[str]:
    """Records of the earlier linear benchmark (schema 1: every tensor in one dtype, contenders floor, peft, addmm
    and ours), rendered as they were."""
    pieces = [r for r in rec["results"] if r["contender"].startswith("piece: ")]
    rows = [r for r in rec["results"] if not r["contender"].startswith("piece: ")]
    contenders = unique(r["contender"] for r in rows)
    labels = {r["contender"]: r.get("label", r["contender"]) for r in rows}
    out = ["*Earlier linear benchmark (schema 1): every tensor, adapters included, in one dtype; `addmm` was the "
           "cuBLAS composition written in the benchmark (the resolver's `torch` implementation is its successor), "
           "`ours` ran `plora_kernels.lora_linear` on the implementation in brackets.*", ""]
    for mode in unique(r["mode"] for r in rows):
        sub = [r for r in rows if r["mode"] == mode]
        keys = unique((r["M"], r["in"], r["out"], r["r"], r.get("dtype")) for r in sub)
        head = ["M", "in x out", "r", "dtype"] + [f"{labels[c]} ms (x floor)" for c in contenders] + \
               [f"{labels[c]} TFLOP/s" for c in contenders if c == "ours"]
        body = []
        for k in keys:
            cells = [str(k[0]), f"{k[1]} x {k[2]}", str(k[3]), str(k[4])]
            by = {r["contender"]: r for r in sub if (r["M"], r["in"], r["out"], r["r"], r.get("dtype")) == k}
            for c in contenders:
                r = by.get(c)
                if r is None or r.get("median_ms") is None:
                    cells.append("error" if r is not None and r.get("error") else "-")
                else:
                    cells.append(f"{fmt(r['median_ms'], '.4f')} ({fmt(r.get('ratio_to_floor'), '.3f')}x)")
            if "ours" in contenders:
                cells.append(fmt(by.get("ours", {}).get("tflops"), ".1f"))
            body.append(cells)
        out += [f"**{mode}**", "", markdown_table(head, body), ""]
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        out.append(f"- error: {r['mode']} M={r['M']} {r['in']}x{r['out']} r={r['r']} {r['contender']}: "
                   f"`{r['error']}`")
    if errors:
        out.append("")
    return out + (_pieces_table(pieces) if pieces else [])


def _ms(r, note) -> str:
    """A row's cell: its median ms and, in brackets, ``note(r)``; or skipped, error, or - where there is no row."""
    if r is None:
        return "-"
    if r.get("skipped"):
        return "skipped"
    if r.get("median_ms") is None:
        return "error"
    return f"{fmt(r['median_ms'], '.4f')} ({note(r)})"


def _ms_floor(r, extra: str = "") -> str:
    """A linear row's cell: ms (x floor[, extra])."""
    return _ms(r, lambda r: f"{fmt(r.get('ratio_to_floor'), '.3f')}x" + (f", {extra}" if extra else ""))


def _linear_tables_v2(rec) -> list[str]:
    """One table per mode, x/W dtype and adapter dtype: the shapes down, the floor, PEFT, every implementation and
    the default across (ms and the ratio to the floor of the same config); then skips, errors, notes and parts."""
    pieces = [r for r in rec["results"] if r["contender"].startswith("piece: ")]
    rows = [r for r in rec["results"] if not r["contender"].startswith("piece: ")]
    cfg = rec.get("config", {})
    impls = [c for c in unique(r["contender"] for r in rows if r.get("implementation"))]
    impls = [c for c in cfg.get("implementations") or impls if c in impls] + \
        [c for c in impls if c not in (cfg.get("implementations") or [])]
    cols = [c for c in ("peft", *impls, "default") if any(r["contender"] == c for r in rows)]
    out = ["Each cell: median ms (the time over the cuBLAS floor of the same config). The default cell names the "
           "implementation the resolver picked; × peft = PEFT's time over the default's (a speed-up); "
           "default / best = the default's time over the fastest implementation's of the same config.", ""]

    def fa(r):
        return r.get("adapter_dtype", r.get("dtype"))

    for mode in unique(r["mode"] for r in rows):
        for dtype, adt in unique((r.get("dtype"), fa(r)) for r in rows if r["mode"] == mode):
            sub = [r for r in rows if r["mode"] == mode and r.get("dtype") == dtype and fa(r) == adt]
            keys = unique((r["M"], r["in"], r["out"], r["r"]) for r in sub)
            head = ["M", "in → out", "r", "floor ms"] + cols + ["default TFLOP/s", "default × peft",
                                                                "default / best"]
            body = []
            for k in keys:
                by = {r["contender"]: r for r in sub if (r["M"], r["in"], r["out"], r["r"]) == k}
                floor = by.get("floor") or {}
                cells = [str(k[0]), f"{k[1]} → {k[2]}", str(k[3]),
                         fmt(floor.get("median_ms"), ".4f") if floor.get("median_ms") is not None else
                         ("error" if floor.get("error") else "-")]
                for c in cols:
                    r = by.get(c)
                    cells.append(_ms_floor(r, r.get("resolved", "") if r is not None and c == "default" else ""))
                d = by.get("default") or {}
                best = d.get("best_implementation")
                x_peft = d.get("x_vs_peft")
                cells += [fmt(d.get("tflops"), ".1f"), fmt(x_peft, ".2f") + ("x" if x_peft is not None else ""),
                          fmt(d.get("ratio_to_best"), ".3f") + (f"x ({best})" if best else "")]
                body.append(cells)
            out += [f"**{mode}, x and W {dtype}, A and B {adt}**", "", markdown_table(head, body), ""]
    notes = unique((r["contender"], f"skipped ({r['skipped']})") for r in rows if r.get("skipped"))
    notes += [(f"{r['contender']} ({r['mode']} M={r['M']} {r['in']}->{r['out']} r={r['r']} {r.get('dtype')}/{fa(r)})",
               f"error: `{r['error']}`") for r in rows if r.get("error")]
    notes += [(f"{r['contender']} ({r['mode']} M={r['M']} {r['in']}->{r['out']} r={r['r']} {r.get('dtype')}/{fa(r)})",
               r["note"]) for r in rows if r.get("note")]
    if notes:
        out += [f"- {c}: {why}" for c, why in notes] + [""]
    return out + (_pieces_table(pieces) if pieces else [])


# -------------------------------------------------------------------------------------------- unload
def _sweep_table(rows) -> list[str]:
    """Ablation rows of ``--sweep`` (one knob of the raw Triton merge each), one line per variant."""
    body = [[f"{r['out']} x {r['in']}", str(r["r"]), r["dtype"], str(r.get("factor_dtype")),
             r["contender"].removeprefix("sweep "),
             "error" if r.get("error") else fmt(r.get("median_ms"), ".4f"), fmt(r.get("pct_copy"), ".1f")]
            for r in rows]
    return ["**ablations of the raw Triton merge** (`--sweep`: each row changes one knob of "
            "`merge_(tuning=...)`; rounds other than 10 change the random stream, so they only price it)", "",
            markdown_table(["W (out x in)", "r", "W", "A,B", "variant", "median ms", "% copy"], body), ""]


def _unload_tables_v1(rec) -> list[str]:
    """Records of the earlier unload engine (schema 1: a cached max|W| bound, ``merge_`` rows of the raw kernel,
    ``--sweep`` ablations), rendered as they were."""
    sweep = [r for r in rec["results"] if r["contender"].startswith("sweep ")]
    rows = [r for r in rec["results"] if not r["contender"].startswith("sweep ")]
    contenders = [c for c in unique(r["contender"] for r in rows)
                  if any(r["contender"] == c and r.get("median_ms") is not None for r in rows)]
    skipped = unique((r["contender"], r["skipped"]) for r in rows if r.get("skipped"))
    labels = {r["contender"]: r.get("label", r["contender"]) for r in rows}
    keys = unique((r["out"], r["in"], r["r"], r["dtype"], r.get("factor_dtype")) for r in rows)
    head = ["W (out x in)", "r", "W", "A,B"] + [f"{labels[c]} ms (% copy)" for c in contenders]
    body, mem_body = [], []
    any_mem = any(r.get("peak_extra_bytes") is not None for r in rows)
    for k in keys:
        by = {r["contender"]: r for r in rows if (r["out"], r["in"], r["r"], r["dtype"], r.get("factor_dtype")) == k}
        cells = [f"{k[0]} x {k[1]}", str(k[2]), str(k[3]), str(k[4])]
        mem = list(cells)
        for c in contenders:
            r = by.get(c, {})
            if r.get("median_ms") is None:
                cells.append("error" if r.get("error") else "-")
            else:
                cells.append(f"{fmt(r['median_ms'], '.4f')} ({fmt(r.get('pct_copy'), '.1f')}%)")
            peak = r.get("peak_extra_bytes")
            first = r.get("peak_extra_first_bytes")
            m = "-" if peak is None else f"{peak / 2**20:.2f}"
            if first is not None:
                m += f" (first {first / 2**20:.2f})"
            mem.append(m)
        body.append(cells)
        mem_body.append(mem)
    copy_gbps = [r.get("gbps") for r in rows if r["contender"] == "copy" and r.get("gbps")]
    out = ["*Earlier unload engine (schema 1): `unload_` bounded the merge with a cached max|W|, `merge_` was "
           "the raw Triton kernel with a max|W| report; the current engine's rows have other names.*", "",
           "**time and bandwidth** (bytes moved = 2·|W|·itemsize; % of the copy row measured in the same run"
           + (f"; device copy measured at {_span(copy_gbps)} GB/s" if copy_gbps else "")
           + ")", "", markdown_table(head, body), ""]
    if any_mem:
        out += ["**peak extra memory, MiB** (max_memory_allocated during one call minus the allocation before "
                "it; unload_: steady state, and in brackets the first call on a weight)", "",
                markdown_table(["W (out x in)", "r", "W", "A,B"] + [labels[c] for c in contenders], mem_body), ""]
    for c, why in skipped:
        out.append(f"- {c}: skipped ({why})")
    for r in rows:
        if r.get("error"):
            out.append(f"- error: {r['out']}x{r['in']} r={r['r']} {r['dtype']} {r['contender']}: `{r['error']}`")
    if skipped or any(r.get("error") for r in rows):
        out.append("")
    return out + (_sweep_table(sweep) if sweep else [])

def _unload_tables(rec) -> list[str]:
    if rec.get("schema", 1) < 2:
        return _unload_tables_v1(rec)
    return _unload_tables_v2(rec)


def _ms_pct(r) -> str:
    """An unload row's cell: ms (% copy)."""
    return _ms(r, lambda r: f"{fmt(r.get('pct_copy'), '.1f')}%")


def _where(r) -> str:
    if r.get("scope") == "model":
        return f"{r.get('model')} model"
    return f"{r['out']}x{r['in']} r={r['r']} {r['dtype']} W, {r.get('factor_dtype')} factors"


def _unload_tables_v2(rec) -> list[str]:
    """One table per W config, the contenders down, bf16 and fp32 factors side by side; then the whole-model
    unload; then skips and errors."""
    rows = rec["results"]
    layer = [r for r in rows if r.get("scope", "layer") == "layer"]
    model = [r for r in rows if r.get("scope") == "model"]
    order = list(rec.get("config", {}).get("contenders") or unique(r["contender"] for r in layer))
    order += [c for c in unique(r["contender"] for r in layer) if c not in order]
    out = ["% copy = the copy row's time over the row's time (the rate at which W is merged, as a share of the "
           "device copy bandwidth of the same run); floor = the least traffic in passes over W (a check reads W: "
           "0.5; `unload_` checks, then writes: 1.5), % floor = the floor's time over the row's time; × peft and "
           "× safe = the peft and peft safe_merge rows' times over the row's time; peak extra = "
           "max_memory_allocated during one call minus the allocation before it (CUDA only).", ""]
    for cfg in unique((r["out"], r["in"], r["r"], r["dtype"]) for r in layer):
        sub = [r for r in layer if (r["out"], r["in"], r["r"], r["dtype"]) == cfg]
        fdts = unique(r.get("factor_dtype") for r in sub)
        copies = [r for r in sub if r["contender"] == "copy" and r.get("median_ms")]
        copy_txt = "; ".join(f"{r['median_ms']:.4f} ms = {fmt(r.get('gbps'), '.0f')} GB/s in the {r['factor_dtype']}"
                             "-factor run" for r in copies)
        head = ["contender", "impl", "floor"]
        for f in fdts:
            head += [f"{f} factors: ms (% copy)", "% floor", "× peft / × safe", "peak extra"]
        body = []
        for c in order:
            by = {r.get("factor_dtype"): r for r in sub if r["contender"] == c}
            if not by:
                continue
            any_row = next(iter(by.values()))
            impl = unique(r.get("impl") for r in by.values() if r.get("impl"))
            cells = [c, ", ".join(impl) or "-", fmt(any_row.get("passes"), "g")]
            for f in fdts:
                r = by.get(f)
                peak = None if r is None else r.get("peak_extra_bytes")
                ratios = "-" if r is None or r.get("x_vs_peft") is None else \
                    f"{fmt(r.get('x_vs_peft'), '.2f')} / {fmt(r.get('x_vs_safe_merge'), '.2f')}"
                cells += [_ms_pct(r), fmt(None if r is None else r.get("pct_floor"), ".1f"), ratios, _bytes(peak)]
            body.append(cells)
        out += [f"**W {cfg[0]} x {cfg[1]}, r={cfg[2]}, {cfg[3]} W** (device copy of W: {copy_txt or 'not measured'})",
                "", markdown_table(head, body), ""]
    if model:
        m0 = model[0]
        shapes = ", ".join(f"{n}× {o}x{i}" for o, i, n in m0.get("shapes", []))
        out += [f"**whole-model unload**: `unload_many_` over the {m0['layers']} targeted layers of the "
                f"`{m0['model']}` config ({shapes}; {m0['w_bytes'] / 1e9:.2f} GB of {m0['dtype']} W, "
                f"{m0['factor_dtype']} factors, r={m0['r']}, {m0['rounding']} rounding), timed per call; floor = "
                "1.5 passes over every W at the copy bandwidth of this run; peak extra = max_memory_allocated during "
                "one call minus the allocation before it", ""]
        body = []
        for r in model:
            body.append([r["contender"], r.get("impl", "-"),
                         "skipped" if r.get("skipped") else "error" if r.get("median_ms") is None else
                         f"{r['median_ms']:.3f} ({fmt(r.get('p20_ms'), '.3f')}–{fmt(r.get('p80_ms'), '.3f')})",
                         fmt(r.get("floor_ms"), ".3f"), fmt(r.get("pct_floor"), ".1f"),
                         fmt(r.get("pct_of_step"), ".2f"), _bytes(r.get("peak_extra_bytes"))])
        out += [markdown_table(["contender", "impl", "ms (p20–p80)", "floor ms", "% floor", "% of a step",
                                "peak extra"], body), ""]
        train = rec.get("config", {}).get("train_step")
        if train:
            out += [f"% of a step: against the {train['step_ms']:.1f} ms step of {train['contender']} in "
                    f"`{train['record']}`" + (" (joined by make_report)" if train.get("joined") else "")
                    + " — the fastest PLoRA step of that record.", ""]
        else:
            out += ["% of a step: no `plora bench train` record of this device, model size, rank and dtype.", ""]
    notes = unique((r["contender"], f"skipped ({r['skipped']})") for r in rows if r.get("skipped"))
    notes += [(f"{r['contender']} ({_where(r)})", f"error: `{r['error']}`") for r in rows if r.get("error")]
    notes += [(r["contender"], r["note"]) for r in rows if r.get("note")]
    if notes:
        out += [f"- {c}: {why}" for c, why in notes] + [""]
    return out


# ----------------------------------------------------------------------------- joins across records
def join_train(records) -> None:
    """Unload records whose run found no train record get the newest matching one's step (in memory): the model
    rows' share of a step and their targets. The record's own join, when it has one, is kept."""
    trains = [(rec["_path"].name, rec) for rec in records if rec.get("benchmark") == "train"]
    for rec in records:
        if rec.get("benchmark") != "unload" or rec.get("schema", 1) < 2 or rec.get("config", {}).get("train_step"):
            continue
        model = [r for r in rec["results"] if r.get("scope") == "model"]
        train = model and unload.train_step(trains, rec["environment"], model[0].get("model"), model[0].get("r"),
                                            model[0].get("dtype"))
        if train:
            unload.join_train_step(rec, dict(train, joined=True))


# ------------------------------------------------------------------------------------------- generic
def _generic_tables(rec) -> list[str]:
    rows = [r for r in rec["results"] if isinstance(r, dict)]
    if not rows:
        return ["(no results in this record)", ""]
    keys = unique(k for r in rows for k in r)
    body = [[fmt(r.get(k), ".4g") if isinstance(r.get(k), float) else ("-" if r.get(k) is None else r.get(k))
             for k in keys] for r in rows]
    return [markdown_table(keys, body), ""]


def _kernels_tables(rec) -> list[str]:
    cols = [("variant", "variant", ""), ("registers", "regs", "d"), ("stack_bytes", "stack B", "d"),
            ("shared_kib", "smem KiB", ".1f"), ("warps_per_sm", "warps/SM", "d"), ("ldg128", "LDG.128", "d"),
            ("stg128", "STG.128", "d"), ("hgmma", "HGMMA", "d"), ("tma_loads", "TMA", "d"),
            ("layout_conversions", "layout cvt", "d")]
    out = []
    for kernel in unique(r["kernel"] for r in rec["results"]):
        rows = [r for r in rec["results"] if r["kernel"] == kernel]
        body = [[r.get("error") and f"{r['variant']} (error: {r['error']})" or r["variant"]]
                + [fmt(r.get(k), spec) for k, _, spec in cols[1:]] for r in rows]
        out += [f"**{kernel}**", "", markdown_table([h for _, h, _ in cols], body), ""]
    return out


RENDERERS = {"linear": _linear_tables, "unload": _unload_tables, "kernels": _kernels_tables}


def render_record(rec, output_dir: Path) -> list[str]:
    lines = _header(rec, output_dir) + _contender_legend(rec)
    try:
        lines += RENDERERS.get(rec.get("benchmark"), _generic_tables)(rec)
    except (KeyError, TypeError, ValueError) as exc:  # an older/odd record: show it raw rather than fail
        lines += [f"(could not tabulate this record as {rec.get('benchmark')!r}: {exc}; raw rows below)", ""]
        lines += _generic_tables(rec)
    plot = rec.get("plot")
    if plot:
        png = rec["_path"].parent / plot
        if png.exists():
            lines += [f"![{rec.get('benchmark')} plot]({Path(os.path.relpath(png, output_dir)).as_posix()})", ""]
    return lines


def render(records, problems, output_dir: Path) -> str:
    join_train(records)
    static = [r for r in records if r.get("benchmark") == "kernels"]
    gpu = [r for r in records if _is_gpu(r)]
    cpu = [r for r in records if not _is_gpu(r) and r.get("benchmark") != "kernels"]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/make_report.py from benchmarks/results/*.json. Do not edit by hand: "
        "rerun the script. -->",
        "",
        "Generated by `python benchmarks/make_report.py` from the JSON records in `benchmarks/results/`; every "
        "number below is copied from a record, none is typed in. Record a run on a CUDA machine with "
        "`plora bench linear`, `plora bench unload` (add `--quick` for the target shapes only) and "
        "`plora bench train`, then rerun the script.",
        "",
        "Method (docs/design.md §5): `triton.testing.do_bench` median with warm-up and the L2 cache flushed before "
        "each timed call, random data, every contender timed in the same process. Ratios are against "
        "contenders measured in the same run. Targets: the LoRA linear's default (the implementation the resolver "
        "picks) at M=8192, in=out=4096, r=16, bf16: forward ≤ 1.05× the base GEMM (the cuBLAS floor), "
        "forward+backward ≤ 1.08× the floor and ≥ 1.25× faster than PEFT's unfused layer; and on every benchmarked "
        "shape the default no slower than the fastest implementation (within 2%). The unload at 8192×8192, r=16, "
        "bf16 W (#12): the public guarded `unload_` (check pass + writing pass + reset) ≥ 55% of the device copy "
        "bandwidth (its floor, 1.5 passes over W, is 66.7%), ≥ 1.5× faster than PEFT's "
        "`W += (B @ A * s).to(W.dtype)` and ≥ 3× faster than PEFT's safe_merge, with no W-sized temporary; the "
        "whole-model unload (the 112 targeted "
        "layers of the 1b config) < 3% of a training step. A training step comes from the newest "
        "`plora bench train` record of the same device, model size, rank and dtype.",
        "",
        "## GPU runs",
        "",
    ]
    latest: dict = {}
    for r in gpu:  # newest first
        latest.setdefault(r.get("benchmark"), r)
    earlier = [r for r in gpu if latest.get(r.get("benchmark")) is not r]
    if not gpu:
        lines += ["No GPU run has been recorded yet: there are no numbers for the kernels on a GPU.", ""]
    else:
        summary = [[name, rec["environment"].get("device_name", "?"), t.get("what"), _value(t), t.get("target"),
                    _met(t)] for name, rec in latest.items() for t in rec.get("targets", [])]
        if summary:
            lines += ["Targets in the latest GPU run of each benchmark:", "",
                      markdown_table(["benchmark", "device", "measure", "value", "target", ""], summary), ""]
        lines += ["The latest GPU run of each benchmark:", ""]
        for rec in latest.values():
            lines += render_record(rec, output_dir)
    if earlier:
        lines += ["## Earlier GPU records", "",
                  "Older GPU runs, newest first. They describe the code of their commit: unload records of schema 1 "
                  "timed the earlier unload engine, under that engine's row names.", ""]
        for rec in earlier:
            lines += render_record(rec, output_dir)
    lines += ["## CPU smoke runs (pure-torch reference path; not kernel performance)", ""]
    if not cpu:
        lines += ["None recorded. (`plora bench ...` on a machine without a GPU times the reference path on a "
                  "small shape; such timings say nothing about the kernels.)", ""]
    else:
        lines += ["These records were made without a GPU: they time the pure-torch reference code on a small "
                  "shape on the CPU (and the Triton kernels in the interpreter, one call each), to show the "
                  "benchmark runs end to end. They are not kernel performance.", ""]
        for rec in cpu:
            lines += render_record(rec, output_dir)
    if static:
        lines += ["## Compiled kernels (static: registers and instructions, not timings)", "",
                  "`python benchmarks/kernel_resources.py` compiles every kernel variant for the GPU architecture "
                  "on a machine without one and reads the cubin. These facts explain timings and choose "
                  "candidates; only the GPU runs above say what is fast.", ""]
        for rec in static[:1]:  # the latest: older ones describe older code
            lines += render_record(rec, output_dir)
    if problems:
        lines += ["## Files skipped", ""] + [f"- `{name}`: {why}" for name, why in problems] + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of JSON records")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to (re)write")
    args = p.parse_args(argv)
    records, problems = load_records(args.results) if args.results.is_dir() else ([], [])
    output = args.output.resolve()
    text = render(records, problems, output.parent)
    output.write_text(text)
    n_gpu = sum(_is_gpu(r) for r in records)
    n_static = sum(r.get("benchmark") == "kernels" for r in records)
    print(f"wrote {output}: {n_gpu} GPU record(s), {len(records) - n_gpu - n_static} CPU record(s), "
          f"{n_static} static compile record(s), {len(problems)} file(s) skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
