"""Downstream tasks: cloze and multiple-choice log-likelihoods and rolling-window perplexity of
SmolLM2 equal `transformers` on the same tokens; scores are the same at TP=2 with sequence
parallelism, PP=2 and DP=2; bad task files are named by file and line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_minitron.cli import main
from megatron_minitron.data.tokenizer import load_tokenizer
from megatron_minitron.evaluate import suite
from megatron_minitron.evaluate import tasks as T
from megatron_minitron.evaluate.loglik import encode_pair, score
from tests.conftest import converted, load_in_process, run_cli, tiny_hf_dir

SEQ = 96


def _hf_score(model, requests, seq_length: int) -> list[tuple[float, bool]]:
    out = []
    with torch.no_grad():
        for r in requests:
            w = (r.context + r.continuation)[-(seq_length + 1):]
            logp = torch.log_softmax(model(torch.tensor([w[:-1]])).logits[0].double(), -1)
            n = len(r.continuation)
            pos = torch.arange(len(w) - 1 - n, len(w) - 1)
            target = torch.tensor(w[-n:])
            out.append((logp[pos, target].sum().item(),
                        bool((logp[pos].argmax(-1) == target).all())))
    return out


@pytest.fixture(scope="module")
def smol_items(smol_ckpt):
    tok = load_tokenizer(smol_ckpt)
    cloze = T.builtin_rows("shakespeare-cloze", 12)
    choice = T.choice_items(T.builtin_rows("shakespeare-next", 6))
    return tok, cloze, choice


def test_cloze_and_choice_loglik_equal_transformers(smol_ckpt, smol_hf_model, smol_items):
    tok, cloze, choice = smol_items
    requests = [encode_pair(tok, c, x) for c, x in T.cloze_items(cloze)]
    requests += T.choice_requests(tok, T.with_fewshot(choice, 1, seed=0))
    _, chunks = load_in_process(smol_ckpt)
    ours = score(chunks, requests, SEQ, micro_batch_size=4)  # padded microbatches
    ref = _hf_score(smol_hf_model, requests, SEQ)
    worst = max(abs(a - b) for (a, _), (b, _) in zip(ours, ref, strict=True))
    print(f"{len(requests)} requests, max |loglik diff| vs transformers {worst:.2e}")
    assert worst <= 1e-3
    assert [g for _, g in ours] == [g for _, g in ref]
    assert any(g for _, g in ref[:12]), "no cloze word predicted: the greedy check is untested"
    n = len(cloze)
    assert T.cloze_metrics(ours[:n]) == pytest.approx(T.cloze_metrics(ref[:n]), rel=1e-3)
    few = T.with_fewshot(choice, 1, seed=0)
    assert T.choice_metrics(few, [v for v, _ in ours[n:]]) == \
        T.choice_metrics(few, [v for v, _ in ref[n:]])
    assert any(len(r.context) + len(r.continuation) > SEQ + 1 for r in requests), \
        "no request was long enough to test the left truncation"


def test_rolling_perplexity_equals_transformers(smol_ckpt, smol_hf_model, tmp_path):
    from megatron_minitron.data.demo import held_out_plays
    from megatron_minitron.evaluate.perplexity import token_windows

    out = tmp_path / "eval.json"
    assert main(["eval", "--load", str(smol_ckpt), "--seq-length", "128", "--stride", "32",
                 "--max-windows", "6", "--micro-batch-size", "3", "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    text = "\n\n".join(p.read_text() for p in held_out_plays())
    windows = token_windows(load_tokenizer(smol_ckpt).encode(text), 128, 6, stride=32)
    assert torch.equal(windows[1, :97], windows[0, 32:])  # window 1 starts 32 tokens on
    nll, n = 0.0, 0
    with torch.no_grad():
        for i, w in enumerate(windows):
            logp = torch.log_softmax(smol_hf_model(w[None, :-1]).logits[0].double(), -1)
            tok_nll = -logp.gather(-1, w[1:, None])[:, 0]
            scored = tok_nll if i == 0 else tok_nll[-32:]
            nll, n = nll + scored.sum().item(), n + len(scored)
    assert ours["tokens"] == 128 + 5 * 32 == n
    assert abs(ours["loss"] - nll / n) <= 1e-3 and ours["perplexity"] == \
        pytest.approx(math.exp(nll / n), rel=1e-3)


def _task_args(ckpt, out) -> list[str]:
    return ["eval", "--load", str(ckpt), "--tasks", "perplexity", "shakespeare-cloze",
            "shakespeare-next", "--limit", "8", "--seq-length", "64", "--max-windows", "4",
            "--micro-batch-size", "2", "--out", str(out)]


def _metrics(path) -> dict:
    return json.loads(path.read_text())["tasks"]


def test_task_scores_are_the_same_under_tp_sp_pp_dp_and_ep(tiny_llama_ckpt, tmp_path):
    """Perplexity (loss and token count), cloze and choice metrics of one process, DP=2, PP=2,
    TP=2 with sequence parallelism and, for an MoE model, EP=2 agree; at EP=2 with odd counts
    of windows and requests (the experts' all-gather needs every rank to run the same passes,
    shape for shape: the shorter share is padded with rows that weigh nothing)."""
    moe = converted(tiny_hf_dir(tmp_path / "hf", "mixtral", seed=3), tmp_path / "mixtral")
    odd = ("--limit", "7", "--max-windows", "3")
    for ckpt, runs, extra in ((tiny_llama_ckpt, (("pp2", ("--pp", "2")), ("dp2", ()),
                                                ("tp2", ("--tp", "2", "--sequence-parallel"))),
                               ()),
                              (moe, (("ep2", ("--ep", "2")),), odd)):
        ref = tmp_path / f"{ckpt.name}.json"
        assert main([*_task_args(ckpt, ref), *extra]) == 0
        for name, flags in runs:
            run_cli(*_task_args(ckpt, tmp_path / f"{name}.json"), *extra, *flags, nproc=2)
            for task, metrics in _metrics(ref).items():
                got = _metrics(tmp_path / f"{name}.json")[task]
                assert got == pytest.approx(metrics, rel=1e-6, abs=1e-6), (name, task)


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "choi',
     "choice.jsonl:2: malformed JSON"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "choice.jsonl:1: label 2 out of "
     "range for 2 options"),
    ('{"context": "a", "label": 0}', "choice.jsonl:1: needs \"context\" and \"choices\""),
])
def test_bad_task_file_is_named_by_file_and_line(line, message, tiny_llama_ckpt, tmp_path,
                                                 capsys):
    f = tmp_path / "choice.jsonl"
    f.write_text(line + "\n")
    assert main(["eval", "--load", str(tiny_llama_ckpt), "--tasks", f"choice={f}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_long_contexts_are_cut_from_the_left_and_long_continuations_refused(tiny_llama_ckpt):
    from megatron_minitron.config import ConfigError
    from megatron_minitron.evaluate.loglik import Request

    _, chunks = load_in_process(tiny_llama_ckpt)
    ctx, cont = list(range(3, 100)), [5, 6, 7]
    long, cut = score(chunks, [Request(ctx, cont), Request(ctx[-29:], cont)], 31)
    assert long == pytest.approx(cut, abs=1e-6)
    with pytest.raises(ConfigError, match="does not fit the sequence length 31"):
        score(chunks, [Request([1], list(range(3, 40)))], 31)


def test_unknown_task_and_missing_file_fail_before_loading(tiny_llama_ckpt, capsys):
    assert main(["eval", "--load", str(tiny_llama_ckpt), "--tasks", "hellaswag"]) == 2
    assert "unknown task 'hellaswag'" in capsys.readouterr().err
    assert main(["eval", "--load", str(tiny_llama_ckpt), "--tasks", "cloze=/no/file"]) == 2
    assert "/no/file not found" in capsys.readouterr().err
    assert suite.parse_task("shakespeare-next") == ("shakespeare-next", None)
