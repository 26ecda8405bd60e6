"""Candidate search: the parameter formula equals the built model's count for every candidate,
a search on SmolLM2 ranks candidates before and after a short KD, picks the lowest loss after KD,
and that student evaluates apart better than it did pruned; the ranking is the same for the same
seed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_minitron.cli import main
from megatron_minitron.config import ModelConfig
from megatron_minitron.search.space import enumerate_shapes, spread
from tests.conftest import load_in_process, run_cli


def _built_params(cfg: ModelConfig) -> int:
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import build_model
    from megatron_minitron.runtime import init_runtime

    chunks = build_model(cfg, init_runtime(ParallelConfig()).parallel)
    return sum(p.numel() for c in chunks for p in c.parameters())  # tied weights once


@pytest.mark.parametrize("family, tie", [("llama", True), ("llama", False), ("nemotron", False)])
def test_parameter_formula_equals_the_built_model_for_every_candidate(family, tie):
    teacher = ModelConfig(family=family, num_layers=6, hidden_size=128, ffn_hidden_size=256,
                          num_attention_heads=8, num_query_groups=2, kv_channels=16,
                          vocab_size=96, tie_embeddings=tie)
    shapes = enumerate_shapes(teacher, 0.6 * teacher.num_parameters(), 0.1, step=32)
    assert len(shapes) >= 10 and len({s.layers for s in shapes}) >= 2
    for c in shapes:
        assert c.params == _built_params(c.model(teacher)), c.name


def test_spread_reaches_from_deep_to_shallow():
    teacher = ModelConfig(family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                          num_attention_heads=9, num_query_groups=3, kv_channels=64,
                          vocab_size=49152, tie_embeddings=True)
    shapes = enumerate_shapes(teacher, 95e6, 0.03)
    picked = spread(shapes, 4, teacher)
    assert len(picked) == 4 == len({c.name for c in picked})
    assert max(c.layers for c in picked) == max(s.layers for s in shapes)
    assert min(c.layers for c in picked) == min(s.layers for s in shapes)
    assert all(abs(c.params / 95e6 - 1) <= 0.03 for c in picked)


@pytest.fixture(scope="module")
def smol_data(smol_ckpt, tmp_path_factory):
    from megatron_minitron.data.demo import held_out_plays, train_plays

    d = tmp_path_factory.mktemp("search_data")
    for name, files in (("train", train_plays()[:4]), ("valid", held_out_plays()[:1])):
        assert main(["preprocess", "--input", *map(str, files), "--tokenizer", str(smol_ckpt),
                     "--output-prefix", str(d / name)]) == 0
    return d


def _search(ckpt: Path, scores: Path, data: Path, out: Path, *flags: str) -> dict:
    assert main(["search", "--load", str(ckpt), "--scores", str(scores), "--data",
                 str(data / "train"), "--valid-data", str(data / "valid"), "--out", str(out),
                 *flags]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.xdist_group("smollm2_scores")  # one worker computes smol_scores
def test_smollm2_search_ranks_candidates_after_short_kd(smol_ckpt, smol_scores, smol_data,
                                                        tmp_path, capsys):
    out = tmp_path / "search"
    res = _search(smol_ckpt, smol_scores, smol_data, out, "--target-params", "95e6",
                  "--tolerance", "0.04", "--candidates", "3", "--kd-tokens", "384",
                  "--global-batch-size", "2", "--seq-length", "64", "--lr", "3e-4",
                  "--eval-iters", "2")
    printed = capsys.readouterr().out
    print(printed)
    ranking = res["ranking"]
    assert len(ranking) == 3 and "loss after pruning (rank)" in printed
    assert res["best"] == min(ranking, key=lambda r: r["loss_kd"])
    assert all(r["loss_kd"] < r["loss_pruned"] for r in ranking)
    for r in ranking:  # the formula is the built checkpoint's exact count
        cfg, chunks = load_in_process(Path(r["checkpoint"]))
        assert sum(p.numel() for p in chunks[0].parameters()) == r["params"] == \
            cfg.num_parameters()
    assert (out / "best").resolve() == Path(res["best"]["checkpoint"]).resolve()
    assert (out / "search.png").is_file() and (out / "ranking.md").is_file()
    # Measured apart from the search (minitron eval on the held-out play): the chosen student
    # after its short KD against the same candidate right after pruning.
    from megatron_minitron.data.demo import held_out_plays

    def eval_loss(ckpt: Path) -> float:
        capsys.readouterr()
        assert main(["eval", "--load", str(ckpt), "--data", str(held_out_plays()[0]),
                     "--seq-length", "64", "--max-windows", "8"]) == 0
        return float(re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)[-1])

    assert eval_loss(out / "best") < eval_loss(out / "best_pruned")


def _tiny_inputs(ckpt: Path, tmp: Path, depth_samples: int) -> Path:
    """TMP/train and TMP/valid (one play each) and the scores of `ckpt`; returns the scores."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    for name, files in (("train", train_plays()[1:2]), ("valid", held_out_plays()[:1])):
        assert main(["preprocess", "--input", *map(str, files), "--tokenizer",
                     str(ckpt), "--output-prefix", str(tmp / name)]) == 0
    scores = tmp / "scores.safetensors"
    assert main(["importance", "--load", str(ckpt), "--data", str(train_plays()[1]),
                 "--samples", "8", "--seq-length", "32", "--depth-samples", str(depth_samples),
                 "--out", str(scores)]) == 0
    return scores


