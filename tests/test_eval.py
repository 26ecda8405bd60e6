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
    assert abs(ours["perplexity"] - ref) / ref < 1e-4  # docs: 38.924 vs 38.924


def test_generate_continues_a_prompt_as_transformers_greedy_does(tiny_llama_hf, tiny_llama_ckpt,
                                                                   tmp_path, capsys):
    """`minitron generate` (the demo's last step), in one process and at PP=2: the greedy
    continuation transformers' `generate` gives for the same weights and tokenizer."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_cli

    prompt = "To be, or not to be, that is"
    tok = load_tokenizer(tiny_llama_ckpt)
    ids = tok.prefix + tok.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    expected = prompt + tok.decode(out[0, len(ids):].tolist())
    assert len(out[0]) > len(ids) and expected != prompt
    args = ["generate", "--load", str(tiny_llama_ckpt), "--prompt", prompt, "--max-new-tokens",
            "12"]
    assert main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    assert run_cli(*args, "--pp", "2", nproc=2).stdout.rstrip("\n") == expected
