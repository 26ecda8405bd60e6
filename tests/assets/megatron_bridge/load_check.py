"""Load a Megatron-Bridge checkpoint with Megatron-Bridge's own loader and compare its logits.

    PYTHONPATH=/tmp/mbridge:/work/main /work/main/.venv/bin/python \
        tests/assets/megatron_bridge/load_check.py tests/assets/megatron_bridge/llama_tiny \
        [--reference tests/assets/megatron_bridge/llama_tiny/reference.safetensors] [--tol 1e-5]

CHECKPOINT is a checkpoint root (as written by save_megatron_model: the iteration directory with the
largest number is used, as AutoBridge.load_megatron_model does) or an iteration directory
(iter_NNNNNNN/ with run_config.yaml). The model is rebuilt from run_config.yaml and its weights read
with megatron.bridge.training.model_load_save.load_megatron_model (use_cpu_init=True: TP=PP=1, gloo),
inside Bridge's temporary_distributed_context. The forward runs on the reference file's `tokens`
(position_ids arange, attention_mask None) and the max abs difference to its `logits` is printed;
the exit status is 0 if it is below --tol, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bridge_cpu  # noqa: E402


def resolve_iteration_dir(path: Path) -> Path:
    iters = [d for d in path.iterdir() if d.is_dir() and d.name.startswith("iter_")]
    if not iters:
        return path

    def number(d: Path) -> int:
        try:
            return int(d.name[len("iter_"):])
        except ValueError:
            return -1

    return max(iters, key=number)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--reference", type=Path, default=None,
                    help="safetensors with tokens [B,S] and logits [B,S,V] (default: "
                         "CHECKPOINT/reference.safetensors)")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()

    mb = _bridge_cpu.setup()
    import torch
    from safetensors.torch import load_file

    ref_path = args.reference or (args.checkpoint / "reference.safetensors")
    ref = load_file(str(ref_path))
    tokens, ref_logits = ref["tokens"].to(torch.long), ref["logits"].float()
    iter_dir = resolve_iteration_dir(args.checkpoint)

    mls = mb.model_load_save
    with mls.temporary_distributed_context(backend="gloo"):
        _bridge_cpu.seed_megatron_rng(0)
        cfg, mlm_args = mls.load_model_config(str(iter_dir))
        print(f"megatron-bridge {mb.version}: {iter_dir} -> {type(cfg).__module__}.{type(cfg).__qualname__}"
              f"{' (Megatron-LM args)' if mlm_args is not None else ''}")
        model = mls.load_megatron_model(str(iter_dir), use_cpu_init=True)
        gpt = model[0] if isinstance(model, list) else model
        logits = _bridge_cpu.forward_logits(gpt, tokens)

    if logits.shape != ref_logits.shape:
        print(f"shape mismatch: got {tuple(logits.shape)}, reference {tuple(ref_logits.shape)}")
        return 1
    diff = (logits - ref_logits).abs().max().item()
    ok = diff < args.tol
    print(f"logits {tuple(logits.shape)}: max abs diff {diff:.3e} ({'OK' if ok else 'FAIL'}, tol {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
