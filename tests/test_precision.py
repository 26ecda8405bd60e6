"""Precision and checkpoint interchange: bf16 runs end to end (CPU does bf16), weight rewrites keep
the stored dtype bit for bit, and checkpoints move between Transformer Engine and local-spec
models whichever side carries `_extra_state`."""

from __future__ import annotations

import json

import torch

from megatron_minitron.checkpoint import mcore
from tests.conftest import converted, load_in_process, run_cli, tiny_hf_dir


def _eval_loss(ckpt, *flags) -> float:
    from megatron_minitron.data.demo import held_out_plays

    out = run_cli("eval", "--load", str(ckpt), "--data", str(held_out_plays()[0]),
                  "--seq-length", "32", "--max-windows", "8", *flags).stdout
    return float(out.split("loss ")[1].split()[0])


def test_bf16_eval_and_distillation(tiny_llama_ckpt, tmp_path):
    from megatron_minitron.data.demo import held_out_plays, train_plays

    fp32, bf16 = _eval_loss(tiny_llama_ckpt), _eval_loss(tiny_llama_ckpt, "--bf16")
    assert fp32 != bf16 and abs(fp32 - bf16) < 0.05, (fp32, bf16)
    for name, play in (("train", train_plays()[0]), ("valid", held_out_plays()[1])):
        run_cli("preprocess", "--input", str(play), "--tokenizer", str(tiny_llama_ckpt),
                "--output-prefix", str(tmp_path / name))
    run_cli("distill", "--teacher", str(tiny_llama_ckpt), "--student", str(tiny_llama_ckpt),
            "--data", str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid"),
            "--save", str(tmp_path / "run"), "--train-iters", "2", "--global-batch-size", "2",
            "--seq-length", "32", "--lm-weight", "0.5", "--eval-iters", "1", "--bf16")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    out = tmp_path / "run" / (tmp_path / "run" / "latest").read_text().strip()
    assert mcore.read_meta(out).params_dtype == "bfloat16"
    assert abs(_eval_loss(out) - fp32) < 1.0  # the bf16 student loads and runs in fp32


def test_weight_rewrites_keep_bf16_exactly(tmp_path):
    """Nemotron's zero-centred gamma: `(w + 1) * 1 - 1` in bf16 would round it; prune and
    reshard keep every stored bit when nothing is rescaled."""
    hf = tiny_hf_dir(tmp_path / "hf", "nemotron", seed=5)
    run_cli("convert", str(hf), str(tmp_path / "bf16"), "--bf16")
    assert mcore.read_meta(tmp_path / "bf16").params_dtype == "bfloat16"
    run_cli("prune", "--load", str(tmp_path / "bf16"), "--out", str(tmp_path / "pruned"),
            "--drop-layers", "1")
    assert mcore.read_meta(tmp_path / "pruned").params_dtype == "bfloat16"
    src = load_in_process(tmp_path / "bf16")[1][0].state_dict()
    new = load_in_process(tmp_path / "pruned")[1][0].state_dict()
    kept = [0, 2, 3]  # layer 1 of 4 dropped
    norms = [k for k in new if "norm" in k and "_extra_state" not in k]
    assert len(norms) >= 6
    rounded = 0
    for k in norms:
        old = k
        if k.startswith("decoder.layers."):
            i = int(k.split(".")[2])
            old = k.replace(f"layers.{i}.", f"layers.{kept[i]}.", 1)
        assert torch.equal(new[k], src[old]), k
        w = src[old].bfloat16()
        rounded += int(not torch.equal((w + 1) - 1, w))
    assert rounded, "the test must see values that bf16 arithmetic would round"


class _TENormLike(torch.nn.Module):
    """Stands in for a Transformer Engine norm: carries `_extra_state` in its state dict."""

    def get_extra_state(self):
        return {"fp8_meta": None}

    def set_extra_state(self, state) -> None:
        pass


def _with_extra_state(chunk) -> None:
    from megatron_minitron.model.norm import MinitronNorm

    norm = chunk.decoder.final_layernorm
    norm.__class__ = type("TENorm", (MinitronNorm, _TENormLike), {})


def test_te_and_local_checkpoints_interchange(tiny_llama_ckpt, tiny_tokens, tmp_path):
    from megatron_minitron.config import CheckpointMeta
    from megatron_minitron.model.forward import logits

    model, chunks = load_in_process(tiny_llama_ckpt)
    ref = logits(chunks, tiny_tokens)
    _with_extra_state(chunks[0])
    assert any("_extra_state" in k for k in chunks[0].state_dict())
    meta = mcore.read_meta(tiny_llama_ckpt)
    te_style = tmp_path / "te_style"
    mcore.save_checkpoint(chunks, CheckpointMeta(model=model, tokenizer=meta.tokenizer),
                          te_style, mcore.tokenizer_files(tiny_llama_ckpt))
    # TE-written -> local spec: the extra entry is ignored.
    assert torch.equal(logits(load_in_process(te_style)[1], tiny_tokens), ref)
    # local-written -> a TE-like model: the missing extra entry is accepted.
    _, plain = load_in_process(tiny_llama_ckpt)
    _with_extra_state(plain[0])
    mcore.load_checkpoint(plain, tiny_llama_ckpt)
    assert torch.equal(logits(plain, tiny_tokens), ref)


def test_other_mismatches_still_fail(tiny_llama_ckpt, tmp_path):
    """Only `_extra_state` may be missing: a checkpoint of another shape is refused, named."""
    import pytest

    from megatron_minitron.config import ConfigError

    other = converted(tiny_hf_dir(tmp_path / "hf", "nemotron", seed=1), tmp_path / "nemotron")
    _, chunks = load_in_process(tiny_llama_ckpt)
    with pytest.raises(ConfigError, match="weights"):
        mcore.load_checkpoint(chunks, other)


def test_moe_router_runs_in_fp32_in_a_bf16_model(tmp_path, tiny_tokens):
    """Top-k is chosen from fp32 logits in a bf16 model: bf16's 8-bit mantissa ties and flips
    close choices, so routing would differ from the fp32 model's for no reason."""
    from megatron_minitron.checkpoint.convert import import_weights
    from megatron_minitron.checkpoint.sources import open_source
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import logits
    from megatron_minitron.runtime import init_runtime

    source = open_source(tiny_hf_dir(tmp_path / "hf", "mixtral", seed=8), "hf")
    init_runtime(ParallelConfig())
    chunks = build_model(source.config, ParallelConfig(), torch.bfloat16)
    import_weights(chunks, source, te=False)
    seen = []
    for layer in chunks[0].decoder.layers:
        gating = layer.mlp.router.gating
        layer.mlp.router.gating = lambda x, gating=gating: seen.append(gating(x)) or seen[-1]
    logits(chunks, tiny_tokens, 2)
    assert next(chunks[0].parameters()).dtype == torch.bfloat16
    assert len(seen) == 4 and {t.dtype for t in seen} == {torch.float32}
