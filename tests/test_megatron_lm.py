"""Megatron-LM and Megatron-Bridge save directories in and out: read where `--load` is, written by
`convert --to megatron-lm|megatron-bridge` and `prune --out-format ...`, hostile args refused."""

import argparse
import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_minitron.checkpoint import megatron_lm
from megatron_minitron.cli import main
from tests.conftest import (
    ROOT,
    fails,
    hf_logits,
    in_process_logits,
    tiny_hf_dir,
    torchrun_logits,
)

# Written by Megatron-LM's own save_checkpoint (core_v0.16.1, on CPU, iteration 3 with Adam's
# state): tests/assets/megatron_lm/make_fixture.py; its SOURCE.md says how.
SAVED_BY_MEGATRON_LM = ROOT / "tests" / "assets" / "megatron_lm" / "llama_tiny"
# Written by megatron-bridge 0.3.1's save_megatron_model on CPU: tests/assets/megatron_bridge/.
SAVED_BY_BRIDGE = ROOT / "tests" / "assets" / "megatron_bridge" / "llama_tiny"


def _weights(ckpt) -> dict[str, torch.Tensor]:
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import load_model

    _, _, chunks = load_model(ckpt, ParallelConfig(), keep_dtype=True)
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if "_extra_state" not in k}


def test_a_checkpoint_megatron_lm_saved_loads_with_megatron_lms_own_logits(tmp_path):
    """Read where it lies (the tracker's iteration; Adam's state beside the model ignored): the
    logits are those Megatron-LM computed before saving, the padded vocabulary (250 -> 256)
    included; exported, transformers gives them too; written back as Megatron-LM it is the same
    tensors, and loads at PP2."""
    from megatron_minitron.checkpoint import mcore

    ref = load_file(str(SAVED_BY_MEGATRON_LM / "reference.safetensors"))
    meta = mcore.read_meta(SAVED_BY_MEGATRON_LM)
    assert (meta.model.family, meta.model.vocab_size, meta.model.num_query_groups) == \
        ("llama", 256, 2)
    assert (in_process_logits(SAVED_BY_MEGATRON_LM, ref["tokens"]) - ref["logits"]).abs().max() \
        <= 1e-5
    hf_out, lm = tmp_path / "hf", tmp_path / "megatron_lm"
    assert main(["convert", str(SAVED_BY_MEGATRON_LM), str(hf_out), "--to", "hf"]) == 0
    assert (hf_logits(hf_out, ref["tokens"]) - ref["logits"]).abs().max() <= 1e-5
    assert main(["convert", str(SAVED_BY_MEGATRON_LM / "iter_0000003"), str(lm), "--to",
                 "megatron-lm"]) == 0
    original = _weights(SAVED_BY_MEGATRON_LM)
    assert all(torch.equal(v, original[k]) for k, v in _weights(lm).items())
    assert (torchrun_logits(lm, ref["tokens"], tmp_path, 2, "--pp", "2") - ref["logits"]
            ).abs().max() <= 1e-5


def test_a_megatron_lm_checkpoint_without_a_tokenizer_takes_one_given(tiny_llama_hf, tmp_path,
                                                                     capsys):
    """The fixture's args name a NullTokenizer: text commands say so in one line, and `convert
    --tokenizer` carries one along."""
    from megatron_minitron.checkpoint import mcore

    assert mcore.read_meta(SAVED_BY_MEGATRON_LM).tokenizer is None
    fails(capsys, ["eval", "--load", str(SAVED_BY_MEGATRON_LM)], "carries no tokenizer",
          "--tokenizer")
    out = tmp_path / "with_tokenizer"
    assert main(["convert", str(SAVED_BY_MEGATRON_LM), str(out), "--tokenizer",
                 str(tiny_llama_hf / "tokenizer.json")]) == 0
    assert mcore.read_meta(out).tokenizer == "tokenizer.json"
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tiny_llama_hf / "tokenizer.json").read_bytes()


