"""`minitron eval` on held-out Shakespeare agrees with transformers' perplexity."""

import json
import math

import torch

from megatron_minitron.cli import main
from megatron_minitron.data.demo import held_out_plays
from megatron_minitron.data.tokenizer import load_tokenizer
from megatron_minitron.evaluate.perplexity import token_windows

SEQ, WINDOWS = 256, 6


def _transformers_perplexity(model, ckpt) -> float:
    text = "\n\n".join(p.read_text() for p in held_out_plays())
    windows = token_windows(load_tokenizer(ckpt).encode(text), SEQ, WINDOWS)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None, :-1]).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
            n += SEQ
    return math.exp(nll / n)


def test_eval_perplexity_matches_transformers(smol_ckpt, smol_hf_model, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--load", str(smol_ckpt), "--seq-length", str(SEQ), "--max-windows",
                 str(WINDOWS), "--micro-batch-size", "2", "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    ref = _transformers_perplexity(smol_hf_model, smol_ckpt)
    print(f"held-out perplexity: minitron {ours['perplexity']:.4f}, transformers {ref:.4f}")
    assert ours["tokens"] == SEQ * WINDOWS
    assert abs(ours["perplexity"] - ref) / ref < 0.005
