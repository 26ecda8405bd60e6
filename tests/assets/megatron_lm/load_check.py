"""Load a checkpoint directory with Megatron-LM's own code and compare logits (run by hand, CPU).

    PYTHONPATH=/tmp/mlm .venv/bin/python tests/assets/megatron_lm/load_check.py \
        --megatron-lm /tmp/mlm --load DIR --reference REF.safetensors [-- EXTRA MEGATRON ARGS]

DIR is a Megatron-LM save directory (tracker file + iter_NNNNNNN/ or release/). The model is built
as pretrain_gpt.py builds it (training.get_model with model_provider + gpt_builders.gpt_builder,
local transformer impl), from arguments parsed by Megatron-LM's parse_args with

    --load DIR --finetune --no-load-optim --no-load-rng --use-checkpoint-args
    --exit-on-missing-checkpoint --dist-ckpt-strictness <--strictness>

then filled by load_checkpoint(model, None, None). REF holds `tokens` [b,s] int64 and `logits`
[b,s,V] float32 (batch first, as make_fixture.py writes them). Prints the max abs difference of
the eval forward (position_ids = arange, attention_mask None); exit status 0 if it is < --atol.

--use-checkpoint-args (default on) takes the model shape from the checkpoint's saved `args`. Model
arguments that Megatron-LM's load_args_from_checkpoint does not copy (norm epsilon, qk layernorm,
zero-centred gamma, rope scaling) are forwarded from the saved args too, and the tokenizer is
replaced by a NullTokenizer (padded_vocab_size still comes from the checkpoint), so no tokenizer
files are needed; each forwarded flag is printed. With --no-use-checkpoint-args, give the model
arguments after `--`. Arguments after `--` are appended last in both modes.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _mlm_cpu  # noqa: E402


def _checkpoint_args(load: Path):
    """The `args` Namespace saved in the checkpoint's common state (None if absent), read with
    Megatron-LM's own tracker / directory / common-state readers."""
    from megatron.core import dist_checkpointing
    from megatron.training.checkpointing import (
        get_checkpoint_name,
        get_checkpoint_tracker_filename,
        read_metadata,
    )

    tracker = get_checkpoint_tracker_filename(str(load))
    if not Path(tracker).is_file():
        raise SystemExit(f"no tracker file {tracker}")
    iteration, release = read_metadata(tracker)
    iter_dir = get_checkpoint_name(str(load), iteration, release, return_base_dir=True)
    common = dist_checkpointing.load_common_state_dict(iter_dir)
    print(f"checkpoint {iter_dir}: iteration {iteration}, release {release}, "
          f"common keys {sorted(common)}")
    return common.get("args")


def _forwarded_args(ckpt_args) -> list[str]:
    """Flags for what --use-checkpoint-args leaves at Megatron's defaults."""
    def get(*names, default=None):
        for n in names:
            if getattr(ckpt_args, n, None) is not None:
                return getattr(ckpt_args, n)
        return default

    out = []
    padded = get("padded_vocab_size")
    vocab = get("vocab_size") if get("tokenizer_type") == "NullTokenizer" else None
    if vocab is None and padded is not None:
        vocab = padded - 1  # NullTokenizer adds EOD; the model's size is padded_vocab_size
    if vocab is not None:
        out += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab),
                "--no-use-tokenizer-model-from-checkpoint-args"]
    eps = get("layernorm_epsilon", "norm_epsilon")
    if eps is not None:
        out += ["--norm-epsilon", repr(float(eps))]
    if get("qk_layernorm", default=False):
        out += ["--qk-layernorm"]
    if get("layernorm_zero_centered_gamma", "apply_layernorm_1p", default=False):
        out += ["--apply-layernorm-1p"]
    if get("use_rope_scaling", default=False):
        out += ["--use-rope-scaling", "--rope-scaling-factor", str(get("rope_scaling_factor"))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-lm", required=True, type=Path, help="Megatron-LM tree")
    ap.add_argument("--load", required=True, type=Path, help="Megatron-LM save directory")
    ap.add_argument("--reference", required=True, type=Path, help="tokens + logits safetensors")
    ap.add_argument("--use-checkpoint-args", action=argparse.BooleanOptionalAction, default=True,
                    help="model arguments from the checkpoint (default on)")
    ap.add_argument("--strictness", default="assume_ok_unexpected",
                    help="Megatron --dist-ckpt-strictness (default: Megatron's default, which "
                         "fails if a requested key is missing; log_all tolerates that)")
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("megatron_args", nargs="*", help="extra Megatron-LM arguments (after --)")
    opts = ap.parse_args()
    load = opts.load.resolve()

    _mlm_cpu.setup(opts.megatron_lm)
    argv = ["--load", str(load), "--finetune", "--no-load-optim", "--no-load-rng",
            "--exit-on-missing-checkpoint", "--dist-ckpt-strictness", opts.strictness,
            "--micro-batch-size", "1", "--transformer-impl", "local", *_mlm_cpu.CPU_ARGS]
    if opts.use_checkpoint_args:
        ckpt_args = _checkpoint_args(load)
        argv.append("--use-checkpoint-args")
        if ckpt_args is None:
            print("WARNING: the checkpoint has no saved args; pass model arguments after --")
        else:
            forwarded = _forwarded_args(ckpt_args)
            print(f"forwarded from the checkpoint's args: {' '.join(forwarded)}")
            argv += forwarded
    argv += opts.megatron_args
    print(f"Megatron-LM arguments: {' '.join(argv)}")
    args = _mlm_cpu.initialize(argv)

    import torch
    from gpt_builders import gpt_builder
    from megatron.core.enums import ModelType
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.training import get_model
    from model_provider import model_provider
    from safetensors.torch import load_file

    # As setup_model_and_optimizer does without training (--skip-train): no DDP, no optimizer.
    model = get_model(partial(model_provider, gpt_builder), ModelType.encoder_or_decoder,
                      wrap_with_ddp=False)
    iteration, _ = load_checkpoint(model, None, None)
    print(f"load_checkpoint returned iteration {iteration} (0 with --finetune)")

    ref = load_file(str(opts.reference))
    tokens, ref_logits = ref["tokens"], ref["logits"]
    b, s = tokens.shape
    gpt = model[0]
    gpt.eval()
    with torch.no_grad():
        logits = gpt(tokens, torch.arange(s).unsqueeze(0).expand(b, -1), None)
    if logits.shape != ref_logits.shape:
        print(f"FAIL: logits shape {tuple(logits.shape)} != reference {tuple(ref_logits.shape)}")
        return 1
    diff = (logits.float() - ref_logits.float()).abs().max().item()
    print(f"max abs diff vs reference logits: {diff:.3e} (atol {opts.atol:g}; "
          f"padded_vocab_size {args.padded_vocab_size})")
    ok = diff < opts.atol
    print("OK" if ok else "FAIL")
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
