"""Heterogeneous against homogeneous students of SmolLM2-135M at the same parameter count:
held-out loss right after pruning and after the same short KD (issue 37's measurement).

Homogeneous: the combined target (hidden 448, ffn 1024, heads 6, layers 24) with
`--strategy auto`; heterogeneous: `--heterogeneous` started from auto's winner (its hidden size,
heads, query groups, MLP width and dropped layers), each layer's MLP width and attention refined
in context for `--rounds` rounds under `--target-params` equal to what auto's winner has.
Both from the same scores; both distilled from the unpruned model with the same steps and
data, once per `--kd-seeds` seed (the order the batches are drawn in), so that a difference after
KD can be told from the run-to-run spread; held-out loss over the first held-out play (8 windows
of 256 tokens).

    python benchmarks/heterogeneous.py [--kd-steps 30] [--kd-seeds 1234,1,2] [--rounds 3]
        [--work DIR] [--teacher CKPT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import kd_data, teacher_checkpoint  # noqa: E402

HOMOGENEOUS = ["--target-hidden", "448", "--target-heads", "6", "--target-ffn", "1024",
               "--target-layers", "24", "--strategy", "auto"]


def main() -> None:
    from megatron_minitron.cli import main as cli
    from megatron_minitron.data.demo import held_out_plays, train_plays

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kd-steps", type=int, default=30)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--teacher", default=None, help="SmolLM2 converted already (a rerun in the "
                                                    "same --work: the one the scores are for)")
    ap.add_argument("--latency-seq-length", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3, help="--refine-rounds")
    ap.add_argument("--kd-seeds", default="1234,1,2", help="one KD run per seed (comma list)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    teacher = teacher_checkpoint(args.teacher)
    scores = work / "scores.safetensors"
    if not scores.is_file():
        assert cli(["importance", "--load", str(teacher), "--data", *map(str, train_plays()[:4]),
                    "--samples", "32", "--seq-length", "128", "--depth-samples", "8",
                    "--block-sizes", "1", "6", "--micro-batch-size", "4",
                    "--out", str(scores)]) == 0
    train, valid = ((work / "train", work / "valid") if (work / "train.idx").is_file() else
                    kd_data(teacher, work, train_files=8))

    def held_out(ckpt: Path) -> float:
        out = ckpt.with_suffix(".eval.json")
        assert cli(["eval", "--load", str(ckpt), "--data", str(held_out_plays()[0]),
                    "--seq-length", "256", "--max-windows", "8", "--micro-batch-size", "4",
                    "--out", str(out)]) == 0
        return json.loads(out.read_text())["loss"]

    def prune(name: str, flags: list[str]) -> dict:
        out, record = work / name, work / f"{name}.json"
        if not out.is_dir():
            assert cli(["prune", "--load", str(teacher), "--scores", str(scores),
                        "--out", str(out), "--json", str(record), *flags]) == 0
        return json.loads(record.read_text())

    def distill(name: str, seed: int) -> Path:
        save = work / f"{name}-kd{args.kd_steps}-seed{seed}"
        if (save / "latest").is_file():  # a rerun: the distilled student is there
            return save / (save / "latest").read_text().strip()
        assert cli(["distill", "--teacher", str(teacher), "--student", str(work / name),
                    "--data", str(train), "--valid-data", str(valid), "--save", str(save),
                    "--train-iters",
                    str(args.kd_steps), "--global-batch-size", "4", "--seq-length", "128",
                    "--lr", "3e-4", "--min-lr", "3e-5", "--eval-iters", "0",
                    "--save-interval", str(args.kd_steps), "--seed", str(seed)]) == 0
        return max(save.glob("iter_*"))

    homo = prune("homogeneous", HOMOGENEOUS)
    won = homo["model"]
    dropped = sorted(set(range(homo["source"]["num_layers"])) - set(homo["kept_layers"]))
    het = prune("heterogeneous", [
        "--target-hidden", str(won["hidden_size"]), "--target-heads",
        str(won["num_attention_heads"]), "--target-groups", str(won["num_query_groups"]),
        "--heterogeneous", "--target-params", str(homo["parameters"][1]),
        "--target-ffn", str(won["ffn_hidden_size"]), "--refine-rounds", str(args.rounds),
        *(["--drop-layers", ",".join(map(str, dropped))] if dropped else [])])
    seeds = [int(s) for s in args.kd_seeds.split(",")]
    rows, kd = [], {}
    for name, record in (("homogeneous (auto)", homo), ("heterogeneous", het)):
        ckpt = work / name.split()[0]
        kd[name] = [held_out(distill(ckpt.name, seed)) for seed in seeds]
        rows.append((name, record["parameters"][1], held_out(ckpt), kd[name]))
    print(f"\nSmolLM2-135M, held-out loss (teacher {held_out(teacher):.3f}); "
          f"KD {args.kd_steps} steps x 4 x 128 tokens, seeds {seeds}")
    print("| student | parameters | after pruning | after KD, per seed | after KD, mean |\n"
          "|---|---|---|---|---|")
    for name, params, pruned, losses in rows:
        print(f"| {name} | {params / 1e6:.2f}M | {pruned:.3f} | "
              f"{', '.join(f'{x:.3f}' for x in losses)} | {sum(losses) / len(losses):.3f} |")
    diffs = [h - o for h, o in zip(*kd.values(), strict=True)]  # homogeneous - heterogeneous
    print(f"after KD, homogeneous minus heterogeneous per seed: "
          f"{', '.join(f'{d:+.3f}' for d in diffs)}: heterogeneous "
          + ("better on every seed" if min(diffs) > 0 else "worse on every seed"
             if max(diffs) < 0 else "better on some seeds, worse on others (within the spread)"))
    m = het["model"]
    print("\nheterogeneous per layer (source layers "
          f"{het['kept_layers']}):\n  MLP width {m['layer_ffn']}\n  attention "
          f"{[int(a) for a in m['layer_attention']]}")
    print(f"  {het['notes'][-1]}")
    for r, step in enumerate(het["heterogeneous"]["rounds"]):
        print(f"  round {r}: calibration loss {step['loss']:.4f}, proposals tried "
              + ", ".join(f"{t['changed']} layers changed -> {t['loss']:.4f}"
                          for t in step["tried"]))
    latency_table(homo, het, args.latency_seq_length)


def latency_table(homo: dict, het: dict, seq: int) -> None:
    """The table prune --target-latency would use here (batch 1 x `seq` tokens), and each
    student's layers summed from it."""
    from megatron_minitron.config import ModelConfig, ParallelConfig
    from megatron_minitron.prune.heterogeneous import Variant, measure_latency, variant_latency
    from megatron_minitron.runtime import init_runtime

    init_runtime(ParallelConfig())  # each CLI call above tore its own down
    base = ModelConfig.from_dict(het["model"])
    widths = sorted({*base.layer_ffn, homo["model"]["ffn_hidden_size"], 1536} - {0})
    table = measure_latency(base, widths, ParallelConfig(), 1, seq)
    print(f"\nlatency table, batch 1 x {seq} tokens, this machine (ms, median of 5):")
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in table.items()))
    h = ModelConfig.from_dict(homo["model"])
    for name, m in (("homogeneous", h), ("heterogeneous", base)):
        total = sum(variant_latency(table, Variant(m.ffn_of(i), m.attention_of(i)))
                    for i in range(m.num_layers))
        print(f"  {name}: layers sum to {total:.1f} ms")


if __name__ == "__main__":
    main()
