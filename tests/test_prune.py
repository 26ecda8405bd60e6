"""Prune: function preservation, the same checkpoint from any source layout, loadable anywhere,
HF export, the real model, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_minitron.cli import main
from megatron_minitron.importance.scores import FORMAT, Scores
from tests.conftest import (
    converted,
    fails,
    hf_logits,
    in_process_logits,
    load_in_process,
    run_cli,
    tiny_hf_dir,
)


def _save_modified(src: Path, dst: Path, modify) -> Path:
    """A copy of checkpoint `src` whose weights `modify(model)` changed in place (new identity)."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.config import CheckpointMeta

    model, chunks = load_in_process(src)
    with torch.no_grad():
        modify(chunks[0])
    meta = mcore.read_meta(src)
    mcore.save_checkpoint(chunks, CheckpointMeta(model=model, tokenizer=meta.tokenizer,
                                                 source="test"), dst, mcore.tokenizer_files(src))
    return dst


def _scores_dropping(ckpt: Path, out: Path, ffn=None, heads=None, hidden=None, layer=None,
                     mamba=None) -> Path:
    """Hand-made scores: 0 for the given units (per layer: neurons, heads, Mamba channels; the
    hidden channels; one layer), 1 for all others."""
    from megatron_minitron.checkpoint import mcore

    meta = mcore.read_meta(ckpt)
    m = meta.model
    widths = {"ln_attn": m.hidden_size, "ln_mlp": m.hidden_size,
              "heads": m.num_attention_heads, "ffn": m.ffn_hidden_size,
              **({"mamba": m.mamba_inner} if m.hybrid else {})}
    t = {f"sums.{a}": torch.ones(m.num_layers, 3, 2, w, dtype=torch.float64)
         for a, w in widths.items()}
    for i in range(m.num_layers):
        if mamba is not None:
            t["sums.mamba"][i, ..., mamba[i]] = 0
        if ffn is not None:
            t["sums.ffn"][i, ..., ffn[i]] = 0
        if heads is not None:
            t["sums.heads"][i, ..., heads[i]] = 0
        if hidden is not None:
            t["sums.ln_attn"][i, ..., hidden] = 0
            t["sums.ln_mlp"][i, ..., hidden] = 0
    skip = torch.ones(m.num_layers, dtype=torch.float64)
    if layer is not None:
        skip[layer] = 0
    t["depth.skip_loss.k1"] = skip
    t["depth.block_influence"] = skip.clone()
    Scores(t, {"format": FORMAT, "model": m.to_dict(), "fingerprint": meta.fingerprint,
               "samples": 1, "seq_agg": "mean", "sample_agg": "l2"}).save(out)
    return out


def _prune(*args: str) -> None:
    assert main(["prune", *args]) == 0


@pytest.mark.parametrize("family", ["llama", "nemotron", "mistral", "qwen2", "qwen3", "gemma3"])
def test_pruning_units_that_contribute_nothing_keeps_the_logits(family, tmp_path, tiny_tokens):
    src = converted(tiny_hf_dir(tmp_path / "hf", family, seed=5), tmp_path / "src")
    hn = load_in_process(src)[0].kv_channels
    g = torch.Generator().manual_seed(0)
    ffn = [torch.randperm(96, generator=g)[:32] for _ in range(4)]
    heads = [torch.tensor([int(torch.randint(0, 2, (1,), generator=g)),
                           2 + int(torch.randint(0, 2, (1,), generator=g))]) for _ in range(4)]
    hidden = torch.randperm(64, generator=g)[:16] if family != "nemotron" else None  # RMSNorm
    dead_layer = 2

    def silence(model):
        if hidden is not None:  # a residual channel nobody writes stays zero
            model.embedding.word_embeddings.weight[:, hidden] = 0
        for i, layer in enumerate(model.decoder.layers):
            proj, fc2 = layer.self_attention.linear_proj.weight, layer.mlp.linear_fc2.weight
            fc2[:, ffn[i]] = 0
            for h in heads[i].tolist():
                proj[:, h * hn:(h + 1) * hn] = 0
            if hidden is not None:
                proj[hidden] = 0
                fc2[hidden] = 0
            if i == dead_layer:
                proj.zero_()
                fc2.zero_()

    zeroed = _save_modified(src, tmp_path / "zeroed", silence)
    scores = _scores_dropping(zeroed, tmp_path / "s.safetensors", ffn, heads, hidden, dead_layer)
    out = tmp_path / "pruned"
    _prune("--load", str(zeroed), "--scores", str(scores), "--out", str(out), "--target-ffn",
           "64", "--target-heads", "2", "--target-layers", "3",
           *(["--target-hidden", "48"] if hidden is not None else []))
    before, after = in_process_logits(zeroed, tiny_tokens), in_process_logits(out, tiny_tokens)
    print(f"{family}: max |dlogit| after pruning silent units {(after - before).abs().max():.2e}")
    assert (after - before).abs().max() <= 1e-6
    assert main(["convert", str(out), str(tmp_path / "pruned_hf"), "--to", "hf"]) == 0
    assert (hf_logits(tmp_path / "pruned_hf", tiny_tokens) - after).abs().max() <= 1e-5

    # a whole query group (its K/V included) that contributes nothing
    dead = _save_modified(src, tmp_path / "dead_group", lambda m: [
        layer.self_attention.linear_proj.weight[:, 2 * hn:].zero_() for layer in m.decoder.layers])
    scores = _scores_dropping(dead, tmp_path / "g.safetensors",
                              heads=[torch.tensor([2, 3])] * 4)
    _prune("--load", str(dead), "--scores", str(scores), "--out", str(tmp_path / "g1"),
           "--target-groups", "1")
    diff = (in_process_logits(tmp_path / "g1", tiny_tokens) - in_process_logits(dead, tiny_tokens))
    assert diff.abs().max() <= 1e-6


