"""Heterogeneous students (`prune --heterogeneous`): the program's choice is the optimum under
every budget, the written model computes what the source computes with the chosen units
masked (at TP1, TP2+SP, PP2, and pruned from a TP2 source), the Nemotron-NAS export is what a
zero-padded transformers Llama computes, the pipeline runs on it, and bad input is refused."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from megatron_minitron.cli import main
from tests.conftest import (
    fails,
    in_process_logits,
    load_in_process,
    run_cli,
    tiny_run_config,
    torchrun_logits,
    torchrun_logits_of,
    write_yaml,
)

BUDGET = ["--target-params", "0.7", "--target-memory", "700KB", "--budget-seq-length", "256",
          "--target-latency", "1e6", "--select-samples", "4"]
CHOICES = ["--layer-ffn-choices", "1,0.5,0.25,0"]


@pytest.fixture(scope="module")
def pruned(tiny_llama_ckpt, tmp_path_factory) -> dict:
    from megatron_minitron.data.demo import train_plays

    tmp = tmp_path_factory.mktemp("het")
    scores = tmp / "scores.safetensors"
    assert main(["importance", "--load", str(tiny_llama_ckpt), "--data",
                 str(train_plays()[1]), "--samples", "8", "--seq-length", "32",
                 "--depth-samples", "0", "--out", str(scores)]) == 0
    out = tmp / "het"
    assert main(["prune", "--load", str(tiny_llama_ckpt), "--scores", str(scores), "--out",
                 str(out), "--heterogeneous", *BUDGET, *CHOICES, "--refine-rounds", "0", "--json",
                 str(tmp / "het.json")]) == 0
    return {"tmp": tmp, "scores": scores, "out": out, "source": tiny_llama_ckpt,
            "record": json.loads((tmp / "het.json").read_text())}


def _masked_source_logits(source: Path, scores: Path, choice: list[str], tokens: torch.Tensor):
    """The source model with each layer's dropped neurons and attention zeroed by hooks."""
    from megatron_minitron.importance import load_scores
    from megatron_minitron.model.forward import logits
    from megatron_minitron.prune.heterogeneous import _Masks

    cfg, chunks = load_in_process(source)
    ffn = load_scores(scores).axis("ffn")
    masks = []
    for i, (layer, v) in enumerate(zip(chunks[0].decoder.layers, choice, strict=True)):
        width = int(v.split("ffn")[1])
        keep = ffn[i].argsort(descending=True)[:width]
        masks.append(_Masks(layer, keep, not v.startswith("no-attn"), cfg.ffn_hidden_size))
    return logits(chunks, tokens, micro_batch_size=len(tokens))


def test_the_choice_is_the_optimum_and_the_student_is_the_masked_source(pruned, tiny_tokens):
    rec, het = pruned["record"], pruned["record"]["heterogeneous"]
    model, chunks = load_in_process(pruned["out"])
    assert model.heterogeneous and len(set(model.layer_ffn)) > 1, model
    # the count the budget used is the built model's
    assert model.num_parameters() == sum(p.numel() for p in chunks[0].parameters())
    # every budget holds; memory recomputed from the written shape: fp32 weights + K/V cache
    kv = 2 * model.num_query_groups * model.kv_channels * 256 * 4
    assert het["totals"]["memory"] == model.num_parameters() * 4 + kv * sum(
        model.layer_attention)
    for name, total in het["totals"].items():
        assert total <= het["budgets"][name], (name, total)
    assert set(het["latency_ms"]) == {"attention", "ffn96", "ffn48", "ffn24"}
    assert all(v > 0 for v in het["latency_ms"].values())
    # brute force over every combination: no other fits the budgets with a lower summed rise
    rise, costs = torch.tensor(het["rise"]), het["costs"]
    n = len(het["variants"])
    best = min(
        (sum(rise[i, j] for i, j in enumerate(combo)).item(), combo)
        for combo in itertools.product(range(n), repeat=len(rise))
        if all(sum(costs[k][j] for j in combo) + total - sum(
            costs[k][het["variants"].index(v)] for v in het["choice"]) <= het["budgets"][k]
            for k, total in het["totals"].items()))
    chosen = sum(rise[i, het["variants"].index(v)] for i, v in enumerate(het["choice"]))
    assert chosen.item() == pytest.approx(best[0], abs=1e-9)
    # the student computes what the source does with the chosen units masked
    expect = _masked_source_logits(pruned["source"], pruned["scores"], het["choice"],
                                   tiny_tokens)
    got = in_process_logits(pruned["out"], tiny_tokens)
    assert (got - expect).abs().max() < 1e-5
    assert rec["parameters"][1] < 0.7 * rec["parameters"][0]