def _to_megatron_lm(tmp_path, family: str, **hf):
    hf_dir = tiny_hf_dir(tmp_path / "hf", family, **hf)
    ckpt, lm = tmp_path / "ckpt", tmp_path / "megatron_lm"
    assert main(["convert", str(hf_dir), str(ckpt)]) == 0
    assert main(["convert", str(ckpt), str(lm), "--to", "megatron-lm"]) == 0
    return hf_dir, ckpt, lm


@pytest.mark.parametrize("family,tie", [("qwen2", True), ("nemotron", False),
                                        ("mistral", False), ("qwen2_moe", False),
                                        ("qwen3_moe", True)])
def test_written_megatron_lm_directory_reads_back_equal(family, tie, tmp_path, tiny_tokens):
    """The args we write describe the model exactly: read back, the config, every tensor and
    the logits (against transformers) are the original's; converted back it is the same
    checkpoint."""
    from megatron_minitron.checkpoint import mcore

    hf_dir, ckpt, lm = _to_megatron_lm(tmp_path, family, tie=tie)
    assert (lm / megatron_lm.TRACKER).read_text() == "release"
    common = megatron_lm.read_common(lm / "release")
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    expected = mcore.read_meta(ckpt).model
    if family == "mistral" and not expected.sliding_window:  # the same network as Llama's
        expected = dataclasses.replace(expected, family="llama")
    assert mcore.read_meta(lm).model == expected
    assert mcore.read_meta(lm).tokenizer == "tokenizer.json"
    original = _weights(ckpt)
    assert set(_weights(lm)) == set(original)
    assert all(torch.equal(v, original[k]) for k, v in _weights(lm).items())
    assert (in_process_logits(lm, tiny_tokens) - hf_logits(hf_dir, tiny_tokens)).abs().max() \
        <= 1e-5
    back = tmp_path / "back"
    assert main(["convert", str(lm), str(back)]) == 0
    assert all(torch.equal(v, original[k]) for k, v in _weights(back).items())


def test_megatron_lm_directory_loads_at_pp2_and_tp2_with_sequence_parallel(tiny_llama_hf,
                                                                          tiny_llama_ckpt,
                                                                          tiny_tokens, tmp_path):
    lm = tmp_path / "megatron_lm"
    assert main(["convert", str(tiny_llama_ckpt), str(lm), "--to", "megatron-lm"]) == 0
    ref = hf_logits(tiny_llama_hf, tiny_tokens)
    for flags in (("--pp", "2"), ("--tp", "2", "--sequence-parallel")):
        assert (torchrun_logits(lm, tiny_tokens, tmp_path, 2, *flags) - ref).abs().max() <= 1e-5


def test_prune_writes_megatron_lm_equal_to_its_own_format(tiny_llama_ckpt, tiny_tokens,
                                                          tmp_path):
    lm, ours = tmp_path / "pruned_lm", tmp_path / "pruned"
    for out, fmt in ((lm, "megatron-lm"), (ours, "minitron")):
        assert main(["prune", "--load", str(tiny_llama_ckpt), "--drop-layers", "1",
                     "--out", str(out), "--out-format", fmt]) == 0
    assert megatron_lm.is_megatron_lm_dir(lm)
    assert vars(megatron_lm.read_common(lm / "release")["args"])["num_layers"] == 3
    assert torch.equal(in_process_logits(lm, tiny_tokens), in_process_logits(ours, tiny_tokens))