TARGET = ("--target-hidden", "48", "--target-ffn", "64", "--target-heads", "2",
          "--target-layers", "2")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])  # QKV biases; post-norms
def test_same_pruned_checkpoint_from_any_layout_and_loadable_anywhere(family, tiny_llama_ckpt,
                                                                      tiny_tokens, tmp_path):
    from megatron_minitron.data.demo import train_plays

    if family != "llama":
        tiny_llama_ckpt = converted(tiny_hf_dir(tmp_path / "src_hf", family, seed=6),
                                    tmp_path / "src")

    scores = tmp_path / "s.safetensors"
    assert main(["importance", "--load", str(tiny_llama_ckpt), "--data", str(train_plays()[1]),
                 "--samples", "8", "--seq-length", "32", "--depth-samples", "4",
                 "--block-sizes", "1", "2", "--out", str(scores)]) == 0
    args = ("--load", str(tiny_llama_ckpt), "--scores", str(scores), *TARGET)
    _prune(*args, "--out", str(tmp_path / "tp1"), "--hf-out", str(tmp_path / "hf"))
    run_cli("prune", *args, "--out", str(tmp_path / "tp2"), "--tp", "2", "--sequence-parallel",
            nproc=2)
    run_cli("prune", *args, "--out", str(tmp_path / "pp2"), "--pp", "2", nproc=2)

    ref = {k: v.clone() for k, v in load_in_process(tmp_path / "tp1")[1][0].state_dict().items()
           if "_extra_state" not in k}
    for name in ("tp2", "pp2"):
        got = load_in_process(tmp_path / name)[1][0].state_dict()
        for k, v in ref.items():
            assert torch.equal(got[k], v), f"{name}: {k}"

    # Equal tensors at every layout; loading them at any TP/PP is test_roundtrip's resharding.
    logits = in_process_logits(tmp_path / "tp1", tiny_tokens)
    assert (hf_logits(tmp_path / "hf", tiny_tokens) - logits).abs().max() <= 1e-5
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["num_hidden_layers"]) == (48, 64, 2, 2, 2)


@pytest.mark.xdist_group("smollm2_scores")  # one worker computes smol_scores
def test_smollm2_pruned_to_a_smaller_shape(smol_ckpt, smol_scores, tmp_path):
    from megatron_minitron.data.demo import held_out_plays
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate.perplexity import evaluate_windows, token_windows

    out = tmp_path / "smol_pruned"
    _prune("--load", str(smol_ckpt), "--scores", str(smol_scores), "--out", str(out),
           "--target-ffn", "1024", "--target-hidden", "448", "--target-heads", "6",
           "--target-layers", "24")
    text = "\n\n".join(p.read_text() for p in held_out_plays())
    windows = token_windows(load_tokenizer(smol_ckpt).encode(text), 256, 4)
    losses = {}
    for name, ckpt in (("teacher", smol_ckpt), ("pruned", out)):
        cfg, chunks = load_in_process(ckpt)
        real = sum(p.numel() for p in chunks[0].parameters())
        assert real == cfg.num_parameters()
        losses[name] = evaluate_windows(chunks, windows, 4).loss
        print(f"{name}: layers {cfg.num_layers} hidden {cfg.hidden_size} ffn "
              f"{cfg.ffn_hidden_size} heads {cfg.num_attention_heads}/{cfg.num_query_groups}: "
              f"{real:,} parameters ({cfg.num_parameters(False):,} non-embedding), held-out "
              f"loss {losses[name]:.4f}")
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
            cfg.num_query_groups) == (24, 448, 1024, 6, 3)
    assert losses["teacher"] < losses["pruned"] < 20