def test_a_variants_replayed_rise_is_a_whole_forward_with_that_layer_masked(pruned):
    """Variants are scored from each layer's recorded input; a whole forward of the masked
    source over the same calibration windows gives the same rise."""
    from megatron_minitron.evaluate.perplexity import evaluate_windows
    from megatron_minitron.importance import load_scores
    from megatron_minitron.prune.heterogeneous import _Masks
    from megatron_minitron.prune.strategy import calibration

    het = pruned["record"]["heterogeneous"]
    cfg, chunks = load_in_process(pruned["source"])
    cal = calibration(pruned["source"], load_scores(pruned["scores"]).meta, 4)
    base = evaluate_windows(chunks, cal.select, cal.micro_batch_size).loss
    order = load_scores(pruned["scores"]).axis("ffn")[2].argsort(descending=True)
    for name in ("no-attn+ffn48", "attn+ffn24", "no-attn+ffn0"):
        v, width = het["variants"].index(name), int(name.split("ffn")[1])
        masks = _Masks(chunks[0].decoder.layers[2], order[:width], name.startswith("attn"),
                       cfg.ffn_hidden_size)
        loss = evaluate_windows(chunks, cal.select, cal.micro_batch_size).loss
        masks.remove()
        assert loss - base == pytest.approx(het["rise"][2][v], abs=1e-6), name


def test_refinement_starts_at_the_homogeneous_student_and_its_losses_are_the_students(
        pruned, tmp_path):
    """From `--target-ffn 48 --drop-layers 1`: round 0's loss is that homogeneous student's
    (pruned and written the ordinary way), an in-context rise is a whole forward with the
    student changed at one layer, and the written result has the lowest loss the rounds saw,
    within the homogeneous student's parameters."""
    from megatron_minitron.evaluate.perplexity import evaluate_windows
    from megatron_minitron.importance import load_scores
    from megatron_minitron.prune.heterogeneous import Variant, _Shape
    from megatron_minitron.prune.strategy import calibration

    common = ["prune", "--load", str(pruned["source"]), "--scores", str(pruned["scores"]),
              "--target-ffn", "48", "--drop-layers", "1"]
    assert main([*common, "--out", str(tmp_path / "homo"), "--json",
                 str(tmp_path / "homo.json")]) == 0
    assert main([*common, "--out", str(tmp_path / "het"), "--heterogeneous", "--refine-rounds",
                 "2", "--select-samples", "4", *CHOICES, "--json",
                 str(tmp_path / "het.json")]) == 0
    homo, rec = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("homo", "het"))
    het = rec["heterogeneous"]
    cal = calibration(pruned["source"], load_scores(pruned["scores"]).meta, 4)

    def loss_of(chunks) -> float:
        return evaluate_windows(chunks, cal.select, cal.micro_batch_size).loss

    first = het["rounds"][0]
    assert het["start"] == first["choice"] and first["choice"][1] == "no-attn+ffn0"
    assert loss_of(load_in_process(tmp_path / "homo")[1]) == pytest.approx(first["loss"],
                                                                          abs=1e-5)
    seen = [r["loss"] for r in het["rounds"]] + [t["loss"] for r in het["rounds"]
                                                 for t in r["tried"]]
    assert loss_of(load_in_process(tmp_path / "het")[1]) == pytest.approx(min(seen), abs=1e-5)
    assert rec["parameters"][1] <= homo["parameters"][1]
    cfg, chunks = load_in_process(pruned["source"])
    variants = [Variant(int(v.split("ffn")[1]), v.startswith("attn")) for v in het["variants"]]
    student = [variants[het["variants"].index(v)] for v in first["choice"]]
    for name in ("attn+ffn96", "no-attn+ffn24"):
        j = het["variants"].index(name)
        with _Shape(chunks, cfg, load_scores(pruned["scores"]).axis("ffn")).shaped(
                [*student[:2], variants[j], *student[3:]]):
            assert loss_of(chunks) - first["loss"] == pytest.approx(first["rise"][2][j],
                                                                    abs=1e-6), name