def test_search_is_reproducible_and_resumes(tiny_llama_ckpt, tmp_path):
    scores = _tiny_inputs(tiny_llama_ckpt, tmp_path, depth_samples=2)
    flags = ("--target-params", "100000", "--tolerance", "0.1", "--candidates", "2", "--step",
             "16", "--kd-tokens", "256", "--global-batch-size", "4", "--seq-length", "32",
             "--lr", "1e-3", "--eval-iters", "1")
    a = _search(tiny_llama_ckpt, scores, tmp_path, tmp_path / "a", *flags)
    b = _search(tiny_llama_ckpt, scores, tmp_path, tmp_path / "b", *flags)
    assert [(r["name"], r["loss_kd"]) for r in a["ranking"]] == \
        [(r["name"], r["loss_kd"]) for r in b["ranking"]]
    # Distributed: TP=2 with sequence parallelism over 2 ranks gives the same search.
    run_cli("search", "--load", str(tiny_llama_ckpt), "--scores", str(scores), "--data",
            str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid"), "--out",
            str(tmp_path / "tp2"), *flags, "--tp", "2", "--sequence-parallel", nproc=2)
    tp2 = json.loads((tmp_path / "tp2" / "results.json").read_text())
    assert [r["name"] for r in tp2["ranking"]] == [r["name"] for r in a["ranking"]]
    for x, y in zip(tp2["ranking"], a["ranking"], strict=True):
        assert abs(x["loss_kd"] - y["loss_kd"]) <= 1e-5 and \
            abs(x["loss_pruned"] - y["loss_pruned"]) <= 1e-5
    # An interrupted search resumes: a finished candidate is not redone.
    first = tmp_path / "a" / a["ranking"][0]["name"]
    (first / "result.json").unlink()
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*/result.json")}
    c = _search(tiny_llama_ckpt, scores, tmp_path, tmp_path / "a", *flags)
    assert c["ranking"] == a["ranking"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())


def test_search_heterogeneous_adds_a_per_layer_twin_at_the_same_budget(tiny_llama_ckpt,
                                                                      tmp_path):
    from megatron_minitron.checkpoint import mcore

    scores = _tiny_inputs(tiny_llama_ckpt, tmp_path, depth_samples=0)
    res = _search(tiny_llama_ckpt, scores, tmp_path, tmp_path / "s", "--target-params",
                  "100000", "--tolerance", "0.1", "--candidates", "1", "--step", "16",
                  "--axes", "hidden", "ffn", "--heterogeneous", "--kd-tokens", "256",
                  "--global-batch-size", "4", "--seq-length", "32", "--eval-iters", "1")
    by_kind = {r["heterogeneous"]: r for r in res["ranking"]}
    assert set(by_kind) == {False, True}
    twin, het = by_kind[False], by_kind[True]
    assert het["hidden"] == twin["hidden"] and het["budget"] == twin["params"]
    model = mcore.read_meta(tmp_path / "s" / het["name"] / "pruned").model
    assert het["params"] == model.num_parameters() <= twin["params"]
    assert model.hidden_size == twin["hidden"]
    assert (tmp_path / "s" / het["name"] / "distill").is_dir()