@pytest.mark.xdist_group("smollm2_scores")
def test_smollm2_heads_by_masking_beat_random_and_auto_beats_the_paper_default(smol_ckpt,
                                                                              smol_scores):
    """Right after pruning SmolLM2, on the held-out plays (never seen by any choice): heads 9 -> 6
    inside the 3 groups ranked by masking loss beat the mean of random heads (the activation
    norm does not), and --strategy auto beats the paper's joint activation ranking on the
    combined target (about half the parameters) by a wide margin."""
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.data.demo import held_out_plays
    from megatron_minitron.data.tokenizer import load_tokenizer
    from megatron_minitron.evaluate.perplexity import evaluate_windows, token_windows
    from megatron_minitron.importance import load_scores
    from megatron_minitron.prune import PruneTarget, make_plan, prune_model
    from megatron_minitron.prune.strategy import calibration, choose_plan

    cfg, chunks = load_in_process(smol_ckpt)
    scores, par = load_scores(smol_scores), ParallelConfig()
    text = "\n\n".join(p.read_text() for p in held_out_plays())
    held_out = token_windows(load_tokenizer(smol_ckpt).encode(text), 256, 4)

    def loss(plan) -> float:
        return evaluate_windows(prune_model(chunks, cfg, plan, par), held_out, 4).loss

    by_masking = loss(make_plan(cfg, PruneTarget(heads=6, head_metric="loss"), scores))
    g = torch.Generator().manual_seed(0)
    random = []
    for _ in range(3):
        plan = make_plan(cfg, PruneTarget(heads=6), scores)
        for i in plan.heads:
            plan.heads[i] = torch.cat([q * 3 + torch.randperm(3, generator=g)[:2].sort().values
                                       for q in range(3)])
        random.append(loss(plan))
    print(f"heads 9 -> 6: masking loss {by_masking:.4f}, random {random}")
    assert by_masking < sum(random) / len(random)

    combined = PruneTarget(hidden=448, ffn=1024, heads=6, layers=24)
    paper = loss(make_plan(cfg, combined, scores))
    plan, table = choose_plan(chunks, cfg, combined, scores, calibration(smol_ckpt, scores.meta, 4),
                              par)
    auto = loss(plan)
    print(f"combined: paper default {paper:.4f}, auto {auto:.4f} ({plan.notes[-1]})")
    assert plan.model.num_parameters() <= make_plan(cfg, combined, scores).model.num_parameters()
    assert auto < paper - 0.5


