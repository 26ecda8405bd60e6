"""The lm-eval-harness adapter runs tasks defined in local YAML over local JSONL files, offline,
on SmolLM2, and gives the same scores as our own `minitron eval` on the same items."""

from __future__ import annotations

import json

import pytest

from megatron_minitron.cli import main
from megatron_minitron.evaluate import tasks as T

pytest.importorskip("lm_eval")

CHOICE_YAML = """task: local_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

CLOZE_YAML = """task: local_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.rsplit(' ', 1)[0]}}}}"
doc_to_target: "{{{{' ' + text.rsplit(' ', 1)[1]}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_where"}) + "\n"
                            for r in rows))
    return path


def test_lm_eval_local_yaml_tasks_equal_our_eval(smol_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    choice = _jsonl(tmp_path / "next.jsonl", T.builtin_rows("shakespeare-next", 12))
    cloze = _jsonl(tmp_path / "cloze.jsonl", T.builtin_rows("shakespeare-cloze", 12))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "next.yaml").write_text(CHOICE_YAML.format(data=choice))
    (tasks / "cloze.yaml").write_text(CLOZE_YAML.format(data=cloze))
    out = tmp_path / "out.json"
    assert main(["eval", "--load", str(smol_ckpt), "--seq-length", "128", "--micro-batch-size",
                 "4", "--tasks", f"choice={choice}", f"cloze={cloze}", "--lm-eval",
                 "local_next_line", "local_cloze", "--lm-eval-include", str(tasks),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ours, theirs = res["tasks"], res["lm_eval"]
    print(json.dumps({"ours": ours, "lm_eval": theirs}, indent=1))
    assert theirs["local_next_line"]["acc,none"] == ours[f"choice={choice}"]["acc"]
    assert theirs["local_next_line"]["acc_norm,none"] == ours[f"choice={choice}"]["acc_norm"]
    assert theirs["local_cloze"]["acc,none"] == ours[f"cloze={cloze}"]["acc"]
    assert theirs["local_cloze"]["perplexity,none"] == \
        pytest.approx(ours[f"cloze={cloze}"]["perplexity"], rel=1e-9)
    assert 0 < ours[f"choice={choice}"]["acc_norm"] < 1  # not degenerate


def test_lm_eval_unknown_task_is_named(smol_ckpt, tmp_path, capsys):
    assert main(["eval", "--load", str(smol_ckpt), "--tasks", "shakespeare-cloze", "--limit",
                 "1", "--lm-eval", "no_such_task", "--lm-eval-include", str(tmp_path)]) == 2
    assert "lm-eval tasks not found: no_such_task" in capsys.readouterr().err


GEN_YAML = """task: local_greedy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


def test_lm_eval_generate_until_gives_transformers_greedy_text(tiny_llama_hf, tiny_llama_ckpt,
                                                               tmp_path, monkeypatch):
    """A generate_until task whose targets are transformers' own greedy continuations (cut at
    the stop string) of the same weights: every one matched exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_minitron.data.demo import held_out_plays
    from megatron_minitron.data.tokenizer import load_tokenizer

    for k, v in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                 ("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))):
        monkeypatch.setenv(k, v)
    tok = load_tokenizer(tiny_llama_ckpt)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_hf, dtype=torch.float32).eval()
    lines = [x for x in held_out_plays()[0].read_text().splitlines() if len(x) > 30][10:14]
    rows = []
    for context in lines:
        ids = tok.prefix + tok.encode(context)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        cont = [i for i in out[0, len(ids):].tolist() if i != tok.eos_id]
        rows.append({"context": context, "target": tok.decode(cont).split("\n")[0]})
    assert any(r["target"].strip() for r in rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text(GEN_YAML.format(data=_jsonl(tmp_path / "gen.jsonl", rows)))
    out = tmp_path / "out.json"
    assert main(["eval", "--load", str(tiny_llama_ckpt), "--seq-length", "64",
                 "--max-windows", "1", "--lm-eval",
                 "local_greedy", "--lm-eval-include", str(tasks), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["lm_eval"]["local_greedy"]["exact_match,none"] == 1.0