def test_refinement_refuses_every_proposal_measured_worse(pruned, tmp_path, monkeypatch):
    """Every proposal measured 1 nat worse than it is (on the tiny random model real proposals
    all lower the loss, so the acceptance rule is otherwise never exercised): each is refused,
    k halves down to a single changed layer, and the written student is the start."""
    from megatron_minitron.prune import heterogeneous

    real = heterogeneous.student_loss
    monkeypatch.setattr(heterogeneous, "student_loss", lambda *a: real(*a) + 1.0)
    assert main(["prune", "--load", str(pruned["source"]), "--scores", str(pruned["scores"]),
                 "--target-ffn", "48", "--drop-layers", "1", "--out", str(tmp_path / "het"),
                 "--heterogeneous", "--refine-rounds", "2", "--select-samples", "4", *CHOICES,
                 "--json", str(tmp_path / "het.json")]) == 0
    het = json.loads((tmp_path / "het.json").read_text())["heterogeneous"]
    (only,) = het["rounds"]
    assert len(only["tried"]) > 1 and all(t["loss"] > only["loss"] for t in only["tried"])
    assert only["tried"][-1]["changed"] == 1
    assert het["choice"] == het["start"]


def test_pruned_from_tp2_or_pp2_the_student_is_the_masked_source_at_tp2_sp_and_pp2(
        pruned, tiny_tokens):
    """From the TP2+SP-sharded source (and the PP2 one), with widths but no layer drop (even
    layers for PP2): each variant's loss rise equals TP1's, the latency table is timed on the
    ranks holding each block, and the student equals the masked source loaded at TP1, TP2+SP and
    PP2 (the TP1 run's 3-layer student at TP2+SP too)."""
    tmp = pruned["tmp"]
    out = tmp / "het_tp2"
    run_cli("prune", "--load", str(pruned["source"]), "--scores", str(pruned["scores"]),
            "--out", str(out), "--heterogeneous", *BUDGET, "--layer-ffn-choices", "1,0.5,0.25",
            "--tp", "2", "--sequence-parallel", "--json", str(tmp / "tp2.json"), nproc=2)
    run_cli("prune", "--load", str(pruned["source"]), "--scores", str(pruned["scores"]),
            "--out", str(tmp / "het_pp2"), "--heterogeneous", *BUDGET, "--layer-ffn-choices",
            "1,0.5,0.25", "--pp", "2", "--json", str(tmp / "pp2.json"), nproc=2)
    tp1, tp2, pp2 = (json.loads((tmp / f).read_text())["heterogeneous"] if f else
                     pruned["record"]["heterogeneous"] for f in (None, "tp2.json", "pp2.json"))
    assert pp2["choice"] == tp2["choice"] and pp2["latency_ms"].keys() == tp2["latency_ms"].keys()
    assert torch.allclose(torch.tensor(pp2["rise"]), torch.tensor(tp2["rise"]), atol=1e-5)
    for j, name in enumerate(tp2["variants"]):
        k = tp1["variants"].index(name)
        assert torch.allclose(torch.tensor(tp2["rise"])[:, j], torch.tensor(tp1["rise"])[:, k],
                              atol=1e-5), name
    expect = _masked_source_logits(pruned["source"], pruned["scores"], tp2["choice"],
                                   tiny_tokens)
    ref = in_process_logits(pruned["out"], tiny_tokens)
    assert (in_process_logits(out, tiny_tokens) - expect).abs().max() < 1e-5
    at_tp2 = torchrun_logits_of([out, pruned["out"]], tiny_tokens, tmp, 2, "--tp", "2",
                                "--sequence-parallel")
    at_pp2 = torchrun_logits(out, tiny_tokens, tmp, 2, "--pp", "2")
    for got, want in ((at_tp2[0], expect), (at_pp2, expect), (at_tp2[1], ref)):
        assert (got - want).abs().max() < 1e-5


def test_nemotron_nas_export_is_a_zero_padded_llama_and_converts_back(pruned, tiny_tokens):
    """transformers has no per-layer Llama: the exported tensors zero-padded to the widest
    layer (padding neurons and a removed attention's o_proj contribute nothing) in its
    LlamaForCausalLM must give our logits."""
    import transformers
    from safetensors.torch import load_file

    tmp = pruned["tmp"]
    assert main(["convert", str(pruned["out"]), str(tmp / "nas"), "--to", "hf"]) == 0
    cfg = json.loads((tmp / "nas" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and "intermediate_size" not in cfg
    blocks = cfg["block_configs"]
    tensors = {}
    for f in (tmp / "nas").glob("*.safetensors"):
        tensors.update(load_file(f))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=max(b["ffn"]["ffn_hidden_size"] or 0 for b in blocks),
        num_hidden_layers=len(blocks), num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"] // 2, head_dim=cfg["head_dim"],
        rms_norm_eps=cfg["rms_norm_eps"], rope_parameters=cfg["rope_parameters"],
        tie_word_embeddings=cfg["tie_word_embeddings"])).eval()
    padded = 0
    with torch.no_grad():
        for name, p in llama.named_parameters():
            t = tensors.get(name)
            p.zero_()
            if t is None:
                padded += 1
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                continue
            p[tuple(slice(0, k) for k in t.shape)] = t
    # a removed attention: q, k, v, o and its input norm; a removed MLP: 3 and its norm
    assert padded == sum(5 * b["attention"]["no_op"] + 4 * b["ffn"]["no_op"] for b in blocks)
    ours = in_process_logits(pruned["out"], tiny_tokens)
    with torch.no_grad():
        assert (llama(tiny_tokens).logits - ours).abs().max() < 1e-5
    assert main(["convert", str(tmp / "nas"), str(tmp / "back")]) == 0
    assert torch.equal(in_process_logits(tmp / "back", tiny_tokens), ours)


