"""Write a tiny Llama-style checkpoint with Megatron-LM's own training code (run by hand, on CPU).

    PYTHONPATH=/tmp/mlm .venv/bin/python tests/assets/megatron_lm/make_fixture.py \
        --megatron-lm /tmp/mlm --out tests/assets/megatron_lm/llama_tiny

/tmp/mlm is a Megatron-LM tree (`git archive core_v0.16.1`, matching megatron-core 0.16.1).
The script parses the arguments below with Megatron-LM's parse_args/validate_args
(initialize_megatron), builds the model and optimizer with training.setup_model_and_optimizer from
pretrain_gpt's model_provider + gpt_builders.gpt_builder (local transformer impl; no Transformer
Engine), perturbs the RMSNorm weights (random init leaves them at 1), trains 3 iterations with
training.train_step and pretrain_gpt.forward_step, and saves with checkpointing.save_checkpoint
at iteration 3 (torch_dist, with optimizer state, no RNG state). Then it writes
<out>/reference.safetensors (tokens [2,16] int64, logits [2,16,256] float32, batch first: the
saved model's eval forward) and <out>/SOURCE.md.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _mlm_cpu  # noqa: E402

MODEL_ARGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu", "--disable-bias-linear",
    "--position-embedding-type", "rope", "--rotary-base", "10000",
    "--untie-embeddings-and-output-weights", "--max-position-embeddings", "64",
    "--seq-length", "32", "--tokenizer-type", "NullTokenizer", "--vocab-size", "250",
    "--make-vocab-size-divisible-by", "128",
]
TRAIN_ARGS = [
    "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "3", "--lr", "1e-4",
    "--ckpt-format", "torch_dist", "--save-interval", "3", "--no-save-rng",
    "--transformer-impl", "local",
]
# Not passed: "--attention-backend local" (validate_args then asserts `--spec local`, which
# gpt_builder cannot import); with --transformer-impl local the attention is Megatron's
# DotProductAttention whatever the backend (default auto).
ITERATION = 3


def megatron_argv(out: Path, seed: int) -> list[str]:
    return [*MODEL_ARGS, *TRAIN_ARGS, "--save", str(out), "--seed", str(seed), *_mlm_cpu.CPU_ARGS]


def _commit(tree: Path) -> str:
    for name in ("COMMIT", ".git_commit"):
        if (tree / name).is_file():
            return (tree / name).read_text().strip()
    try:
        return subprocess.check_output(["git", "-C", str(tree), "rev-parse", "HEAD"],
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-lm", required=True, type=Path, help="Megatron-LM tree")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=1234, help="Megatron --seed (init)")
    ap.add_argument("--commit", default=None,
                    help="Megatron-LM commit of the tree, for SOURCE.md (else <tree>/COMMIT)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    opts = ap.parse_args()
    out = opts.out  # as given (relative in the documented command): it is saved in args.save
    if out.exists():
        if not opts.overwrite:
            raise SystemExit(f"{out} exists (use --overwrite)")
        shutil.rmtree(out)
    argv = megatron_argv(out, opts.seed)

    _mlm_cpu.setup(opts.megatron_lm)
    args = _mlm_cpu.initialize(argv)

    import torch
    from gpt_builders import gpt_builder  # Megatron-LM tree, as pretrain_gpt.py imports them
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.core.utils import get_model_config
    from megatron.training import get_timers
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.training import (
        num_floating_point_operations,
        setup_model_and_optimizer,
        train_step,
    )
    from megatron.training.utils import unwrap_model
    from model_provider import model_provider
    from pretrain_gpt import forward_step
    from safetensors.torch import save_file

    assert args.padded_vocab_size == 256, args.padded_vocab_size

    # Model (DDP-wrapped), Megatron optimizer and LR scheduler, as pretrain() sets them up.
    model, optimizer, opt_param_scheduler = setup_model_and_optimizer(
        partial(model_provider, gpt_builder), ModelType.encoder_or_decoder)
    gpt = unwrap_model(model)[0]

    # Random init leaves every RMSNorm weight at 1; make them non-trivial so norms matter.
    g = torch.Generator().manual_seed(opts.seed)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith(("layernorm.weight", "layer_norm_weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                print(f"perturbed {name} {tuple(p.shape)}")

    # Training config, as megatron.training.training.train() sets it.
    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.timers = get_timers()
    config.finalize_model_grads_func = finalize_model_grads
    for chunk in model:
        chunk.train()

    # Samples shaped as GPTDataset.__getitem__ returns them (tokens/labels shifted by one,
    # bool causal mask from _get_ltor_masks_and_position_ids), collated to micro-batches.
    def batches():
        gd = torch.Generator().manual_seed(opts.seed + 1)
        while True:
            text = torch.randint(0, 250, (args.seq_length + 1,), generator=gd)
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
            mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
                tokens, 250, False, False, False, True)
            yield {"tokens": tokens[None], "labels": labels[None],
                   "attention_mask": (mask < 0.5)[None], "loss_mask": loss_mask[None],
                   "position_ids": position_ids[None]}

    # build_train_valid_test_data_iterators wraps the iterator for the rerun state machine.
    data_iterator = RerunDataIterator(batches())
    forward_backward_func = get_forward_backward_func()
    flops = 0
    for it in range(ITERATION):
        args.curr_iteration = it
        loss, skipped, *_ = train_step(forward_step, data_iterator, model, optimizer,
                                       opt_param_scheduler, config, forward_backward_func,
                                       iteration=it)
        assert not skipped
        batch = args.micro_batch_size * args.data_parallel_size * get_num_microbatches()
        args.consumed_train_samples += batch
        flops += num_floating_point_operations(args, batch)
        print(f"iteration {it + 1}: lm loss {loss['lm loss'].item():.4f}")
    args.iteration = ITERATION

    save_checkpoint(ITERATION, model, optimizer, opt_param_scheduler, flops)

    # Reference: the saved weights' eval forward on fixed tokens.
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
    gpt.eval()
    with torch.no_grad():
        logits = gpt(tokens, position_ids, None)  # local attention builds the causal mask
        causal = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)[None, None]
        logits_masked = gpt(tokens, position_ids, causal)  # pretrain_gpt's explicit mask
    assert logits.shape == (2, 16, args.padded_vocab_size), logits.shape
    assert torch.equal(logits, logits_masked)
    save_file({"tokens": tokens.contiguous(), "logits": logits.float().contiguous()},
              str(out / "reference.safetensors"))

    commit = opts.commit or _commit(opts.megatron_lm)
    from torch.distributed.checkpoint import FileSystemReader

    iter_dir = out / f"iter_{ITERATION:07d}"
    dcp_keys = "\n".join(f"      {k}" for k in
                         FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata)
    common = torch.load(iter_dir / "common.pt", weights_only=True)
    cmd = ("PYTHONPATH=/tmp/mlm .venv/bin/python tests/assets/megatron_lm/make_fixture.py "
           f"--megatron-lm /tmp/mlm --out tests/assets/megatron_lm/{out.name}")
    (out / "SOURCE.md").write_text(f"""# {out.name}

