"""Our pruning vs NVIDIA Model Optimizer 0.43.0's `mcore_minitron` (the peer), side by side.

    make bench-setup                 # installs the optional `bench` extra (torch kept pinned)
    python benchmarks/vs_modelopt.py [--load CKPT] [--samples 32] [--seq-length 128]

Same model (SmolLM2-135M, TP=1), same calibration samples, same targets; prints the held-out loss
right after pruning (no retraining) per axis and combined, as the markdown table README.md and
docs/pruning.md show. Every column is named by the flags it adds to `minitron importance
--samples 32 --seq-length 128 --depth-samples 8 --micro-batch-size 4` and `minitron prune`:
the paper's recipe (our defaults, norms sliced without rescale), our defaults, blocks of 6
layers measured for depth, and `--strategy auto` with the head-masking losses (chosen on
calibration windows drawn after the importance samples; the held-out plays are never looked
at); then heads ranked at random, the masking loss and block influence as extra lines. The peer
only knows Megatron's own norm classes (apex / TE), so its generic dynamic LayerNorm is
registered for our local-spec norm: that slices the weights exactly as its own norms would.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import teacher_checkpoint, with_random_heads  # noqa: E402

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
PEER = "modelopt 0.43.0"


def columns(head_samples: int) -> dict[str, tuple[str, str]]:
    """Ours, each column by the flags (importance, prune) it adds to the common ones."""
    return {"paper": ("", "--no-norm-rescale"), "defaults": ("", ""),
            "blocks": ("--block-sizes 1 6", ""),
            "auto": (f"--block-sizes 1 6 --head-samples {head_samples}", "--strategy auto")}


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


def _header(name: str, flags: tuple[str, str] | None) -> str:
    if flags is None:
        return f"{PEER} `mcore_minitron`"
    imp, prune = flags
    flags = " · ".join(f"`{cmd} {f}`" for cmd, f in (("importance", imp), ("prune", prune)) if f)
    return f"{name}: {flags}" if flags else f"{name}: no flags"


def markdown_table(losses: dict[str, dict[str, float]], params: dict[str, str],
                   ours: dict[str, tuple[str, str]]) -> str:
    """The table README.md shows: a row per target, a column per recipe, the row's best bold."""
    cols = [*ours, PEER]
    lines = ["| pruned (parameters) | " + " | ".join(_header(c, ours.get(c)) for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for row, by_col in losses.items():
        shown = {c: f"{v:.3f}" for c, v in by_col.items()}
        best = min(shown.values(), key=float)
        cells = [("(cannot)" if c not in shown else
                  f"**{shown[c]}**" if shown[c] == best else shown[c]) for c in cols]
        lines.append(f"| {row} ({params[row]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--depth-samples", type=int, default=8)
    p.add_argument("--head-samples", type=int, default=8)
    p.add_argument("--select-samples", type=int, default=8)
    p.add_argument("--random-draws", type=int, default=5)
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
    from megatron_minitron.prune.strategy import Calibration, choose_plan
    from megatron_minitron.runtime import init_runtime

    _quiet_third_party()
    ckpt = teacher_checkpoint(a.load)
    meta = mcore.read_meta(ckpt)
    rt = init_runtime(ParallelConfig())
    tok = load_tokenizer(ckpt)
    ids = token_stream(train_plays(), tok, meta.model.vocab_size)
    samples = sample_windows(ids, a.samples, a.seq_length, seed=1234)
    select = sample_windows(ids, a.select_samples, a.seq_length, seed=1234, skip=a.samples)
    text = "\n\n".join(p.read_text() for p in held_out_plays())
    held_out = token_windows(tok.encode(text), 256, 8)

    def fresh():
        chunks = build_model(meta.model, rt.parallel)
        mcore.load_checkpoint(chunks, ckpt)
        return chunks

    chunks = fresh()
    teacher = evaluate_windows(chunks, held_out, 4).loss
    base = ImportanceConfig(samples=a.samples, seq_length=a.seq_length,
                            depth_samples=a.depth_samples, micro_batch_size=4)
    scores = {}
    for name, cfg in (("defaults", base),
                      ("blocks", dataclasses.replace(base, block_sizes=(1, 6),
                                                     head_samples=a.head_samples))):
        t = time.time()
        scores[name] = compute_importance(chunks, meta.model, samples, cfg)
        print(f"importance ({name}) in {time.time() - t:.0f} s: {scores[name].meta['seconds']}")
    cal = Calibration(samples, select, scores["blocks"].meta, micro_batch_size=4)

    def held_out_loss(plan) -> float:
        return evaluate_windows(prune_model(chunks, meta.model, plan, rt.parallel), held_out,
                                4).loss

    losses: dict[str, dict[str, float]] = {}
    params: dict[str, str] = {}
    chosen = {}
    for row, exp in [*ROWS.items(), GROUPS_ROW]:
        target = PruneTarget(hidden=exp.get("hidden_size"), ffn=exp.get("ffn_hidden_size"),
                             heads=exp.get("num_attention_heads"),
                             groups=exp.get("num_query_groups"), layers=exp.get("num_layers"))
        plans = {"paper": make_plan(meta.model, dataclasses.replace(target, norm_rescale=False),
                                    scores["defaults"]),
                 "defaults": make_plan(meta.model, target, scores["defaults"]),
                 "blocks": make_plan(meta.model, target, scores["blocks"])}
        t = time.time()
        plans["auto"], table = choose_plan(chunks, meta.model, target, scores["blocks"], cal,
                                           rt.parallel)
        chosen[row] = (plans["auto"].notes[-1].split("auto: ")[-1].split(" had")[0],
                       len(table), time.time() - t)
        print(f"auto, {row}:", *(f"  {c['loss']:.4f} {c['parameters']:,} {c['strategy']}"
                                 for c in table), sep="\n")
        losses[row] = {c: held_out_loss(plan) for c, plan in plans.items()}
        counts = sorted({plan.model.num_parameters() for plan in plans.values()}, reverse=True)
        params[row] = " / ".join(f"{n / 1e6:.1f}M" for n in counts)

    heads = PruneTarget(heads=6)
    random_losses = [held_out_loss(with_random_heads(
        make_plan(meta.model, heads, scores["defaults"]), meta.model, seed))
        for seed in range(a.random_draws)]
    masking = held_out_loss(make_plan(meta.model, dataclasses.replace(heads, head_metric="loss"),
                                      scores["blocks"]))
    influence = held_out_loss(make_plan(meta.model, PruneTarget(
        layers=24, depth_metric="block_influence"), scores["defaults"]))

    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    _register_norm_with_modelopt()
    mbs = [{"tokens": s[:, :-1].contiguous()} for s in torch.split(samples, 4)]
    scores_path = Path(tempfile.mkdtemp()) / "modelopt_scores.pth"
    for row, exp in ROWS.items():
        model = fresh()[0]
        t = time.time()
        mtp.prune(model, mode=[("mcore_minitron", get_mcore_minitron_config(
            hidden_size_divisor=64, ffn_hidden_size_divisor=64, num_layers_divisor=1))],
            constraints={"export_config": dict(exp)}, dummy_input=None,
            config={"forward_loop": lambda m: forward_microbatches([m], mbs, discard_output),
                    "scores_path": str(scores_path)})
        losses[row][PEER] = evaluate_windows([model], held_out, 4).loss
        print(f"modelopt: {row} pruned in {time.time() - t:.0f} s")

    print(f"\nSmolLM2-135M, calibration {a.samples} x {a.seq_length} training-play tokens (same "
          f"for every column; auto chooses on {a.select_samples} more), held-out loss over "
          f"{held_out.numel() - len(held_out)} tokens; teacher {teacher:.3f}. Every column of "
          f"ours runs `minitron importance --samples {a.samples} --seq-length {a.seq_length} "
          f"--depth-samples {a.depth_samples} --micro-batch-size 4` and `minitron prune`, "
          "adding the flags its heading names.\n")
    print(markdown_table(losses, params, columns(a.head_samples)))
    print("\nauto chose:")
    for row, (what, n, secs) in chosen.items():
        print(f"  {row}: {what} ({n} candidates in {secs:.0f} s)")
    print(f"\nheads 9 -> 6 inside the 3 groups: activation {losses['heads 9 -> 6']['defaults']:.3f}"
          f", masking loss (--head-metric loss) {masking:.3f}, random heads mean "
          f"{statistics.mean(random_losses):.3f} (range {min(random_losses):.3f}-"
          f"{max(random_losses):.3f}, {len(random_losses)} draws)")
    print(f"layers 30 -> 24 by block influence (--depth-metric block_influence): {influence:.3f}")


if __name__ == "__main__":
    main()
