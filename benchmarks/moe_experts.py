"""A real signal for mixture-of-experts pruning: a small Mixtral trained here from random init on
the Shakespeare training plays, then

1. experts 8 -> 4 per layer chosen by importance (each metric) vs at random (3 draws), held-out
   loss right after pruning;
2. expert width 512 -> 256: each expert its own best neurons (`--expert-neurons own`) vs the same
   neurons in every expert (`common`) vs random neurons, held-out loss right after pruning;
3. the importance-pruned model (experts) recovered by KD from the unpruned MoE vs by plain CE,
   the same tokens, steps and seed.

    python benchmarks/moe_experts.py [--train-steps 400] [--steps 15 50] [--out DIR]

The model: 4 layers, hidden 256, 8 experts of 512, top-2, a 1024-token BPE trained on the training
plays (so the embedding does not dwarf the experts). Training is `minitron distill --kd-weight 0
--lm-weight 1` on the model itself. Held-out: the 3 held-out plays. Writes DIR/moe_experts.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import kd_data  # noqa: E402

RANDOM_DRAWS = 3


def random_mixtral(out: Path, vocab: int = 1024) -> Path:
    """A random-init Mixtral written by transformers, with a BPE trained on the training plays."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megatron_minitron.data.demo import train_plays

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
        rms_norm_eps=1e-5, sliding_window=None)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([p.read_text() for p in train_plays()], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text('{"eos_token_id": 1}')
    return out


def randomised(scores: Path, out: Path, seed: int, key: str) -> Path:
    """The scores file with sums `key` replaced by random numbers: `sums.experts` (its
    routed-output sums: `--expert-metric output` then keeps random experts) or `sums.moe_ffn`
    (`--target-moe-ffn` then keeps random neurons)."""
    import torch

    from megatron_minitron.importance import load_scores

    s = load_scores(scores)
    g = torch.Generator().manual_seed(seed)
    t = s.tensors[key][:, 0] if key == "sums.experts" else s.tensors[key]
    t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype))
    s.save(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--steps", type=int, nargs="*", default=[15, 50],
                   help="KD / CE steps after pruning (each a separate pair of runs; none: skip)")
    p.add_argument("--experts", type=int, default=4, help="experts kept per layer")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    from megatron_minitron.cli import main as cli
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.distill.report import val_lm_first_last

    work = Path(tempfile.mkdtemp())
    out = a.out or work
    out.mkdir(parents=True, exist_ok=True)
    assert cli(["convert", str(random_mixtral(work / "hf")), str(work / "init")]) == 0
    kd_data(work / "init", work)
    common = ["--data", str(work / "train"), "--valid-data", str(work / "valid"),
              "--global-batch-size", "8", "--seq-length", "128", "--eval-iters", "8",
              "--log-interval", "25"]
    ce = ["--kd-weight", "0", "--lm-weight", "1"]

    def distill(t: Path, s: Path, save: str, steps: int, lr: float, *flags: str) -> Path:
        assert cli(["distill", "--teacher", str(t), "--student", str(s), "--save",
                    str(work / save), "--train-iters", str(steps), "--lr", str(lr),
                    "--min-lr", str(lr / 10), "--warmup-iters", str(steps // 10), *common,
                    *flags]) == 0
        return work / save / f"iter_{steps:07d}"

    trained = distill(work / "init", work / "init", "train", a.train_steps, 2e-3, *ce)
    _, trained_loss = val_lm_first_last(work / "train")
    scores = work / "scores.safetensors"
    assert cli(["importance", "--load", str(trained), "--data",
                *map(str, train_plays()[:8]), "--samples", "64", "--seq-length", "128",
                "--depth-samples", "0", "--out", str(scores)]) == 0

    def pruned_loss(name: str, scores: Path, metric: str, *target: str) -> float:
        target = target or ("--target-experts", str(a.experts))
        assert cli(["prune", "--load", str(trained), "--scores", str(scores), *target,
                    "--expert-metric", metric, "--out", str(work / name)]) == 0
        assert cli(["eval", "--load", str(work / name), "--seq-length", "128",
                    "--max-windows", "64", "--out", str(work / f"{name}.json")]) == 0
        return json.loads((work / f"{name}.json").read_text())["tasks"]["perplexity"]["loss"]

    result = {"trained_loss": trained_loss, "train_steps": a.train_steps,
              "experts_kept": a.experts,
              "by_metric": {m: pruned_loss(f"p_{m}", scores, m)
                            for m in ("output", "tokens", "probs")},
              "random": [pruned_loss(f"p_rand{k}", randomised(
                  scores, work / f"rand{k}.safetensors", k, "sums.experts"), "output")
                  for k in range(RANDOM_DRAWS)]}
    half = ("--target-moe-ffn", "256")
    result["width_256"] = {
        **{how: pruned_loss(f"w_{how}", scores, "output", *half, "--expert-neurons", how)
           for how in ("own", "common")},
        "random": [pruned_loss(f"w_rand{k}", randomised(
            scores, work / f"wrand{k}.safetensors", k, "sums.moe_ffn"), "output", *half)
            for k in range(RANDOM_DRAWS)]}
    assert cli(["eval", "--load", str(trained), "--seq-length", "128", "--max-windows", "64",
                "--out", str(work / "trained.json")]) == 0
    result["unpruned_eval_loss"] = json.loads((work / "trained.json").read_text()
                                              )["tasks"]["perplexity"]["loss"]
    result["recovery"] = {}
    for steps in a.steps:
        distill(trained, work / "p_output", f"ce{steps}", steps, 5e-4, *ce)
        distill(trained, work / "p_output", f"kd{steps}", steps, 5e-4)
        start, ce_loss = val_lm_first_last(work / f"ce{steps}")
        result["recovery"][steps] = {"ce": ce_loss,
                                     "kd": val_lm_first_last(work / f"kd{steps}")[1]}
        result["pruned_val_loss"] = start
    (out / "moe_experts.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    rand = result["random"]
    print(f"held-out loss: unpruned {result['unpruned_eval_loss']:.4f}; {a.experts} of 8 experts "
          f"by routed-output norm {result['by_metric']['output']:.4f}, tokens "
          f"{result['by_metric']['tokens']:.4f}, router mass {result['by_metric']['probs']:.4f}; "
          f"random {min(rand):.4f}..{max(rand):.4f} (mean {sum(rand) / len(rand):.4f})")
    w = result["width_256"]
    print(f"expert width 512 -> 256: each expert its own neurons {w['own']:.4f}, the same in "
          f"every expert {w['common']:.4f}, random {min(w['random']):.4f}..{max(w['random']):.4f}"
          f" (mean {sum(w['random']) / len(w['random']):.4f})")
    for steps, r in result["recovery"].items():
        print(f"recovery, {steps} steps: CE {r['ce']:.4f}, KD {r['kd']:.4f} (from "
              f"{result['pruned_val_loss']:.4f})")


if __name__ == "__main__":
    main()
