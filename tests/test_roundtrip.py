"""Conversion round trips and resharding on small models written by `transformers` itself."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_minitron.checkpoint.layout import MOE_HF
from megatron_minitron.checkpoint.mcore import COMMON_FILE, common_file_optional
from megatron_minitron.cli import main
from tests.conftest import (
    ROOT,
    fails,
    hf_logits,
    in_process_logits,
    run_cli,
    tiny_hf_dir,
    torchrun_logits,
    torchrun_logits_of,
)


def test_hf_mcore_hf_is_bit_exact_and_loads_in_transformers(tiny_llama_hf, tiny_llama_ckpt,
                                                            tiny_tokens, tmp_path):
    out = tmp_path / "hf_out"
    run_cli("convert", str(tiny_llama_ckpt), str(out), "--to", "hf")
    src, back = load_file(str(tiny_llama_hf / "model.safetensors")), load_file(
        str(out / "model.safetensors"))
    assert set(src) == set(back)
    for k in src:
        assert torch.equal(src[k], back[k]), k
    assert torch.equal(hf_logits(out, tiny_tokens), hf_logits(tiny_llama_hf, tiny_tokens))


@pytest.mark.parametrize("family,tie,rope_scaling", [
    ("llama", False, None), ("llama", True, None), ("llama", False, 8.0),
    ("nemotron", False, None), ("mistral", False, None), ("qwen2", True, None),
    ("qwen3", False, None), ("gemma3", True, None), ("mixtral", False, None),
    ("qwen3_moe", True, None), ("qwen2_moe", False, None)])
def test_family_logits_match_transformers(family, tie, rope_scaling, tmp_path, tiny_tokens):
    from transformers import AutoModelForCausalLM

    from megatron_minitron.config import ModelConfig

    hf = tiny_hf_dir(tmp_path / "hf", family, tie, seed=1, rope_scaling=rope_scaling)
    ckpt = tmp_path / "mcore"
    assert main(["convert", str(hf), str(ckpt)]) == 0
    meta = json.loads((ckpt / "minitron.json").read_text())
    assert meta["model"]["family"] == family and meta["model"]["tie_embeddings"] == tie
    assert meta["model"]["rope_scaling_factor"] == rope_scaling
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    cfg = ModelConfig.from_dict(meta["model"])
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    # active: the experts' tensors (stacked or one per expert) count for top-k of them
    share = cfg.moe_router_topk / cfg.num_moe_experts if cfg.moe else 1.0
    assert cfg.num_parameters(active=True) == sum(
        p.numel() * (share if ".experts." in n else 1) for n, p in model.named_parameters())
    ref = hf_logits(model.eval(), tiny_tokens)
    diff = (in_process_logits(ckpt, tiny_tokens) - ref).abs().max()
    assert diff <= 1e-5, f"{family}: {diff}"
    exported = tmp_path / "hf_export"
    assert main(["convert", str(ckpt), str(exported), "--to", "hf"]) == 0
    assert json.loads((exported / "config.json").read_text())["architectures"] == json.loads(
        (hf / "config.json").read_text())["architectures"]
    back = load_file(str(exported / "model.safetensors"))
    for k, v in load_file(str(hf / "model.safetensors")).items():
        assert torch.equal(back[k], v), k
    assert torch.equal(hf_logits(exported, tiny_tokens), ref)


def test_mistral_sliding_window_is_honoured(tmp_path, tiny_tokens):
    """A window of 8 on 32-token sequences: the logits match transformers' windowed ones, which
    differ from full attention's."""
    hf = tiny_hf_dir(tmp_path / "hf", "mistral", seed=2, sliding_window=8)
    full = tiny_hf_dir(tmp_path / "full", "mistral", seed=2)
    assert main(["convert", str(hf), str(tmp_path / "mcore")]) == 0
    ref = hf_logits(hf, tiny_tokens)
    assert (ref - hf_logits(full, tiny_tokens)).abs().max() > 1e-2
    assert (in_process_logits(tmp_path / "mcore", tiny_tokens) - ref).abs().max() <= 1e-5


