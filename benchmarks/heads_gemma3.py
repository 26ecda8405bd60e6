"""Head pruning on Gemma 3 270M (no peer prunes it at our shapes): held-out loss right after
pruning one head of 4 in every layer, by each head metric, by random heads, and by
`--strategy auto` (chosen on calibration windows, never on the held-out plays).

    python benchmarks/heads_gemma3.py [--samples 16] [--head-samples 2] [--select-samples 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import with_random_heads  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--head-samples", type=int, default=2)
    p.add_argument("--select-samples", type=int, default=4)
    p.add_argument("--held-out-windows", type=int, default=4)
    p.add_argument("--random-draws", type=int, default=3)
    a = p.parse_args()

    from megatron_minitron import stages
    from megatron_minitron.cli import _quiet_third_party
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.data.demo import gemma3_gguf, held_out_plays
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate.perplexity import evaluate_windows, token_windows
    from megatron_minitron.importance import ImportanceConfig, load_scores
    from megatron_minitron.model import load_model
    from megatron_minitron.prune import PruneTarget, make_plan, prune_model
    from megatron_minitron.prune.strategy import calibration, choose_plan

    _quiet_third_party()
    d = Path(tempfile.mkdtemp())
    ckpt = stages.convert(gemma3_gguf(), d / "teacher")
    scores_file = stages.importance(ckpt, d / "scores.safetensors", ImportanceConfig(
        samples=a.samples, seq_length=128, depth_samples=0, head_samples=a.head_samples,
        micro_batch_size=4))
    rt, meta, chunks = load_model(ckpt, ParallelConfig())
    model, scores = meta.model, load_scores(scores_file)
    tok = load_tokenizer(ckpt)
    text = "\n\n".join(f.read_text() for f in held_out_plays())
    held_out = token_windows(tok.encode(text), 128, a.held_out_windows, prefix=tok.prefix)

    def loss(plan) -> float:
        return evaluate_windows(prune_model(chunks, model, plan, rt.parallel), held_out, 4).loss

    target = PruneTarget(heads=model.num_attention_heads - 1)
    rows = {m: loss(make_plan(model, PruneTarget(heads=target.heads, head_metric=m), scores))
            for m in ("activation", "output", "loss")}
    rand = [loss(with_random_heads(make_plan(model, target, scores), model, s))
            for s in range(a.random_draws)]
    t = time.time()
    plan, table = choose_plan(chunks, model, target, scores,
                              calibration(ckpt, scores.meta, a.select_samples), rt.parallel)
    auto = loss(plan)
    print(f"\nGemma 3 270M, heads {model.num_attention_heads} -> {target.heads} per layer; "
          f"held-out loss over {a.held_out_windows} x 128 tokens (teacher "
          f"{evaluate_windows(chunks, held_out, 4).loss:.4f}); importance "
          f"{scores.meta['seconds']}")
    for m, v in rows.items():
        print(f"  head metric {m:<10} {v:.4f}")
    print(f"  random heads       {sum(rand) / len(rand):.4f} ({min(rand):.4f}-{max(rand):.4f})")
    print(f"  --strategy auto    {auto:.4f}  ({time.time() - t:.0f} s; calibration losses: "
          + ", ".join(f"{c['strategy'].split('metric ')[1].split(',')[0]} {c['loss']:.4f}"
                      for c in table) + ")")


if __name__ == "__main__":
    main()