def test_hidden_pruned_export_loads_in_transformers(tiny_llama_ckpt, tiny_tokens, tmp_path):
    """Hidden 64 -> 50 with 4 heads of 16: transformers' LlamaConfig refuses hidden % heads != 0,
    so it is written as Mistral (explicit head_dim, no sliding window): it loads with our logits
    and converts back."""
    scores = _scores_dropping(tiny_llama_ckpt, tmp_path / "s.safetensors",
                              hidden=list(range(0, 28, 2)))
    _prune("--load", str(tiny_llama_ckpt), "--scores", str(scores), "--target-hidden", "50",
           "--out", str(tmp_path / "pruned"), "--hf-out", str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["hidden_size"] == 50
    logits = in_process_logits(tmp_path / "pruned", tiny_tokens)
    assert (hf_logits(tmp_path / "hf", tiny_tokens) - logits).abs().max() <= 1e-5
    back = converted(tmp_path / "hf", tmp_path / "back")
    assert torch.equal(in_process_logits(back, tiny_tokens), logits)


def test_gemma3_with_one_kv_group_prunes_query_heads_only(tmp_path, tiny_tokens):
    """Gemma 3 270M has one KV group: --target-heads keeps it and drops query heads; the export
    loads in transformers with our logits."""
    src = converted(tiny_hf_dir(tmp_path / "hf", "gemma3", seed=4, num_key_value_heads=1),
                    tmp_path / "src")
    scores = _scores_dropping(src, tmp_path / "s.safetensors", heads=[torch.tensor([1, 3])] * 4)
    _prune("--load", str(src), "--scores", str(scores), "--target-heads", "2",
           "--out", str(tmp_path / "pruned"), "--hf-out", str(tmp_path / "pruned_hf"))
    cfg = json.loads((tmp_path / "pruned_hf" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)
    logits = in_process_logits(tmp_path / "pruned", tiny_tokens)
    assert (hf_logits(tmp_path / "pruned_hf", tiny_tokens) - logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_a_composed_plan_prunes_as_the_two_steps_do(family, request, tiny_tokens, tmp_path):
    """depth-first / width-first write one plan over the source: pruning with it must equal
    pruning twice (second plan made on the first's result), norm rescale included; under MoE
    with experts, each expert's width and the shared expert's pruned too (a kept expert's
    neurons are chosen among those the first step left it)."""
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.importance import load_scores
    from megatron_minitron.importance.run import ImportanceConfig, compute_importance
    from megatron_minitron.model.forward import logits
    from megatron_minitron.prune import PruneTarget, make_plan, prune_model
    from megatron_minitron.prune.strategy import compose, split_target

    ckpt = (request.getfixturevalue("tiny_llama_ckpt") if family == "llama" else
            converted(tiny_hf_dir(tmp_path / "hf", family, seed=2), tmp_path / "src"))
    scores = tmp_path / "s.safetensors"
    assert main(["importance", "--load", str(ckpt), "--data", str(train_plays()[1]),
                 "--samples", "4", "--seq-length", "32", "--depth-samples", "2",
                 "--out", str(scores)]) == 0
    scores = load_scores(scores)
    cfg, chunks = load_in_process(ckpt)
    par = ParallelConfig()
    mlp = dict(experts=3, moe_ffn=32, shared_ffn=48) if cfg.moe else dict(ffn=64)
    target = PruneTarget(hidden=48, heads=2, layers=3, depth_metric="skip_loss", **mlp)
    samples = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(3))
    depth, width = split_target(cfg, target)
    for first_t, second_t in ((depth, width), (width, depth)):
        first = make_plan(cfg, first_t, scores)
        step = prune_model(chunks, cfg, first, par)
        second = make_plan(first.model, second_t, compute_importance(
            step, first.model, samples, ImportanceConfig(samples=4, seq_length=32,
                                                         depth_samples=2)))
        two_steps = logits(prune_model(step, first.model, second, par), tiny_tokens, 2)
        one_step = logits(prune_model(chunks, cfg, compose(first, second), par), tiny_tokens, 2)
        torch.testing.assert_close(one_step, two_steps, rtol=0, atol=1e-6)
        assert compose(first, second).model.num_layers == 3


def test_pruning_that_releases_its_source_gives_the_same_model(tiny_llama_ckpt):
    """The prune stage gives each source layer's memory back once sliced (dropped layers first):
    the result is the same, tensor for tensor, and the source holds nothing afterwards."""
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.importance.run import ImportanceConfig, compute_importance
    from megatron_minitron.prune import PruneTarget, make_plan, prune_model

    cfg, chunks = load_in_process(tiny_llama_ckpt)
    samples = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(3))
    scores = compute_importance(chunks, cfg, samples,
                                ImportanceConfig(samples=4, seq_length=32, depth_samples=2))
    plan = make_plan(cfg, PruneTarget(hidden=48, ffn=64, heads=2, layers=3), scores)
    kept = prune_model(chunks, cfg, plan, ParallelConfig())
    released = prune_model(chunks, cfg, plan, ParallelConfig(), release_source=True)
    assert plan.model.num_layers < cfg.num_layers
    a, b = kept[0].state_dict(), released[0].state_dict()
    assert a.keys() == b.keys()
    for name, t in a.items():
        if "_extra_state" not in name:
            assert torch.equal(t, b[name]), name
    assert all(p.numel() == 0 for p in chunks[0].parameters())


def test_strategy_auto_makes_the_same_choice_at_tp2_sp_and_pp2(tmp_path):
    """--strategy auto at TP1, TP2+SP and PP2: the same candidates, losses equal to 1e-5, the
    same winner and the same written shape; the winner has the lowest calibration loss."""
    from megatron_minitron.data.demo import train_plays

    src = converted(tiny_hf_dir(tmp_path / "hf", num_attention_heads=8, num_key_value_heads=4),
                    tmp_path / "src")
    scores = tmp_path / "s.safetensors"
    assert main(["importance", "--load", str(src), "--data", str(train_plays()[1]),
                 "--samples", "6", "--seq-length", "32", "--depth-samples", "3",
                 "--block-sizes", "1", "--head-samples", "2", "--out", str(scores)]) == 0
    args = ("prune", "--load", str(src), "--scores", str(scores), "--strategy", "auto",
            "--select-samples", "4", "--target-hidden", "48", "--target-ffn", "64",
            "--target-heads", "4", "--target-layers", "3")
    assert main([*args, "--out", str(tmp_path / "tp1"),
                 "--json", str(tmp_path / "tp1.json")]) == 0
    run_cli(*args, "--out", str(tmp_path / "tp2"), "--json", str(tmp_path / "tp2.json"),
            "--tp", "2", "--sequence-parallel", nproc=2)
    run_cli(*args, "--out", str(tmp_path / "pp2"), "--json", str(tmp_path / "pp2.json"),
            "--pp", "2", nproc=2)
    ref = json.loads((tmp_path / "tp1.json").read_text())
    table = ref["candidates"]
    assert len(table) == 1 + 2 + 1 + 1 + 2  # as given, then the other head metrics, grouping,
    # rescale and orders one at a time
    assert min(r["loss"] for r in table) == pytest.approx(
        float(ref["notes"][-1].split("(")[-1].split(")")[0]), abs=1e-4)
    for name in ("tp2", "pp2"):
        got = json.loads((tmp_path / f"{name}.json").read_text())
        assert [r["strategy"] for r in got["candidates"]] == [r["strategy"] for r in table]
        for a, b in zip(got["candidates"], table, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (name, a["strategy"])
        assert (got["model"], got["kept_layers"]) == (ref["model"], ref["kept_layers"]), name


def _moe_scores(ckpt: Path, out: Path) -> tuple[Path, Scores]:
    """Importance of a tiny MoE checkpoint on 4 x 32 tokens of a training play."""
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.importance import load_scores

    assert main(["importance", "--load", str(ckpt), "--data", str(train_plays()[1]),
                 "--samples", "4", "--seq-length", "32", "--depth-samples", "0",
                 "--out", str(out)]) == 0
    return out, load_scores(out)


def _without_experts(hf: Path, keep: torch.Tensor, dst: Path) -> Path:
    """transformers' own Mixtral with only experts keep[i] in layer i (router rows too), written
    by hand from the HF tensors: an independent reference for expert pruning."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, dst)
    out = {}
    for k, v in load_file(str(hf / "model.safetensors")).items():
        i = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        if k.endswith("block_sparse_moe.gate.weight"):
            out[k] = v[keep[i]].contiguous()
        elif ".experts." in k:
            j = int(k.split(".experts.")[1].split(".")[0])
            if j in keep[i].tolist():
                out[k.replace(f".experts.{j}.", f".experts.{keep[i].tolist().index(j)}.")] = v
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "num_local_experts": keep.shape[1]}))
    return dst


def test_moe_expert_pruning_keeps_the_top_experts_as_transformers_would(tmp_path, tiny_tokens,
                                                                        capsys):
    """Mixtral, 2 of 4 experts kept per layer by routed-output norm: the pruned checkpoint and
    its export give the logits of transformers' Mixtral holding only those experts (router rows
    sliced, survivors renumbered), pruned at EP1, EP2, TP2 x EP2 and PP2. The scores count every
    routed token. Experts with hidden and heads pruned too export to a model transformers loads with
    the same logits. Impossible expert targets and MoE-only / dense-only axes are refused in one
    line."""
    from safetensors.torch import load_file

    hf = tiny_hf_dir(tmp_path / "hf", "mixtral", seed=8)
    ckpt = converted(hf, tmp_path / "mcore")
    scores, s = _moe_scores(ckpt, tmp_path / "s.safetensors")
    assert torch.equal(s.experts("tokens").sum(-1), torch.full((4,), 4 * 32 * 2.0))
    keep = s.experts("output").topk(2).indices.sort().values
    assert main(["prune", "--load", str(ckpt), "--scores", str(scores), "--target-experts", "2",
                 "--out", str(tmp_path / "p"), "--hf-out", str(tmp_path / "p_hf")]) == 0
    ref = hf_logits(_without_experts(hf, keep, tmp_path / "ref"), tiny_tokens)
    assert (in_process_logits(tmp_path / "p", tiny_tokens) - ref).abs().max() <= 1e-5
    assert (hf_logits(tmp_path / "p_hf", tiny_tokens) - ref).abs().max() <= 1e-5
    # at EP2 (kept experts change rank: gathered where they were, sent where they go), with and
    # without expert width pruned: the same model as at EP1
    run_cli("prune", "--load", str(ckpt), "--scores", str(scores), "--target-experts", "2",
            "--out", str(tmp_path / "ep2"), "--ep", "2", nproc=2)
    assert (in_process_logits(tmp_path / "ep2", tiny_tokens) - ref).abs().max() <= 1e-5
    width = ("--target-experts", "2", "--target-moe-ffn", "48")
    assert main(["prune", "--load", str(ckpt), "--scores", str(scores), *width,
                 "--out", str(tmp_path / "w1")]) == 0
    run_cli("prune", "--load", str(ckpt), "--scores", str(scores), *width,
            "--out", str(tmp_path / "w2"), "--ep", "2", nproc=2)
    # and over 4 ranks at TP2 x EP2 with sequence parallelism (experts gathered over TP first)
    run_cli("prune", "--load", str(ckpt), "--scores", str(scores), *width,
            "--out", str(tmp_path / "w4"), "--tp", "2", "--ep", "2", "--sequence-parallel",
            nproc=4)
    # and at PP2 (each stage prunes its own layers' experts)
    run_cli("prune", "--load", str(ckpt), "--scores", str(scores), *width,
            "--out", str(tmp_path / "wpp"), "--pp", "2", nproc=2)
    one = in_process_logits(tmp_path / "w1", tiny_tokens)
    for name in ("w2", "w4", "wpp"):
        assert torch.equal(in_process_logits(tmp_path / name, tiny_tokens), one), name
    # --expert-neurons common: every kept expert keeps the same neurons, the best by their
    # token-weighted score over the kept experts
    assert main(["prune", "--load", str(ckpt), "--scores", str(scores), *width, "--expert-neurons",
                 "common", "--out", str(tmp_path / "c"), "--hf-out", str(tmp_path / "c_hf")]) == 0
    src, out = (load_file(str(d / "model.safetensors")) for d in (hf, tmp_path / "c_hf"))
    for i in range(4):
        weighted = s.moe_ffn()[i][keep[i]] * s.experts("tokens")[i][keep[i], None]
        rows = weighted.sum(0).topk(48).indices.sort().values
        for new, j in enumerate(keep[i].tolist()):
            name = f"model.layers.{i}.block_sparse_moe.experts.{{}}.w1.weight"
            assert torch.equal(out[name.format(new)], src[name.format(j)][rows])
    assert main(["prune", "--load", str(ckpt), "--scores", str(scores), "--target-experts", "3",
                 "--target-hidden", "48", "--target-heads", "2", "--out", str(tmp_path / "q"),
                 "--hf-out", str(tmp_path / "q_hf")]) == 0
    ours = in_process_logits(tmp_path / "q", tiny_tokens)
    assert (hf_logits(tmp_path / "q_hf", tiny_tokens) - ours).abs().max() <= 1e-5
    capsys.readouterr()
    for flags, needle in ((("--target-experts", "5"), "between 1 and the original 4"),
                          (("--target-experts", "1"), "below the router's top-k 2"),
                          (("--target-ffn", "64"), "--target-ffn: this mixture-of-experts "
                                                   "model has no dense MLP"),
                          (("--target-moe-ffn", "97"), "target moe-ffn 97 must be between 1 "
                                                       "and the original 96"),
                          (("--target-shared-ffn", "8"), "this mixtral model has no shared "
                                                         "expert"),
                          (("--target-experts", "3", "--ep", "2"),
                           "expert parallel size 2 does not divide num_moe_experts=3")):
        fails(capsys, ["prune", "--load", str(ckpt), "--scores", str(scores), *flags,
                       "--out", str(tmp_path / "x")], needle)
        assert not (tmp_path / "x").exists()


def test_moe_strategy_auto_and_target_params_choose_alike_at_ep1_and_ep2(tmp_path):
    """Mixtral under --strategy auto with a parameter budget, 2 of 4 experts and 3 of 4 layers:
    the budget sets hidden and expert width (within 5%), auto also tries the other expert
    metrics and both orders (which re-score the partly pruned MoE), and EP2 (in-memory prunes
    moving experts between ranks) gives the same candidates, losses and written shape as one
    process; the winner has the lowest calibration loss."""
    from megatron_minitron.config import ModelConfig
    from megatron_minitron.data.demo import train_plays

    src = converted(tiny_hf_dir(tmp_path / "hf", "mixtral", seed=6), tmp_path / "src")
    scores = tmp_path / "s.safetensors"
    assert main(["importance", "--load", str(src), "--data", str(train_plays()[1]),
                 "--samples", "6", "--seq-length", "32", "--depth-samples", "4",
                 "--block-sizes", "1", "--out", str(scores)]) == 0
    args = ("prune", "--load", str(src), "--scores", str(scores), "--strategy", "auto",
            "--select-samples", "3", "--target-params", "0.35", "--target-experts", "2",
            "--target-layers", "3")
    assert main([*args, "--out", str(tmp_path / "ep1"), "--json", str(tmp_path / "ep1.json")]) == 0
    run_cli(*args, "--out", str(tmp_path / "ep2"), "--json", str(tmp_path / "ep2.json"),
            "--ep", "2", nproc=2)
    ref, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ep1", "ep2"))
    pruned, (before, after) = ModelConfig.from_dict(ref["model"]), ref["parameters"]
    assert pruned.num_moe_experts == 2 and pruned.num_layers == 3
    assert pruned.hidden_size < 64 and pruned.moe_ffn_hidden_size < 96
    assert after == pruned.num_parameters() == pytest.approx(0.35 * before, rel=0.05)
    table = ref["candidates"]
    strategies = [r["strategy"] for r in table]
    assert len(table) == 1 + 2 + 1 + 1 + 2, strategies  # as given, the other expert metrics,
    # the same neurons in every expert, rescale off, the other orders
    assert all(any(f"expert metric {m}" in x for x in strategies)
               for m in ("output", "tokens", "probs"))
    assert any("expert neurons common" in x for x in strategies)
    assert min(r["loss"] for r in table) == pytest.approx(
        float(ref["notes"][-1].split("(")[-1].split(")")[0]), abs=1e-4)
    assert [r["strategy"] for r in got["candidates"]] == strategies
    for a, b in zip(got["candidates"], table, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["strategy"]
    assert (got["model"], got["kept_layers"]) == (ref["model"], ref["kept_layers"])
    # a pass that cannot split evenly over the expert group's ranks is refused, not left hanging
    r = run_cli("importance", "--load", str(src), "--data", str(train_plays()[1]), "--samples",
                "5", "--seq-length", "32", "--out", str(tmp_path / "odd.safetensors"),
                "--ep", "2", nproc=2, check=False)
    assert r.returncode != 0 and not (tmp_path / "odd.safetensors").exists()
    assert "5 calibration samples (--samples) do not split evenly over 2" in r.stderr


def _dead_experts_and_neurons(hf: Path, dst: Path, seed: int = 0
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A copy of HF MoE model `hf` where expert dead[i] of layer i receives no token and 16
    neurons of every expert never fire (their gate rows are zero, so SiLU(0) * up = 0).
    The router cannot be made to ignore an expert for every input, so the residual gets a
    channel nothing writes to, held at 10 by the embedding: after the pre-MLP norm it is
    positive for every token, and the dead expert's router row reads only it, negatively.
    Returns the dead experts and, per expert, its live neurons."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, dst)
    g = torch.Generator().manual_seed(seed)
    w = load_file(str(hf / "model.safetensors"))
    c, layers = 0, 1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers."))
    dead = torch.randint(0, 4, (layers,), generator=g)
    live = {}
    w["model.embed_tokens.weight"][:, c] = 10.0
    for k, t in w.items():
        i = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            t[c] = 0.0
        elif k.endswith("mlp.gate.weight"):  # only the dead expert's row reads channel c
            t[:, c] = 0.0
            t[dead[i]] = 0.0
            t[dead[i], c] = -1.0
        elif k.endswith("gate_proj.weight"):
            order = torch.randperm(t.shape[0], generator=g)
            t[order[:16]] = 0.0
            live[k] = order[16:].sort().values
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dead, live


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_moe_pruning_of_unused_experts_and_silent_neurons_preserves_the_function(
        family, tmp_path, tiny_tokens):
    """Qwen3-MoE and Qwen2-MoE with an expert per layer that no token reaches and 16 silent
    neurons in every expert (the shared one too): importance gives those experts no token and
    those neurons zero, so --target-experts 3 --target-moe-ffn 32 (--target-shared-ffn 48)
    drops exactly them (each expert its own neurons) and the logits, in Megatron (pruned at TP1
    and at TP2+SP) and in transformers after export, stay those of the unpruned model. (Routing
    weights renormalised over the top k: a softmax over all experts would still feel the
    dropped one.)"""
    from safetensors.torch import load_file


    hf = tmp_path / "dead_hf"
    dead, live = _dead_experts_and_neurons(
        tiny_hf_dir(tmp_path / "hf", family, seed=5, norm_topk_prob=True), hf)
    shared = ["--target-shared-ffn", "48"] if family == "qwen2_moe" else []
    ref = hf_logits(hf, tiny_tokens)
    ckpt = converted(hf, tmp_path / "mcore")
    scores, s = _moe_scores(ckpt, tmp_path / "s.safetensors")
    tokens = s.experts("tokens")
    assert (tokens[torch.arange(4), dead] == 0).all() and tokens.sum(-1).eq(4 * 32 * 2).all()
    assert main(["prune", "--load", str(ckpt), "--scores", str(scores), "--target-experts", "3",
                 "--target-moe-ffn", "32", *shared, "--out", str(tmp_path / "p"),
                 "--hf-out", str(tmp_path / "p_hf")]) == 0
    assert (in_process_logits(tmp_path / "p", tiny_tokens) - ref).abs().max() <= 1e-5
    assert (hf_logits(tmp_path / "p_hf", tiny_tokens) - ref).abs().max() <= 1e-5
    if shared:  # the same prune on TP-sharded experts, shared expert and gate
        run_cli("prune", "--load", str(ckpt), "--scores", str(scores), "--target-experts", "3",
                "--target-moe-ffn", "32", *shared, "--out", str(tmp_path / "tp2"), "--tp", "2",
                "--sequence-parallel", nproc=2)
        assert (in_process_logits(tmp_path / "tp2", tiny_tokens) - ref).abs().max() <= 1e-5
    src, out = load_file(str(hf / "model.safetensors")), load_file(
        str(tmp_path / "p_hf" / "model.safetensors"))
    for i in range(4):
        kept = [j for j in range(4) if j != dead[i]]
        for new, j in enumerate(kept):  # survivors renumbered, each with its own live neurons
            name = f"model.layers.{i}.mlp.experts.{{}}.up_proj.weight"
            rows = live[name.format(j).replace("up_proj", "gate_proj")]
            assert torch.equal(out[name.format(new)], src[name.format(j)][rows])
        up = f"model.layers.{i}.mlp.shared_expert.up_proj.weight"
        if shared:
            assert torch.equal(out[up], src[up][live[up.replace("up_proj", "gate_proj")]])


def test_moe_importance_is_the_same_at_tp2_sp_and_ep2(tmp_path):
    """Qwen2-MoE's expert scores (routed-output norms, tokens, router mass; each expert's and
    the shared expert's neuron sums) from one process equal those at
    TP2 with sequence parallelism (experts split over TP: partial outputs summed first) and at
    EP2 (each rank scores its own experts on both ranks' tokens)."""
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.importance import load_scores

    ckpt = converted(tiny_hf_dir(tmp_path / "hf", "qwen2_moe", seed=9), tmp_path / "mcore")
    args = ["importance", "--load", str(ckpt), "--data", str(train_plays()[1]), "--samples", "4",
            "--seq-length", "32", "--depth-samples", "0"]
    assert main([*args, "--out", str(tmp_path / "one.safetensors")]) == 0
    one = load_scores(tmp_path / "one.safetensors").tensors
    for name, flags in (("tp2", ("--tp", "2", "--sequence-parallel")), ("ep2", ("--ep", "2"))):
        run_cli(*args, *flags, "--out", str(tmp_path / f"{name}.safetensors"), nproc=2)
        got = load_scores(tmp_path / f"{name}.safetensors").tensors
        for key in ("sums.experts", "sums.moe_ffn", "sums.shared_ffn"):
            torch.testing.assert_close(got[key], one[key], rtol=1e-5, atol=1e-5,
                                       msg=f"{name} {key}")
