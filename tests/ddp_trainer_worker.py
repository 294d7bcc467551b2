"""Run by tests/test_integration_ddp.py under torchrun (2 CPU ranks, gloo): a transformers Trainer
with PLoRACallback under DDP; every rank must end with bit-identical weights and adapters."""
import gc
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import plora_kernels as pk
from plora_kernels.distributed import unsynced_replicas
from plora_kernels.integrations.transformers import PLoRACallback


def main(out_dir: str) -> None:
    ok = False
    try:
        run(out_dir)
        ok = True
    finally:
        shutdown(barrier=ok)


def shutdown(barrier: bool) -> None:
    """Tear down in order before the interpreter exits: the Trainer's DDP wrapper (it sits in reference cycles, so
    only a collection frees it) before the process group it communicates over. A DDP reducer or a gloo group
    still alive at exit can abort the process after the work is done ("terminate called without an active
    exception"), which made this test flaky."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        if barrier:
            dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
        if rank == 0 and barrier:
            print("SHUTDOWN clean", flush=True)  # the test checks that the teardown ran
    gc.collect()


def run(out_dir: str) -> None:
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=64)
    model = pk.apply_plora(LlamaForCausalLM(config).to(torch.bfloat16), r=4, alpha=8)  # stochastic rounding
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = TrainingArguments(out_dir, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, ddp_backend="gloo", save_strategy="no",
                             logging_steps=1, seed=1234)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PLoRACallback(every=2)])
    trainer.train()
    assert dist.is_initialized() and dist.get_world_size() == 2, "not a 2-rank run"
    layers = [layer for _, layer in pk.plora_layers(model)]
    unloads = {int(layer.num_unloads) for layer in layers}
    differ = unsynced_replicas(model)
    if dist.get_rank() == 0:
        print(f"RESULT unloads={sorted(unloads)} differ={differ}", flush=True)
    del trainer, model, layers  # the DDP wrapper goes with the Trainer (collected in shutdown)


if __name__ == "__main__":
    main(sys.argv[1])
