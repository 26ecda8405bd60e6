"""Training and inference throughput of one model on this device: tokens/s of a forward pass and of
a forward + backward step, model FLOPs utilisation (6·N·tokens/s against the device's peak on a
GPU; on CPU only the rates are printed), and the KD step ratio: a KD step (teacher forward +
student forward/backward with the vocabulary-parallel KL) over a teacher forward plus a plain
training step, timed side by side.

    python benchmarks/throughput.py [--load CKPT | --shape 1b] [--seq-length 2048]
                                    [--micro-batch-size 4] [--steps 5] [--bf16 | --fp32]

`--shape 1b` is a random Llama of ~1.2B parameters (hidden 2048, 16 layers, ffn 5632, 16 heads in
4 groups, vocab 32000); `--shape tiny` a 2-layer one for smoke runs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
               num_query_groups=4, kv_channels=128, vocab_size=32000),
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, kv_channels=16, vocab_size=256),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def _model(a, parallel):
    from megatron_minitron.config import ModelConfig
    from megatron_minitron.model import build_model, load_model
    from megatron_minitron.runtime import init_runtime

    if a.load:
        _, meta, chunks = load_model(Path(a.load), parallel)
        return meta.model, chunks[0]
    cfg = ModelConfig(family="llama", max_position_embeddings=max(4096, a.seq_length),
                      **SHAPES[a.shape])
    init_runtime(parallel)
    model = build_model(cfg, parallel)[0]
    with torch.no_grad():  # built uninitialised (weights normally come from a checkpoint)
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return cfg, model


def _timed(fn, steps: int) -> float:
    fn()  # warm-up (kernel selection, allocator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    from megatron.core import parallel_state

    from megatron_minitron.cli import _quiet_third_party
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.distill.losses import kd_loss
    from megatron_minitron.runtime.distributed import device, shutdown

    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--shape", choices=SHAPES, default="1b")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
    a = p.parse_args()
    _quiet_third_party()
    cfg, model = _model(a, ParallelConfig(precision=a.precision))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    b, s = a.micro_batch_size, a.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), device=device())
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = torch.arange(s, device=device()).expand(b, s)

    def forward():
        model.eval()
        with torch.no_grad():
            model(inputs, pos, None, labels=labels)

    def train_step():
        model.train()
        model(inputs, pos, None, labels=labels).float().mean().backward()
        model.zero_grad(set_to_none=True)

    def kd_step():  # the model as its own frozen teacher: the costs of a KD step, not its use
        model.train()
        with torch.no_grad():
            teacher = model(inputs, pos, None)
        kd_loss(model(inputs, pos, None), teacher, 1.0, tp_group).mean().backward()
        model.zero_grad(set_to_none=True)

    t_fwd, t_step, t_kd = (_timed(f, a.steps) for f in (forward, train_step, kd_step))
    n = cfg.num_parameters()
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "parameters": n, "tokens_per_step": b * s,
           "forward_tokens_per_s": b * s / t_fwd, "train_tokens_per_s": b * s / t_step,
           "kd_step_ratio": t_kd / (t_fwd + t_step)}
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in out["device"]), None)
    if peak and out["dtype"] == "bfloat16":
        out["mfu"] = 6 * n * out["train_tokens_per_s"] / (peak * 1e12)
    if torch.cuda.is_available():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))
    shutdown()


if __name__ == "__main__":
    main()
