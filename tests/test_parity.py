"""SmolLM2-135M (real weights, real text): GGUF -> Megatron gives transformers' logits, at TP=1,
TP=3 with sequence parallelism (9 heads / 3 groups admit TP 1 or 3, not 2) and PP=2."""

import pytest
import torch

from tests.conftest import hf_logits, in_process_logits, torchrun_logits

TOL = 1e-3  # fp32, logits of magnitude ~40; measured ~7e-5


@pytest.fixture(scope="module")
def reference(smol_hf_model, shakespeare_tokens):
    return hf_logits(smol_hf_model, shakespeare_tokens)


def test_tokenizer_matches_transformers_gguf_tokenizer(smol_gguf, smol_ckpt):
    from transformers import AutoTokenizer

    from megatron_minitron.data.demo import held_out_plays
    from megatron_minitron.data.tokenizer import load_tokenizer

    text = held_out_plays()[1].read_text()[:20000] + " 12345 ünïcödé\n\t<|im_end|>"
    ref = AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)
    ours = load_tokenizer(smol_ckpt)
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(text)) == text


def test_tp1_logits_match_transformers(smol_ckpt, shakespeare_tokens, reference):
    ours = in_process_logits(smol_ckpt, shakespeare_tokens)
    diff = (ours - reference).abs().max().item()
    print(f"SmolLM2 TP=1 vs transformers: max |dlogit| = {diff:.2e}")
    assert diff <= TOL


def test_tp3_sequence_parallel_logits_match(smol_ckpt, shakespeare_tokens, reference, tmp_path):
    ours = torchrun_logits(smol_ckpt, shakespeare_tokens, tmp_path, 3, "--tp", "3",
                           "--sequence-parallel", "--micro-batch-size", "2")
    diff = (ours - reference).abs().max().item()
    print(f"SmolLM2 TP=3+SP vs transformers: max |dlogit| = {diff:.2e}")
    assert diff <= TOL


def test_pp2_logits_match(smol_ckpt, shakespeare_tokens, reference, tmp_path):
    ours = torchrun_logits(smol_ckpt, shakespeare_tokens, tmp_path, 2, "--pp", "2")
    diff = (ours - reference).abs().max().item()
    print(f"SmolLM2 PP=2 vs transformers: max |dlogit| = {diff:.2e}")
    assert diff <= TOL
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
