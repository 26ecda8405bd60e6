"""Run under torchrun (2 ranks, MINITRON_STRICT_DEVICE=1) by test_device: the strict device mode
raises for the two mistakes a GPU run would die of, a batch left on the host and a host buffer in
a collective, and lets the device-correct versions through."""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.model import build_model
from megatron_minitron.runtime import init_runtime
from megatron_minitron.runtime.distributed import device, shutdown, to_device
from megatron_minitron.runtime.strict_device import DeviceMistake


def raises(fn) -> bool:
    try:
        fn()
    except DeviceMistake:
        return True
    return False


def main() -> None:
    rt = init_runtime(ParallelConfig(tp=2, sequence_parallel=True))
    cfg = ModelConfig(family="llama", num_layers=2, hidden_size=32, ffn_hidden_size=64,
                      num_attention_heads=4, num_query_groups=2, kv_channels=8, vocab_size=64)
    model = build_model(cfg, rt.parallel)[0]
    tokens = torch.randint(0, 64, (1, 16))  # a host batch, as the data loaders build it
    batch = {"tokens": tokens, "position_ids": torch.arange(16)[None]}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    gloo = dist.new_group([0, 1], backend="gloo")
    checks = {
        "host batch into the model raises": raises(
            lambda: model(batch["tokens"], batch["position_ids"], None)),
        "moved batch runs": not raises(
            lambda: model(*to_device(batch).values(), None)),
        "host buffer in an all-reduce raises": raises(
            lambda: dist.all_reduce(torch.zeros(2), group=tp_group)),
        "host receive buffer in a broadcast raises": raises(
            lambda: dist.broadcast(torch.zeros(2), 0)),
        "device buffer in an all-reduce runs": not raises(
            lambda: dist.all_reduce(torch.zeros(2, device=device()), group=tp_group)),
        "host tensor on a gloo group runs": not raises(
            lambda: dist.all_reduce(torch.zeros(2), group=gloo)),
        "device + host tensor raises": raises(
            lambda: torch.ones(3, device=device()) + torch.ones(3)),
        "device + host scalar runs": not raises(
            lambda: torch.ones(3, device=device()) * torch.tensor(2.0)),
        ".cpu() result is host": not raises(
            lambda: torch.ones(3, device=device()).cpu() + torch.ones(3)),
        "host index into a device tensor runs": not raises(
            lambda: torch.ones(3, device=device())[torch.tensor([0, 2])]),
    }
    for name, ok in checks.items():
        print(f"rank {rt.rank}: {'ok ' if ok else 'BAD'} {name}")
    shutdown()
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
