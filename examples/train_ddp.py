"""Data-parallel PeriodicLoRA training: DDP (default) or FSDP2, one script for CPU and GPU.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py            # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py --dtype bf16   # 8 GPUs (nccl)
    python examples/train_ddp.py                                               # one process, world size 1
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --fsdp      # FSDP2 instead of DDP

The model is a tiny Llama built from a config (transformers, nothing downloaded) or, with --model mlp or
without transformers, a small MLP. The data is synthetic: each step draws one global batch from a
generator seeded by the step, and rank k trains on its contiguous 1/world share of it, so the run is the
same whatever the world size (up to the order of floating-point sums).

Every rank must unload with the same random numbers (the fresh lora_A and the stochastic rounding of W):
PeriodicUnloader derives them from (seed, unload index, layer index), never from the global RNG, which this
script seeds differently per rank on purpose. With DDP the script ends by checking that every rank holds
bit-identical weights and adapters.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import time

import torch
import torch.distributed as dist
from torch import nn

import plora_kernels as pk
from plora_kernels.bench.common import positive_int  # an argparse type: an int >= 1
from plora_kernels.distributed import unsynced_replicas

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl when CUDA is available, else gloo")
    p.add_argument("--model", choices=["auto", "llama", "mlp"], default="auto",
                   help="auto: a tiny Llama if transformers is installed, else an MLP")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="base weight dtype (adapters stay fp32)")
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--every", type=positive_int, default=25, help="unload every N optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="GLOBAL batch size (split across ranks)")
    p.add_argument("--seq-len", type=positive_int, default=32)
    p.add_argument("--r", type=positive_int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--momentum", type=float, default=0.0, help="in [0, 1)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=10)
    args = p.parse_args()
    if not 0.0 <= args.momentum < 1.0:
        p.error(f"argument --momentum: must be in [0, 1), got {args.momentum}")
    return args


def setup(backend: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (or make a world of one); return (rank, world, device)."""
    if "RANK" not in os.environ:  # plain `python train_ddp.py`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build_model(kind: str, dtype: torch.dtype, device, args) -> tuple[nn.Module, str]:
    if kind == "auto":
        try:
            import transformers  # noqa: F401
            kind = "llama"
        except ImportError:
            kind = "mlp"
    torch.manual_seed(args.seed)  # the same initial model on every rank
    if kind == "llama":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=args.seq_len,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        targets = LLAMA_TARGETS
    else:
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
        model = model.to(device=device, dtype=dtype)
        targets = None
    pk.apply_plora(model, target_modules=targets, r=args.r, alpha=args.alpha, momentum=args.momentum)
    return model, kind


def global_batch(kind: str, step: int, args, device, dtype):
    """One global batch, the same on every rank: a learnable synthetic task."""
    g = torch.Generator().manual_seed(10_000 + step)
    if kind == "llama":
        # sequences counting up from a random start: every next token follows from the current one
        start = torch.randint(0, 128, (args.batch_size, 1), generator=g)
        return ((start + torch.arange(args.seq_len)) % 128).to(device)
    x = torch.randn(args.batch_size, 64, generator=g)
    return x.to(device=device, dtype=dtype)


def loss_fn(kind: str, model, batch):
    if kind == "llama":
        return model(input_ids=batch, labels=batch).loss
    target = torch.sin(2 * batch.float()).flip(-1)
    return (model(batch).float() - target).pow(2).mean()


def main():
    args = parse_args()
    rank, world, device = setup(args.backend)
    status, ok = 1, False
    try:
        status = train(args, rank, world, device)
        ok = True
    finally:
        shutdown(barrier=ok)
    raise SystemExit(status)


def shutdown(barrier: bool) -> None:
    """Tear down before the interpreter exits, on success and on error alike: DDP objects sit in reference cycles,
    so collect them first, then destroy the process group. A DDP reducer or a gloo/nccl group still alive at exit
    can abort the process after the work is done ("terminate called without an active exception")."""
    gc.collect()
    if dist.is_initialized():
        if barrier:
            dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    gc.collect()


def train(args, rank: int, world: int, device: torch.device) -> int:
    """The training run; returns the exit status (1 if the DDP replicas ended up different)."""
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    dtype = DTYPES[args.dtype]
    model, kind = build_model(args.model, dtype, device, args)
    torch.manual_seed(args.seed + 1 + rank)  # deliberately different per rank: the unloads must not care

    if args.fsdp:
        # FSDP2 shards W, A and B by rows; an unload merges each rank's rows of W without gathering W
        # (plora_kernels.distributed.unload_dtensor_, which plora_kernels.unload_ calls for DTensors)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for _, layer in pk.plora_layers(model):
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        # every adapter is used in every forward, so find_unused_parameters stays False; the frozen W is
        # broadcast once here and then changed identically on every rank by each unload
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = pk.stage_cosine_schedule(optimizer, args.steps, args.every, warmup=min(args.every // 4, args.steps),
                                         restart_warmup=max(1, args.every // 10))
    unloader = pk.PeriodicUnloader(model, optimizer, every=args.every, seed=args.seed)
    per_rank = args.batch_size // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    if rank == 0:
        n_train = sum(p.numel() for p in params)  # a DTensor counts its global size
        print(f"world={world} backend={dist.get_backend()} device={device} model={kind} dtype={args.dtype} "
              f"{'fsdp2' if args.fsdp else 'ddp'} layers={len(unloader.layers)} trainable={n_train}", flush=True)

    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = global_batch(kind, step, args, device, dtype)[mine]
        loss = loss_fn(kind, wrapped, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        unloaded = unloader.step()
        if step % args.log_every == 0 or unloaded or step == args.steps - 1:
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item() / world:.4f}  lr {scheduler.get_last_lr()[0]:.2e}"
                      f"{'  [unloaded]' if unloaded else ''}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    status = 0
    if not args.fsdp:
        differ = unsynced_replicas(model)
        if rank == 0:
            print("replicas bit-identical: " + ("yes" if not differ else f"NO, differ in {differ}"), flush=True)
        status = 1 if differ else 0
    if rank == 0:
        print(f"{args.steps} steps, {unloader.num_unloads} unloads in {elapsed:.2f} s", flush=True)
    return status


if __name__ == "__main__":
    main()