def test_the_pipeline_distills_evaluates_and_plots_a_heterogeneous_student(
        tiny_llama_hf, tmp_path):
    cfg = tiny_run_config(tmp_path, tiny_llama_hf)
    cfg["prune"] = {"heterogeneous": True, "params": 0.75, "hidden": 48, "select_samples": 2}
    run_cli("run", str(write_yaml(tmp_path / "run.yaml", cfg)))
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    student = report["models"]["distilled"]
    assert student["shape"]["layer_ffn"] and student["loss"] < report["models"]["pruned"]["loss"]
    assert (run / report["plots"]["layer_widths"]).is_file()


def test_select_is_the_brute_force_optimum_and_names_an_impossible_budget():
    from megatron_minitron.config import ConfigError
    from megatron_minitron.prune.heterogeneous import Costs, select

    g = torch.Generator().manual_seed(0)
    rise = torch.rand(4, 5, generator=g, dtype=torch.float64)
    rise[:, 0] = 0  # the full layer
    params = [10.0, 7.0, 5.0, 3.0, 0.0]
    latency = [4.0, 1.0, 3.0, 1.0, 0.0]
    c = Costs({"parameters": params, "latency_ms": latency}, {"parameters": 2.0,
              "latency_ms": 0.0}, {"parameters": 26.0, "latency_ms": 9.0})
    choice = select(rise, c)
    feasible = [combo for combo in itertools.product(range(5), repeat=4)
                if 2 + sum(params[j] for j in combo) <= 26 and sum(latency[j] for j in combo) <= 9]
    best = min(sum(rise[i, j] for i, j in enumerate(combo)) for combo in feasible)
    assert sum(rise[i, j] for i, j in enumerate(choice)) == pytest.approx(best)
    c.budget["parameters"] = 1.0
    with pytest.raises(ConfigError, match="no choice of layer variants fits the budget"):
        select(rise, c)


def test_heterogeneous_refusals(pruned, tiny_llama_ckpt, tmp_path, capsys):
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.config import ConfigError

    common = ["prune", "--load", str(tiny_llama_ckpt), "--scores", str(pruned["scores"])]
    fails(capsys, [*common, "--out", str(tmp_path / "a"), "--heterogeneous"],
          "needs a budget (--target-params")
    fails(capsys, [*common, "--out", str(tmp_path / "b"), "--heterogeneous", "--target-params",
                   "0.5", "--target-ffn", "24", "--target-layers", "4"],
          "the starting student (--target-ffn with the layers kept) exceeds the budget")
    fails(capsys, [*common, "--out", str(tmp_path / "c"), "--heterogeneous", "--target-params",
                   "1000"], "no choice of layer variants fits the budget")
    fails(capsys, ["prune", "--load", str(pruned["out"]), "--scores", str(pruned["scores"]),
                   "--out", str(tmp_path / "d"), "--heterogeneous", "--target-params", "0.5"],
          "per-layer widths")
    fails(capsys, [*common, "--out", str(tmp_path / "e"), "--heterogeneous", *BUDGET,
                   "--out-format", "megatron-lm"], "Nemotron-NAS")
    from megatron_minitron.data.demo import train_plays

    fails(capsys, ["importance", "--load", str(pruned["out"]), "--data", str(train_plays()[1]),
                   "--out", str(tmp_path / "s.safetensors")], "heterogeneous model")
    assert not any((tmp_path / x).exists() for x in ("a", "b", "c", "d", "e", "s.safetensors"))
    model = mcore.read_meta(pruned["out"]).model
    with pytest.raises(ConfigError, match="neither attention nor an MLP"):
        dataclasses.replace(model, layer_ffn=[0] * model.num_layers,
                            layer_attention=[False] * model.num_layers).validate()
    with pytest.raises(ConfigError, match="does not divide layer"):
        dataclasses.replace(model, layer_ffn=[w - 1 for w in model.layer_ffn]
                            ).check_parallel(2, 1)
