"""Distributed PLoRA: DDP replicas stay bit-identical through unloads, and the sharded (FSDP2) unload equals
the single-process one row for row.

Multi-process tests spawn 2 gloo ranks on CPU over loopback (a free port from a bind to port 0). Each spawn
has a deadline and the process group a collective timeout, so a hang fails instead of blocking CI.
Workers check rank agreement themselves and save rank 0's final state; the test compares it with a
single-process run on the same global batches.
"""
import datetime
import gc
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from plora_kernels import PeriodicUnloader, apply_plora, plora_layers, unload_
from plora_kernels.distributed import is_dtensor, unload_dtensor_, unload_sharded_, unsynced_replicas
from plora_kernels.train.unloader import unload_generator

WORLD = 2
SPAWN_DEADLINE_S = 60
COLLECTIVE_TIMEOUT_S = 30
IN, HIDDEN, OUT, R = 24, 33, 16, 3  # 33 rows and r = 3: uneven shards on 2 ranks
GLOBAL_BATCH, STEPS, EVERY, SEED = 8, 7, 2, 11
SCENARIOS = {  # name: (W dtype, momentum)
    "fp32": (torch.float32, 0.0),
    "bf16": (torch.bfloat16, 0.0),       # rounding None -> stochastic for a 16-bit W
    "bf16_momentum": (torch.bfloat16, 0.5),
}


# ------------------------------------------------------------------------------------------ shared setup

def _model(dtype, momentum):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(dtype)
    return apply_plora(model, r=R, alpha=4, momentum=momentum)