def test_moe_routing_without_renormalised_weights_matches(tmp_path, tiny_tokens):
    """Qwen3-MoE with norm_topk_prob off weighs experts by their softmax over all experts (the
    logits differ from renormalised routing). A layer and an expert pruned from it export under
    Qwen3-MoE's names to a model transformers loads with the same logits."""
    from megatron_minitron.data.demo import train_plays

    hf = tiny_hf_dir(tmp_path / "hf", "qwen3_moe", seed=4, norm_topk_prob=False)
    renormalised = tiny_hf_dir(tmp_path / "renorm", "qwen3_moe", seed=4)
    assert main(["convert", str(hf), str(tmp_path / "mcore")]) == 0
    ref = hf_logits(hf, tiny_tokens)
    assert (ref - hf_logits(renormalised, tiny_tokens)).abs().max() > 1e-3
    assert (in_process_logits(tmp_path / "mcore", tiny_tokens) - ref).abs().max() <= 1e-5
    assert main(["convert", str(tmp_path / "mcore"), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["norm_topk_prob"] is False
    scores = tmp_path / "s.safetensors"
    assert main(["importance", "--load", str(tmp_path / "mcore"), "--data",
                 str(train_plays()[1]), "--samples", "2", "--seq-length", "32",
                 "--depth-samples", "0", "--out", str(scores)]) == 0
    assert main(["prune", "--load", str(tmp_path / "mcore"), "--scores", str(scores),
                 "--drop-layers", "1", "--target-experts", "3", "--out", str(tmp_path / "p"),
                 "--hf-out", str(tmp_path / "p_hf")]) == 0
    assert json.loads((tmp_path / "p_hf" / "config.json").read_text())["num_experts"] == 3
    ours = in_process_logits(tmp_path / "p", tiny_tokens)
    assert (hf_logits(tmp_path / "p_hf", tiny_tokens) - ours).abs().max() <= 1e-5


def test_moe_expert_parallel_import_load_and_export(tmp_path, tiny_tokens, tiny_llama_ckpt,
                                                    capsys):
    """Mixtral at EP=2 under torchrun: a checkpoint written at EP=1 gives transformers' logits at
    EP=2; one imported at EP=2 (each rank reads its own experts) loads at EP=1; an export at EP=2
    is the source tensor for tensor (each rank writes its own experts' files). Expert counts EP
    does not divide, and EP on a dense model, are refused in one line."""
    hf = tiny_hf_dir(tmp_path / "hf", "mixtral", seed=5)
    ref = hf_logits(hf, tiny_tokens)
    run_cli("convert", str(hf), str(tmp_path / "ep1"))
    ours = torchrun_logits(tmp_path / "ep1", tiny_tokens, tmp_path, 2, "--ep", "2")
    assert (ours - ref).abs().max() <= 1e-5
    run_cli("convert", str(hf), str(tmp_path / "ep2"), "--ep", "2", nproc=2)
    assert (in_process_logits(tmp_path / "ep2", tiny_tokens) - ref).abs().max() <= 1e-5
    run_cli("convert", str(tmp_path / "ep2"), str(tmp_path / "hf_ep2"), "--to", "hf", "--ep", "2",
            "--max-shard-size", "40kB", nproc=2)
    files = sorted((tmp_path / "hf_ep2").glob("model-*.safetensors"))
    back = {k: v for f in files for k, v in load_file(str(f)).items()}
    src = load_file(str(hf / "model.safetensors"))
    assert len(files) > 2 and back.keys() == src.keys()
    for k in src:
        assert torch.equal(back[k], src[k]), k
    capsys.readouterr()
    fails(capsys, ["convert", str(hf), str(tmp_path / "x"), "--ep", "3"],
          "expert parallel size 3 does not divide num_moe_experts=4")
    fails(capsys, ["eval", "--load", str(tiny_llama_ckpt), "--ep", "2"],
          "needs a mixture-of-experts model")


def test_every_family_at_tp2_sp_pp2_and_ep2_matches_transformers(tmp_path, tiny_tokens):
    """Every family but Llama (tested on its own and on SmolLM2) at TP2+SP and PP2: Mistral's
    head_dim, Qwen2's TP-split QKV biases, Nemotron's LayerNorm1P and partial RoPE, q/k norms,
    Gemma's post-norms and sliding layers, MoE routers, experts and the shared expert split over
    TP; the MoE families at EP2 too. One torchrun launch per layout loads every family."""
    families = ["mistral", "qwen2", "nemotron", "qwen3", "gemma3", "mixtral", "qwen3_moe",
                "qwen2_moe"]
    ckpts, refs = {}, {}
    for family in families:
        hf = tiny_hf_dir(tmp_path / family / "hf", family, seed=3)
        ckpts[family] = tmp_path / family / "mcore"
        assert main(["convert", str(hf), str(ckpts[family])]) == 0
        refs[family] = hf_logits(hf, tiny_tokens)
    layouts = [(("--tp", "2", "--sequence-parallel", "--micro-batch-size", "2"), families),
               (("--pp", "2"), families), (("--ep", "2"), [f for f in families if f in MOE_HF])]
    for layout, group in layouts:
        outs = torchrun_logits_of([ckpts[f] for f in group], tiny_tokens, tmp_path, 2, *layout)
        errors = {f: (out - refs[f]).abs().max().item() for f, out in zip(group, outs, strict=True)}
        assert max(errors.values()) <= 1e-5, f"{' '.join(layout)}: {errors}"


def test_export_under_torchrun_streams_shards_with_an_index(tiny_llama_hf, tiny_llama_ckpt,
                                                          tiny_tokens, tmp_path):
    """TP2 and PP2 exports, cut into files of at most 40 kB, are the source HF model tensor for
    tensor, with transformers' index, and transformers loads them."""
    src = load_file(str(tiny_llama_hf / "model.safetensors"))
    for layout in (("--tp", "2"), ("--pp", "2")):
        out = tmp_path / f"hf{'_'.join(layout)}"
        run_cli("convert", str(tiny_llama_ckpt), str(out), "--to", "hf",
                "--max-shard-size", "40kB", *layout, nproc=2)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(out.glob("model-*.safetensors"))
        assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
        back = {k: v for f in files for k, v in load_file(str(f)).items()}
        assert back.keys() == src.keys() == index["weight_map"].keys()
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in src.values())
        assert all(f.stat().st_size <= 40_000 + 2_000 or len(load_file(str(f))) == 1
                   for f in files)
        for k in src:
            assert torch.equal(back[k], src[k]), (layout, k)
        assert torch.equal(hf_logits(out, tiny_tokens), hf_logits(tiny_llama_hf, tiny_tokens))


def test_tp2_sequence_parallel_logits_match_transformers(tiny_llama_hf, tiny_llama_ckpt,
                                                         tiny_tokens, tmp_path):
    ours = torchrun_logits(tiny_llama_ckpt, tiny_tokens, tmp_path, 2, "--tp", "2",
                           "--sequence-parallel", "--micro-batch-size", "2")
    assert (ours - hf_logits(tiny_llama_hf, tiny_tokens)).abs().max() <= 1e-5


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(tiny_llama_ckpt, tiny_tokens, tmp_path):
    tp2 = tmp_path / "saved_at_tp2"
    run_cli("convert", str(tiny_llama_ckpt), str(tp2), "--tp", "2", "--sequence-parallel",
            nproc=2)
    assert "resharded at tp=2" in (tp2 / "minitron.json").read_text()
    original = in_process_logits(tiny_llama_ckpt, tiny_tokens)
    assert torch.equal(in_process_logits(tp2, tiny_tokens), original)
    assert torch.equal(torchrun_logits(tp2, tiny_tokens, tmp_path, 2, "--pp", "2"), original)


def test_virtual_pipeline_logits_match(tiny_llama_hf, tiny_llama_ckpt, tiny_tokens, tmp_path):
    ours = torchrun_logits(tiny_llama_ckpt, tiny_tokens, tmp_path, 2, "--pp", "2", "--vpp", "2")
    assert (ours - hf_logits(tiny_llama_hf, tiny_tokens)).abs().max() <= 1e-5


def test_a_checkpoint_written_by_megatron_core_0_15_loads(tiny_llama_ckpt, tiny_tokens, tmp_path):
    """megatron-core 0.15 pickles its own MCoreMetadata (with MCoreSavePlan entries) into the
    dist checkpoint's .metadata; the safe metadata reader accepts those data-only classes, by
    the names later releases keep for them, and the weights load unchanged."""
    import pickle
    import shutil

    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    old = tmp_path / "written_by_0_15"
    shutil.copytree(tiny_llama_ckpt, old)
    path = old / "weights" / ".metadata"
    with path.open("rb") as f:
        plain = pickle.load(f)  # noqa: S301 - the suite's own checkpoint
    as_015 = object.__new__(mcore_torch.MCoreMetadata)  # 0.15's takes fields; 0.16's none
    as_015.__dict__.update(vars(plain))
    plan = object.__new__(mcore_torch.MCoreSavePlan)
    plan.__dict__.update(items=[], storage_data=None, planner_data=None, usable=True)
    as_015.all_local_plans = [plan]
    with path.open("wb") as f:
        pickle.dump(as_015, f)
    assert b"MCoreMetadata" in path.read_bytes()
    assert torch.equal(in_process_logits(old, tiny_tokens),
                       in_process_logits(tiny_llama_ckpt, tiny_tokens))


def _weights(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, loaded in this process at TP=1 in its stored dtype."""
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import load_model

    _, _, chunks = load_model(ckpt, ParallelConfig(), keep_dtype=True)
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if "_extra_state" not in k}


WRITTEN_BY_0_19 = ROOT / "tests" / "assets" / "written_by_mcore_0_19_2"


def test_a_checkpoint_written_by_megatron_core_0_19_loads(tmp_path):
    """megatron-core 0.19 writes no common.pt (releases up to 0.18 require it) and keeps the
    common state as a `common_state` object instead. A checkpoint it wrote (tests/assets: a
    one-layer Llama converted from `hf/` beside it, under `make test-mcore-source`) loads here
    equal to the same model converted by this release."""
    assert not (WRITTEN_BY_0_19 / "ckpt" / "weights" / COMMON_FILE).exists()
    run_cli("convert", str(WRITTEN_BY_0_19 / "hf"), str(tmp_path / "here"))
    old, here = _weights(WRITTEN_BY_0_19 / "ckpt"), _weights(tmp_path / "here")
    assert old.keys() == here.keys()
    assert all(torch.equal(old[k], here[k]) for k in here)


def test_the_common_file_adapter_follows_each_release_signature(tmp_path):
    """Up to 0.18 `dist_checkpointing.load` takes a common strategy and needs common.pt; 0.19's
    takes none. The adapter passes one only where the file is missing and the release takes it."""
    def load_0_16(sharded_state_dict, checkpoint_dir, sharded_strategy=None,
                  common_strategy=None, validate_access_integrity=True, strict="assume_ok"):
        pass

    def load_0_19(sharded_state_dict, checkpoint_dir, sharded_strategy=None,
                  validate_access_integrity=True, strict="assume_ok", verify_integrity=False,
                  process_group=None):
        pass

    assert common_file_optional(load_0_19, tmp_path) == {}
    strategy = common_file_optional(load_0_16, tmp_path)["common_strategy"]
    assert strategy.load_common(tmp_path) == {}
    (tmp_path / COMMON_FILE).write_bytes(b"")
    assert common_file_optional(load_0_16, tmp_path) == {}


def test_import_under_torchrun_streams_the_one_process_checkpoint(tmp_path):
    """A bf16 model (QKV biases, SwiGLU, GQA, tied embeddings) imported by 2 ranks at TP2 and
    at PP2, each rank reading only its slices, is the 1-process checkpoint tensor for tensor,
    and stays bf16."""
    hf = tiny_hf_dir(tmp_path / "hf", "qwen2", tie=True, seed=4)
    sd = load_file(str(hf / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in sd.items()}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    run_cli("convert", str(hf), str(tmp_path / "one"))
    one = _weights(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "minitron.json").read_text())["params_dtype"] == \
        "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in one.values())
    for layout in (("--tp", "2"), ("--pp", "2")):
        out = tmp_path / f"two{'_'.join(layout)}"
        run_cli("convert", str(hf), str(out), *layout, nproc=2)
        two = _weights(out)
        assert two.keys() == one.keys()
        for k in one:
            assert torch.equal(two[k], one[k]), (layout, k)


def test_gguf_parts_are_slices_of_the_dequantized_tensor(smol_gguf):
    from megatron_minitron.checkpoint.sources import open_source

    src = open_source(smol_gguf, "gguf")
    for name, dim in (("model.layers.0.self_attn.k_proj.weight", 0),
                      ("model.layers.0.mlp.down_proj.weight", 1)):
        whole = src.read(name)
        assert tuple(whole.shape) == src.shapes[name]
        parts = [src.read(name, dim, 3, i) for i in range(3)]
        assert torch.equal(torch.cat(parts, dim), whole)
