"""Our pruning vs NVIDIA Model Optimizer 0.43.0's `mcore_minitron` (the peer), side by side.

    make bench-setup                 # installs the optional `bench` extra (torch kept pinned)
    python benchmarks/vs_modelopt.py [--load CKPT] [--samples 32] [--seq-length 128]

Same model (SmolLM2-135M, TP=1), same calibration samples, same targets; prints the held-out loss
right after pruning (no retraining) per axis and combined. The peer only knows Megatron's own norm
classes (apex / TE), so its generic dynamic LayerNorm is registered for our local-spec norm: that
slices the weights exactly as its own norms would.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import teacher_checkpoint  # noqa: E402

ROWS = {  # the peer's export_config names
    "ffn 1536 -> 1024": {"ffn_hidden_size": 1024},
    "hidden 576 -> 448": {"hidden_size": 448},
    "heads 9 -> 6": {"num_attention_heads": 6},
    "layers 30 -> 24": {"num_layers": 24},
    "all four": {"ffn_hidden_size": 1024, "hidden_size": 448, "num_attention_heads": 6,
                 "num_layers": 24},
}
# What only we can do: the same head count as whole query groups (the peer removed group pruning).
GROUPS_ROW = ("all four, heads as 2 groups", {"ffn_hidden_size": 1024, "hidden_size": 448,
                                              "num_query_groups": 2, "num_layers": 24})


def _register_norm_with_modelopt() -> None:
    from modelopt.torch.nas.modules import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry

    from megatron_minitron.model.norm import MinitronNorm

    @DMRegistry.register({MinitronNorm: "MinitronNorm"})
    class _DynamicMinitronNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("bias", self._cut_to_active_features)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--depth-samples", type=int, default=8)
    a = p.parse_args()

    import torch

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.cli import _quiet_third_party
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.data.calibration import sample_windows, token_stream
    from megatron_minitron.data.demo import held_out_plays, train_plays
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate.perplexity import evaluate_windows, token_windows
    from megatron_minitron.importance import ImportanceConfig, compute_importance
    from megatron_minitron.importance.run import discard_output
    from megatron_minitron.model import build_model
    from megatron_minitron.model.forward import forward_microbatches
    from megatron_minitron.prune import PruneTarget, make_plan, prune_model
    from megatron_minitron.runtime import init_runtime

    _quiet_third_party()
    ckpt = teacher_checkpoint(a.load)
    meta = mcore.read_meta(ckpt)
    rt = init_runtime(ParallelConfig())
    tok = load_tokenizer(ckpt)
    samples = sample_windows(token_stream(train_plays(), tok, meta.model.vocab_size),
                             a.samples, a.seq_length, seed=1234)
    text = "\n\n".join(p.read_text() for p in held_out_plays())
    held_out = token_windows(tok.encode(text), 256, 8)

    def fresh():
        chunks = build_model(meta.model, rt.parallel)
        mcore.load_checkpoint(chunks, ckpt)
        return chunks

    chunks = fresh()
    teacher = evaluate_windows(chunks, held_out, 4).loss
    t = time.time()
    scores = compute_importance(chunks, meta.model, samples, ImportanceConfig(
        samples=a.samples, seq_length=a.seq_length, block_sizes=(1, 6),
        depth_samples=a.depth_samples, micro_batch_size=4))
    print(f"ours: importance in {time.time() - t:.0f} s")
    ours = {}
    for row, exp in [*ROWS.items(), GROUPS_ROW]:
        target = PruneTarget(hidden=exp.get("hidden_size"), ffn=exp.get("ffn_hidden_size"),
                             heads=exp.get("num_attention_heads"),
                             groups=exp.get("num_query_groups"), layers=exp.get("num_layers"))
        plan = make_plan(meta.model, target, scores)
        ours[row] = evaluate_windows(prune_model(chunks, meta.model, plan, rt.parallel),
                                     held_out, 4).loss

    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    _register_norm_with_modelopt()
    mbs = [{"tokens": s[:, :-1].contiguous()} for s in torch.split(samples, 4)]
    scores_path = Path(tempfile.mkdtemp()) / "modelopt_scores.pth"
    theirs = {}
    for row, exp in ROWS.items():
        model = fresh()[0]
        t = time.time()
        mtp.prune(model, mode=[("mcore_minitron", get_mcore_minitron_config(
            hidden_size_divisor=64, ffn_hidden_size_divisor=64, num_layers_divisor=1))],
            constraints={"export_config": dict(exp)}, dummy_input=None,
            config={"forward_loop": lambda m: forward_microbatches([m], mbs, discard_output),
                    "scores_path": str(scores_path)})
        theirs[row] = evaluate_windows([model], held_out, 4).loss
        print(f"modelopt: {row} pruned in {time.time() - t:.0f} s")

    print(f"\nSmolLM2-135M, calibration {a.samples} x {a.seq_length} training-play tokens (same "
          f"for both), held-out loss over {held_out.numel() - len(held_out)} tokens; "
          f"teacher {teacher:.4f}")
    print(f"{'pruned':<28}{'megatron-minitron':>20}{'modelopt 0.43.0':>18}")
    for row in ROWS:
        mark = "<=" if ours[row] <= theirs[row] + 1e-6 else "> "
        print(f"{row:<28}{ours[row]:>20.4f}{theirs[row]:>18.4f}   ours {mark} theirs")
    print(f"{GROUPS_ROW[0]:<28}{ours[GROUPS_ROW[0]]:>20.4f}{'(cannot)':>18}")


if __name__ == "__main__":
    main()