def _batch(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    return x.to(dtype), torch.sin(2 * x[:, :OUT])


def _train(model, dtype, parts=(slice(None),)):
    """STEPS Adam steps on each global batch, unloading every EVERY steps.

    ``parts``: the row slices of the batch this process runs, one backward of mean loss / len(parts) each:
    [all rows] is a full-batch run; [this rank's half] a rank's share (DDP/FSDP2 average the gradients);
    [half 0, half 1] a single-process replay of a 2-rank step (halved gradients summed in fp32, which is
    what the ranks' averaging computes, exactly).
    """
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    unloader = PeriodicUnloader(model, opt, every=EVERY, seed=SEED)
    for step in range(STEPS):
        x, y = _batch(step, dtype)
        opt.zero_grad()
        for rows in parts:
            loss = (model(x[rows]).float() - y[rows]).pow(2).mean()
            (loss / len(parts)).backward()
        opt.step()
        unloader.step()
    assert unloader.num_unloads == STEPS // EVERY
    return model


def _full(t):
    return t.full_tensor() if is_dtensor(t) else t


def _state(model):
    """{layer name: (W, A, B)} as plain tensors (DTensors gathered)."""
    out = {}
    for name, layer in plora_layers(model):
        out[name] = tuple(_full(t).detach().clone() for t in (layer.weight, layer.lora_A, layer.lora_B))
    return out


def _assert_matches_single_process(got, dtype, momentum):
    """``got`` (a 2-rank run) equals, bit for bit, one process that runs both halves of each batch and sums
    the halved gradients; and, for fp32, the plain full-batch run up to fp32 rounding."""
    replay = _state(_train(_model(dtype, momentum), dtype, parts=[_rows(0), _rows(1)]))
    assert got.keys() == replay.keys()
    for name in replay:
        for t, t0, what in zip(got[name], replay[name], "WAB"):
            assert torch.equal(t, t0), f"{name}.{what} differs from the single-process replay"
    if dtype != torch.float32:
        return  # a 16-bit model's sums over the batch round in 16 bits: a full batch is a different sum
    full = _state(_train(_model(dtype, momentum), dtype))
    for name in full:
        for t, t0 in zip(got[name], full[name]):
            torch.testing.assert_close(t, t0, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ spawning

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    """Run fn(rank, port, *args) on WORLD processes; fail (and kill them) after SPAWN_DEADLINE_S."""
    ctx = mp.start_processes(fn, args=(_free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish in {SPAWN_DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def _spawned_results(tmp_path_factory, worker, name: str) -> str:
    """The folder into which ``worker`` (run on WORLD processes) saved its scenarios' states."""
    out_dir = str(tmp_path_factory.mktemp(name))
    _spawn(worker, out_dir)
    return out_dir


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _finish():
    # DDP objects sit in reference cycles; one still alive at interpreter exit after the group is destroyed
    # sometimes aborts the process ("terminate called without an active exception", ~1 run in 8 here)
    gc.collect()
    dist.destroy_process_group()


def _rows(rank):
    per = GLOBAL_BATCH // WORLD
    return slice(rank * per, (rank + 1) * per)


# ------------------------------------------------------------------------------------------ DDP

def _ddp_worker(rank, port, out_dir):
    _init(rank, port)
    try:
        for name, (dtype, momentum) in SCENARIOS.items():
            model = _model(dtype, momentum)
            torch.manual_seed(rank)  # ranks' global RNGs differ: nothing may depend on them
            # find_unused_parameters left False on purpose; one scenario with gradients as bucket views
            ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=name == "bf16_momentum")
            _train(ddp, dtype, parts=[_rows(rank)])
            differ = unsynced_replicas(model)
            assert differ == [], f"{name}: rank {rank} differs from rank 0 in {differ}"
            if rank == 0:
                torch.save(_state(model), os.path.join(out_dir, f"ddp_{name}.pt"))
    finally:
        _finish()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return _spawned_results(tmp_path_factory, _ddp_worker, "ddp")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ddp_ranks_identical_and_equal_single_process(ddp_results, scenario):
    dtype, momentum = SCENARIOS[scenario]
    got = torch.load(os.path.join(ddp_results, f"ddp_{scenario}.pt"))
    assert all(not torch.equal(w, _model(dtype, momentum).get_submodule(n).weight) for n, (w, _, _) in got.items())
    _assert_matches_single_process(got, dtype, momentum)


# ------------------------------------------------------------------------------------------ FSDP2

def _fsdp_model(dtype, momentum, mesh, layout="default"):
    """FSDP2 on every PLoRALinear and the root. layout "default": every parameter Shard(0); "a_dim1":
    lora_A Shard(1) where it splits evenly (FSDP2 shards other dims evenly only); "ignored": lora_A and
    lora_B kept out of FSDP2 (plain tensors, replicated); "hsdp": ``mesh`` is 2-D (replicate, shard)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = _model(dtype, momentum)
    for _, layer in plora_layers(model):
        kw = {}
        if layout == "a_dim1":
            a = layer.lora_A
            kw["shard_placement_fn"] = lambda p, a=a: Shard(1) if p is a and p.shape[1] % WORLD == 0 else Shard(0)
        elif layout == "ignored":
            kw["ignored_params"] = {layer.lora_A, layer.lora_B}
        fully_shard(layer, mesh=mesh, **kw)
    return fully_shard(model, mesh=mesh)


def _sharded_layers(dtype, momentum, mesh, layout):
    """(W, A, B, scaling) per layer, as FSDP2 holds them, or ("mixed") as DTensors placed W Shard(0),
    A Replicate, B Shard(1) (B's local rows are then not W's: it has to be gathered). B is nonzero."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def place(t, placements, on=mesh):
        return distribute_tensor(t.detach(), on, placements, src_data_rank=None)  # same t on every rank

    model = _model(dtype, momentum) if layout == "mixed" else _fsdp_model(dtype, momentum, mesh, layout)
    out = []
    for i, (_, layer) in enumerate(plora_layers(model)):
        b = torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(100 + i))
        if layout == "mixed":
            out.append((place(layer.weight, [Shard(0)]), place(layer.lora_A, [Replicate()]),
                        place(b, [Shard(1)]), layer.scaling))
            continue
        with torch.no_grad():
            if is_dtensor(layer.lora_B):
                layer.lora_B.to_local().copy_(
                    place(b, layer.lora_B.placements, layer.lora_B.device_mesh).to_local())
            else:
                layer.lora_B.copy_(b)
        out.append((layer.weight, layer.lora_A, layer.lora_B, layer.scaling))
    return out


def _fsdp_worker(rank, port, out_dir):
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    # the layers return no view (an in-place op on one would drop FSDP2's pre-backward hook): its warning fails
    warnings.filterwarnings("error", message=".*returned a view tensor.*")
    _init(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        hsdp_mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))

        # 1. one unload of each kind on DTensors equals ops.unload_ on the gathered tensors, bit for bit
        for dtype, rounding, momentum, layout in [
                (torch.float32, "nearest", 0.0, "default"), (torch.bfloat16, "stochastic", 0.0, "default"),
                (torch.bfloat16, "nearest", 0.5, "default"), (torch.float16, "stochastic", 0.25, "default"),
                (torch.bfloat16, "stochastic", 0.0, "a_dim1"), (torch.bfloat16, "stochastic", 0.0, "ignored"),
                (torch.bfloat16, "stochastic", 0.0, "mixed"), (torch.float32, "nearest", 0.5, "mixed"),
                (torch.bfloat16, "stochastic", 0.0, "hsdp")]:
            layers = _sharded_layers(dtype, momentum, hsdp_mesh if layout == "hsdp" else mesh, layout)
            for i, (w, a, b, scaling) in enumerate(layers):
                placements = [tuple(t.placements) if is_dtensor(t) else None for t in (w, a, b)]
                s0, s1, rep = (Shard(0),), (Shard(1),), (Replicate(),)
                assert placements == {"default": [s0] * 3, "a_dim1": [s0, (Shard(1 - i),), s0],
                                      "ignored": [s0, None, None], "mixed": [s0, rep, s1],
                                      "hsdp": [(Replicate(), Shard(0))] * 3}[layout], (layout, placements)
                want = [_full(t).clone() for t in (w, a, b)]
                unload_(*want, scaling, momentum=momentum, rounding=rounding,
                        generator=unload_generator(SEED, 0, i, "cpu"))
                unload_dtensor_(w, a, b, scaling, momentum=momentum, rounding=rounding,
                                generator=unload_generator(SEED, 0, i, "cpu"))
                for t, t0, what in zip((w, a, b), want, "WAB"):
                    assert torch.equal(_full(t), t0), (dtype, rounding, momentum, layout, i, what)

        # 2. training with PeriodicUnloader under FSDP2
        for name, (dtype, momentum) in SCENARIOS.items():
            model = _fsdp_model(dtype, momentum, mesh)
            torch.manual_seed(rank)  # ranks' global RNGs differ: nothing may depend on them
            state = _state(_train(model, dtype, parts=[_rows(rank)]))  # _state gathers: on every rank
            if rank == 0:
                torch.save(state, os.path.join(out_dir, f"fsdp_{name}.pt"))

        # 3. a merge that overflows on one rank's rows raises on every rank and changes nothing anywhere
        w = torch.full((4, 8), 60000.0, dtype=torch.float16)
        a, b = torch.ones(2, 8), torch.full((4, 2), 1e4 if rank == 1 else 0.0)
        before = [t.clone() for t in (w, a, b)]
        with pytest.raises(ValueError, match="non-finite"):
            unload_sharded_(w, a, b, 1.0, rounding="stochastic", generator=torch.Generator().manual_seed(0),
                            row_offset=4 * rank, out_features=8, group=dist.group.WORLD)
        assert all(torch.equal(t, t0) for t, t0 in zip((w, a, b), before))
    finally:
        _finish()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return _spawned_results(tmp_path_factory, _fsdp_worker, "fsdp")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fsdp2_training_with_unloads_equals_single_process(fsdp_results, scenario):
    dtype, momentum = SCENARIOS[scenario]
    _assert_matches_single_process(torch.load(os.path.join(fsdp_results, f"fsdp_{scenario}.pt")), dtype, momentum)


# ------------------------------------------------------------------------------------------ single process

def _shards(n, parts):
    """torch.chunk's row ranges (some may be empty)."""
    size = -(-n // parts)
    return [(min(k * size, n), min((k + 1) * size, n)) for k in range(parts)]


@pytest.mark.parametrize("dtype,rounding,momentum", [
    (torch.float32, "nearest", 0.0), (torch.float32, "stochastic", 0.0), (torch.bfloat16, "stochastic", 0.0),
    (torch.bfloat16, "nearest", 0.5),
    (torch.float16, "stochastic", 0.5), (torch.float16, "nearest", 0.0)])
@pytest.mark.parametrize("parts", [2, 3, 5])
def test_unload_sharded_equals_unload_row_for_row(backend, dtype, rounding, momentum, parts):
    out_f, in_f, r = 9, 40, 4  # 5 parts of 9 rows: the last one is empty
    w = torch.randn(out_f, in_f).to(dtype)
    a, b = torch.randn(r, in_f), torch.randn(out_f, r) * 0.1
    want = [t.clone() for t in (w, a, b)]
    g = torch.Generator().manual_seed(5)
    unload_(*want, 0.5, momentum=momentum, rounding=rounding, generator=g)
    after = torch.rand(4, generator=g)
    for start, stop in _shards(out_f, parts):
        ws, bs, a_copy = w[start:stop].clone(), b[start:stop].clone(), a.clone()
        g = torch.Generator().manual_seed(5)
        unload_sharded_(ws, a_copy, bs, 0.5, momentum=momentum, rounding=rounding, generator=g,
                        row_offset=start, out_features=out_f)
        assert torch.equal(ws, want[0][start:stop]) and torch.equal(bs, want[2][start:stop])
        assert torch.equal(a_copy, want[1])  # the same fresh A on every shard
        if backend == "torch":  # the generator is left where the full unload leaves it
            assert torch.equal(torch.rand(4, generator=g), after)


def test_unload_sharded_checks_arguments():
    w, a, b = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(2, 8), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="generator"):
        unload_sharded_(w, a, b, 1.0, rounding="stochastic", row_offset=4, out_features=8)
    with pytest.raises(ValueError, match="out_features"):
        unload_sharded_(w, a, b, 1.0, generator=torch.Generator(), row_offset=4, out_features=6)
    with pytest.raises(ValueError, match="row_offset"):
        unload_sharded_(w, a, b, 1.0, generator=torch.Generator(), row_offset=-1)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        unload_sharded_(w, a, torch.zeros(3, 2), 1.0, generator=torch.Generator())
    with pytest.raises(TypeError, match="DTensor"):
        unload_dtensor_(w, a, b, 1.0, generator=torch.Generator())
    # m > 0 with nearest rounding draws nothing: no generator needed
    unload_sharded_(w, a, b, 1.0, momentum=0.5, row_offset=4, out_features=8)


def test_unload_sharded_refuses_overflow_and_changes_nothing(backend):
    w = torch.full((4, 8), 60000.0, dtype=torch.float16)
    a, b = torch.ones(2, 8), torch.full((4, 2), 1e4)
    before = [t.clone() for t in (w, a, b)]
    with pytest.raises(ValueError, match="non-finite"):
        unload_sharded_(w, a, b, 1.0, generator=torch.Generator(), out_features=4)
    assert all(torch.equal(t, t0) for t, t0 in zip((w, a, b), before))