def test_candidates_keep_every_parallel_flag(monkeypatch, tmp_path):
    """The candidates' prune and distill run with the search's own ParallelConfig, virtual
    pipeline and precision included (rebuilt flag lists used to lose --vpp)."""
    import megatron_minitron.search.run as search_run
    from megatron_minitron.config import ParallelConfig

    seen = {}
    monkeypatch.setattr(search_run, "_search", lambda *a: seen.update(parallel=a[-1]))
    assert main(["search", "--load", "L", "--scores", "S", "--target-params", "1e5", "--data",
                 "D", "--valid-data", "V", "--out", str(tmp_path), "--pp", "2", "--vpp", "2",
                 "--tp", "2", "--sequence-parallel", "--bf16"]) == 0
    assert seen["parallel"] == ParallelConfig(tp=2, pp=2, vpp=2, sequence_parallel=True,
                                              precision="bf16")


@pytest.mark.parametrize("shared", [None, 32])
def test_moe_candidates_at_an_active_budget_prune_to_their_shape(shared):
    """An MoE teacher (with and without a shared expert) searched at 60% of its active
    parameters: candidates cut experts (never below top-k), expert width, hidden, heads, layers;
    each one's counts are the built model's, its active count is within tolerance, and its prune
    target gives exactly its shape."""
    from megatron_minitron.prune.plan import pruned_config

    teacher = ModelConfig(family="qwen2_moe" if shared else "mixtral", num_layers=4,
                          hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                          num_query_groups=2, kv_channels=16, vocab_size=96, num_moe_experts=8,
                          moe_ffn_hidden_size=64, moe_router_topk=2,
                          moe_shared_ffn_hidden_size=shared)
    target = 0.6 * teacher.num_parameters(active=True)
    shapes = enumerate_shapes(teacher, target, 0.05, step=16, active=True)
    assert {s.experts for s in shapes} > {2, 8} and min(s.experts for s in shapes) >= 2
    for c in shapes[::7]:
        model = c.model(teacher)
        assert c.params == _built_params(model) == model.num_parameters(), c.name
        assert abs(c.active_params / target - 1) <= 0.05
        pruned = pruned_config(teacher, c.target(teacher))
        assert {k: v for k, v in pruned.to_dict().items() if k != "norm_epsilon"} == \
            {k: v for k, v in model.to_dict().items() if k != "norm_epsilon"}, c.name


def test_moe_search_at_an_active_budget(tmp_path, capsys):
    """`minitron search --target-active-params` on a Mixtral: two candidates pruned (experts
    among the axes) and briefly distilled, each checkpoint holding the parameters reported.
    Active targets on a dense model and a search without a target are refused in one line."""
    from megatron_minitron.data.demo import held_out_plays, train_plays
    from tests.conftest import converted, fails, tiny_hf_dir

    ckpt = converted(tiny_hf_dir(tmp_path / "hf", "mixtral", seed=2), tmp_path / "mcore")
    for name, files in (("train", train_plays()[1:2]), ("valid", held_out_plays()[:1])):
        assert main(["preprocess", "--input", *map(str, files), "--tokenizer", str(ckpt),
                     "--output-prefix", str(tmp_path / name)]) == 0
    scores = tmp_path / "scores.safetensors"
    assert main(["importance", "--load", str(ckpt), "--data", str(train_plays()[1]),
                 "--samples", "4", "--seq-length", "32", "--depth-samples", "2",
                 "--out", str(scores)]) == 0
    res = _search(ckpt, scores, tmp_path, tmp_path / "s", "--target-active-params", "0.7",
                  "--tolerance", "0.1", "--candidates", "2", "--step", "16", "--kd-tokens",
                  "128", "--global-batch-size", "4", "--seq-length", "32", "--eval-iters", "1")
    teacher, _ = load_in_process(ckpt)
    assert len(res["ranking"]) == 2 and "active)" in capsys.readouterr().out
    for r in res["ranking"]:
        cfg, chunks = load_in_process(Path(r["checkpoint"]))
        assert sum(p.numel() for p in chunks[0].parameters()) == r["params"]
        assert cfg.num_parameters(active=True) == r["active_params"]
        assert abs(r["active_params"] / (0.7 * teacher.num_parameters(active=True)) - 1) <= 0.1
    args = ["search", "--load", str(ckpt), "--scores", str(scores), "--data",
            str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid"), "--out",
            str(tmp_path / "x")]
    fails(capsys, args, "give one of --target-params and --target-active-params")
    fails(capsys, [*args, "--target-params", "0.7", "--target-active-params", "0.7"],
          "give one of")
    dense = ["--load", str(converted(tiny_hf_dir(tmp_path / "llama", seed=2),
                                     tmp_path / "llama_mcore"))]
    capsys.readouterr()
    fails(capsys, [*args, *dense, "--target-active-params", "0.7"],
          "needs a mixture-of-experts teacher")
    assert not (tmp_path / "x").exists()
