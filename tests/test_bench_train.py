"""``plora bench train`` end to end on the tiniest model: the table, the JSON record with every contender, the PNG.
Seconds, not minutes."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from plora_kernels.bench import train  # noqa: E402

TINIEST = ["--size", "tiny", "--hidden", "32", "--layers", "1", "--intermediate", "64", "--heads", "2",
           "--kv-heads", "2", "--vocab", "64", "--seq", "16", "--batch", "2", "--r", "4", "--iters", "2",
           "--warmup", "1"]


def test_bench_train_tiniest_writes_json_with_every_contender(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PLORA_BACKEND", raising=False)
    rc = train.main([*TINIEST, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "step ms" in out and "tokens/s" in out
    files = sorted(tmp_path.glob("train-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["benchmark"] == "train"
    assert {"device_name", "torch", "timestamp_utc"} <= set(record["environment"])
    assert record["config"]["hidden"] == 32 and record["config"]["r"] == 4
    rows = {r["contender"]: r for r in record["results"]}
    assert set(rows) == set(train.CONTENDERS)

    ran = [name for name, r in rows.items() if r["status"] == "ok"]
    assert {"full", "plora-torch"} <= set(ran)
    for name in ran:
        r = rows[name]
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0 and r["trainable_params"] > 0
    # same initial weights and batch, adapters start at zero: every contender starts from the same loss
    assert len({round(rows[n]["first_loss"], 5) for n in ran}) == 1
    assert rows["plora-torch"]["trainable_params"] < rows["full"]["trainable_params"]
    pct = [rows["plora-torch"][f"unload_pct_every_{k}"] for k in train.UNLOAD_EVERY]
    assert pct[0] > pct[1] > pct[2] > 0  # the same unload, amortised over longer stages
    try:
        import peft  # noqa: F401
        assert rows["peft"]["status"] == "ok"
        assert rows["peft"]["trainable_params"] == rows["plora-torch"]["trainable_params"]
    except ImportError:
        assert rows["peft"]["status"] == "skipped" and "peft" in rows["peft"]["note"]
    if not torch.cuda.is_available():
        assert rows["plora-triton"]["status"] == "skipped" and "CUDA" in rows["plora-triton"]["note"]
        assert "No CUDA GPU" in " ".join(record["notes"])
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / record["plot"]).stat().st_size > 1000
    except ImportError:
        assert record["plot"] is None


@pytest.mark.parametrize("bad,flag", [
    (["--contenders", "full,lora"], "--contenders"), (["--dtype", "fp8"], "dtype"), (["--hidden", "31"], "--hidden"),
    (["--iters", "0"], "--iters"), (["--iters", "-3"], "--iters"), (["--iters", "2.5"], "--iters"),
    (["--warmup", "0"], "--warmup"), (["--warmup", "-1"], "--warmup"), (["--r", "0"], "--r"),
    (["--hidden", "0"], "--hidden"), (["--batch", "-2"], "--batch"), (["--seq", "0"], "--seq"),
    (["--alpha", "inf"], "--alpha"),
])
def test_bench_train_rejects_bad_flags(bad, flag, capsys):
    """Refused argparse's way, naming the flag, with exit status 2, before any model is built."""
    assert train.main([*TINIEST, *bad, "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "plora bench train: error:" in err and flag in err, err
