"""Run under torchrun by the tests: load checkpoints at some TP/PP/SP and dump their logits. Several
checkpoints share one launch (one import, one set of process groups)."""

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_minitron.cli import _quiet_third_party
from megatron_minitron.config import ParallelConfig
from megatron_minitron.model import load_model
from megatron_minitron.model.forward import logits
from megatron_minitron.options import add_options, from_args
from megatron_minitron.runtime.cpu_compat import import_megatron
from megatron_minitron.runtime.distributed import shutdown


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load", required=True, nargs="+")
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True, nargs="+")
    p.add_argument("--micro-batch-size", type=int, default=1)
    add_options(p, ParallelConfig)
    a = p.parse_args()
    _quiet_third_party()
    import_megatron()
    tokens = load_file(a.tokens)["tokens"]
    for ckpt, dst in zip(a.load, a.out, strict=True):
        rt, _, chunks = load_model(Path(ckpt), from_args(ParallelConfig, a))
        out = logits(chunks, tokens, a.micro_batch_size)
        if out is not None and torch.distributed.get_rank() == rt.world_size - 1:
            save_file({"logits": out.float().cpu().contiguous()}, dst)
    shutdown()


if __name__ == "__main__":
    main()