def _rewrite_args(it, **changes) -> None:
    common = megatron_lm.read_common(it)
    for k, v in changes.items():
        setattr(common["args"], k, v)
    torch.save(common, it / megatron_lm.COMMON_FILE)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_or_unmappable_args_are_refused_in_one_line(tiny_llama_ckpt, tmp_path, capsys):
    lm = tmp_path / "megatron_lm"
    assert main(["convert", str(tiny_llama_ckpt), str(lm), "--to", "megatron-lm"]) == 0
    capsys.readouterr()
    it = lm / "release"
    marker = tmp_path / "payload_ran"
    common = megatron_lm.read_common(it)
    common["args"].payload = _Payload(marker)
    torch.save(common, it / megatron_lm.COMMON_FILE)
    fails(capsys, ["eval", "--load", str(lm)], "common.pt", "system", "not an allowed type")
    assert not marker.exists()
    common["args"] = argparse.Namespace(**{k: v for k, v in vars(common["args"]).items()
                                           if k != "payload"})
    torch.save(common, it / megatron_lm.COMMON_FILE)
    _rewrite_args(it, add_bias_linear=True)
    fails(capsys, ["eval", "--load", str(lm)], "add_bias_linear=True")
    _rewrite_args(it, add_bias_linear=False, position_embedding_type="learned_absolute")
    fails(capsys, ["prune", "--load", str(lm), "--drop-layers", "1", "--out",
                   str(tmp_path / "p")], "position_embedding_type")
    (lm / megatron_lm.TRACKER).write_text("7")
    fails(capsys, ["eval", "--load", str(lm)], "iteration 7", "iter_0000007")


def test_a_family_megatron_lm_cannot_describe_is_refused(tmp_path, capsys):
    hf_dir = tiny_hf_dir(tmp_path / "hf", "gemma3", tie=True)
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    fails(capsys, ["convert", str(tmp_path / "ckpt"), str(tmp_path / "lm"), "--to",
                   "megatron-lm"], "gemma3", "Hugging Face")
    assert not (tmp_path / "lm").exists()


def test_a_checkpoint_megatron_bridge_saved_loads_and_writes_back(tmp_path, capsys):
    """Bridge's run_config.yaml (read, never instantiated) gives the shape, its stored
    embedding the padded vocabulary; the logits are Bridge's own, and ours written back in
    Bridge's layout read back the same tensors and describe the model with the same provider
    fields."""
    import yaml

    from megatron_minitron.checkpoint import mcore, megatron_bridge

    ref = load_file(str(SAVED_BY_BRIDGE / "reference.safetensors"))
    meta = mcore.read_meta(SAVED_BY_BRIDGE)
    assert (meta.model.family, meta.model.vocab_size) == ("llama", 256)
    assert (in_process_logits(SAVED_BY_BRIDGE, ref["tokens"]) - ref["logits"]).abs().max() \
        <= 1e-5
    out = tmp_path / "bridge"
    assert main(["prune", "--load", str(SAVED_BY_BRIDGE), "--drop-layers", "1", "--out",
                 str(out), "--out-format", "megatron-bridge"]) == 0
    assert (out / megatron_lm.TRACKER).read_text() == "0"
    theirs = yaml.safe_load((SAVED_BY_BRIDGE / "iter_0000000" / "run_config.yaml").read_text())
    ours = yaml.safe_load((out / "iter_0000000" / "run_config.yaml").read_text())
    assert ours["model"]["num_layers"] == 1
    for field in ("_target_", "hidden_size", "num_query_groups", "kv_channels", "normalization",
                  "gated_linear_unit", "activation_func", "add_bias_linear",
                  "share_embeddings_and_output_weights", "position_embedding_type"):
        assert ours["model"][field] == theirs["model"][field], field
    assert mcore.read_meta(out).model.num_layers == 1
    pruned_here = tmp_path / "pruned"
    assert main(["prune", "--load", str(SAVED_BY_BRIDGE), "--drop-layers", "1", "--out",
                 str(pruned_here)]) == 0
    assert torch.equal(in_process_logits(out, ref["tokens"]),
                       in_process_logits(pruned_here, ref["tokens"]))
    run = out / "iter_0000000" / megatron_bridge.RUN_CONFIG
    ours["model"]["activation_func"]["_target_"] = "torch.nn.functional.gelu"
    run.write_text(yaml.safe_dump(ours))
    capsys.readouterr()
    fails(capsys, ["eval", "--load", str(out)], "Megatron-Bridge model field activation_func",
          "gelu")