Written by Megatron-LM's own `megatron.training.checkpointing.save_checkpoint` (torch_dist,
iteration {ITERATION}, with optimizer state, `--no-save-rng`), on CPU, by
`tests/assets/megatron_lm/make_fixture.py`.

- Megatron-LM: commit `{commit}` (tag `core_v0.16.1`), tree from
  `git archive core_v0.16.1 | tar -x -C /tmp/mlm`; torch {torch.__version__}.
- Command (from the repository root):

      {cmd}

- Megatron arguments (parsed by `megatron.training.arguments.parse_args`/`validate_args`):

      {shlex.join(argv).replace(str(out), '<out>')}

  The last six are CPU-only needs (no NCCL, Apex, Transformer Engine, CUDA kernels;
  see `_mlm_cpu.CPU_ARGS`).
- Model: GPTModel from `gpt_builders.gpt_builder` (local spec), random init with `--seed
  {opts.seed}`; every RMSNorm weight then set to `1 + 0.1*randn` (torch.Generator seed
  {opts.seed}); then 3 training iterations (`training.train_step`, `pretrain_gpt.forward_step`,
  Adam, lr 1e-4) on random tokens (Generator seed {opts.seed + 1}). padded_vocab_size
  {args.padded_vocab_size} (NullTokenizer vocab 250 + EOD = 251, padded to a multiple of 128).
- `reference.safetensors`: `tokens` [2,16] int64 = `torch.randint(0, 250, (2, 16),
  generator=torch.Generator().manual_seed(0))`; `logits` [2,16,{args.padded_vocab_size}] float32,
  batch first: the saved model in eval mode, `model(tokens, arange(16), attention_mask=None)`.
- Check a load with `tests/assets/megatron_lm/load_check.py`.

Contents of `{iter_dir.name}/`: `common.pt` (keys {sorted(common)}; `args` is the full
Namespace), `metadata.json`, DCP `.metadata` and `__0_*.distcp` with these keys:

{dcp_keys}
""")
    print(f"wrote {out}")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
