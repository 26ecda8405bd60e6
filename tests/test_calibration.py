"""Calibration data: text, JSONL and Megatron indexed datasets give the same samples; sampling is
deterministic per seed."""

import json

import torch

from megatron_minitron.data.calibration import sample_windows, token_stream
from megatron_minitron.data.tokenizer import load_tokenizer
from tests.test_errors import _indexed


def test_text_jsonl_and_indexed_dataset_agree(tiny_llama_ckpt, tmp_path):
    from megatron_minitron.data.demo import held_out_plays

    tok = load_tokenizer(tiny_llama_ckpt)
    texts = [p.read_text()[:3000] for p in held_out_plays()]
    txt = []
    for i, t in enumerate(texts):
        txt.append(tmp_path / f"{i}.txt")
        txt[-1].write_text(t)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    prefix = _indexed(tmp_path / "docs", [tok.encode(t) for t in texts])

    streams = [token_stream(txt, tok, 128), token_stream([jsonl], tok, 128, json_key="content"),
               token_stream([prefix], tok, 128), token_stream([f"{prefix}.bin"], tok, 128)]
    for s in streams[1:]:
        assert torch.equal(s, streams[0])
    assert (streams[0] == tok.eos_id).sum() == len(texts)  # documents end with EOS

    a = sample_windows(streams[0], 8, 32, seed=3)
    assert a.shape == (8, 33)
    assert torch.equal(a, sample_windows(streams[0], 8, 32, seed=3))
    assert not torch.equal(a, sample_windows(streams[0], 8, 32, seed=4))
    # windows are distinct slices of the stream
    starts = {tuple(w[:4].tolist()) for w in a}
    assert len(starts) == 8
