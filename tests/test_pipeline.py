"""`minitron run`: the whole pipeline end to end (tiny model and SmolLM2), stage caching, a run
killed during distillation continuing from its checkpoint, config validation before any work,
and the GPU configs' parameter counts against the published model sizes."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from megatron_minitron.cli import main
from tests.conftest import ROOT, child_env, tiny_run_config, write_yaml

# Published sizes (Hugging Face model cards / configs) of the GPU configs' teachers and students.
PUBLISHED = {
    "nemotron4-15b-to-minitron-8b.yaml": (15.6e9, 8.27e9),
    "nemotron4-15b-to-minitron-4b.yaml": (15.6e9, 4.19e9),
    "llama31-8b-to-4b-width.yaml": (8.03e9, 4.51e9),
    "llama31-8b-to-4b-depth.yaml": (8.03e9, 4.51e9),
    "mistral-nemo-12b-to-minitron-8b.yaml": (12.2e9, 8.41e9),  # MN-Minitron-8B
    "qwen3-8b-to-6b.yaml": (8.19e9, 6.0e9),  # Model Optimizer's Qwen3-8B -> 6B example
    # Nemotron-H-8B-Base-8K ("8B"; 8.10e9 for the shape Megatron-Bridge's provider gives) and
    # Nemotron-H-4B-Base-8K (4.49e9 summed over its safetensors)
    "nemotron-h-8b-to-4b.yaml": (8.10e9, 4.49e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gpu_config_dry_run_matches_the_published_size(name, capsys):
    assert main(["run", str(ROOT / "configs" / name), "--dry-run", "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    teacher, student = (float(line.split(":")[1].split("B")[0]) * 1e9 for line in
                        out.splitlines() if line.strip().startswith(("teacher ", "student ")))
    want_t, want_s = PUBLISHED[name]
    assert abs(teacher / want_t - 1) <= 0.007 and abs(student / want_s - 1) <= 0.007, out
    assert "distill" in out and "valid" in out


@pytest.mark.parametrize("override, key", [
    ({"prune": {"hiden": 3}}, "prune.hiden: unknown key"),
    ({"distill": {"lr": "fast"}}, "distill.lr: expected a number"),
    ({"prune": {"ffn": 5000}}, "prune: target ffn 5000 must be between 1"),
    ({"prune": {"heads": 3}}, "prune:"),
    ({"data": {"train": ["/no/such/file.txt"]}}, "data.train: /no/such/file.txt"),
    ({"teacher": {"source": "/no/such/model"}}, "teacher.source"),
    ({"distill": {"global_batch_size": 3, "micro_batch_size": 2}}, "distill:"),
    ({"parallel": {"precision": "fp8"}}, "unknown precision 'fp8'"),
    ({"search": {"target_params": 100000}}, "give a prune target or a search, not both"),
])
def test_bad_config_fails_before_any_work_naming_the_key(override, key, tiny_llama_hf, tmp_path,
                                                        capsys):
    cfg = write_yaml(tmp_path / "bad.yaml", tiny_run_config(tmp_path, tiny_llama_hf, **override))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_sequence_parallel_lengths_are_checked_before_any_work(tiny_llama_ckpt, tmp_path,
                                                              capsys):
    cfg = tiny_run_config(tmp_path, tiny_llama_ckpt, parallel={"tp": 2, "sequence_parallel": True},
                       distill={"seq_length": 33})
    assert main(["run", str(write_yaml(tmp_path / "sp.yaml", cfg)), "--dry-run",
                 "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "distill: seq_length 33 is not divisible by tensor parallel size 2" in err, err


def _stage_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_tiny_pipeline_killed_in_distill_continues_then_skips_finished_stages(
        tiny_llama_hf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="minitron")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_run_config(tmp_path, tiny_llama_hf))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_minitron", "run", str(cfg)],
                            env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill once a checkpoint is written
        if (run / "distill" / "latest").is_file():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode != 0, "the pipeline finished before it could be killed"
    done = {p.stem for p in (run / ".stages").glob("*.json")}
    assert {"convert", "importance", "prune"} <= done and "distill" not in done

    assert main(["run", str(cfg)]) == 0  # continues
    log = _stage_log(caplog)
    assert "stage prune: finished earlier, skipped" in log
    assert "stage distill (resuming)" in log and "resumed from" in log
    report = json.loads((run / "report.json").read_text())
    models = report["models"]
    assert list(models) == ["teacher", "pruned", "distilled"]
    assert models["teacher"]["parameters"] > models["pruned"]["parameters"] == \
        models["distilled"]["parameters"]
    assert models["pruned"]["shape"]["ffn_hidden_size"] == 64
    assert 0 <= models["distilled"]["tasks"]["shakespeare-next"]["acc"] <= 1
    for f in ("report.md", "params_vs_loss.png", "importance.png", "distill/loss.png",
              "hf/config.json"):
        assert (run / f).is_file(), f
    rows = [json.loads(x) for x in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == list(range(1, 7))

    markers = {p.name: p.read_text() for p in (run / ".stages").iterdir()}
    caplog.clear()
    assert main(["run", str(cfg)]) == 0  # nothing left to do
    assert {p.name: p.read_text() for p in (run / ".stages").iterdir()} == markers
    assert _stage_log(caplog).count("finished earlier, skipped") == len(markers)

    # A changed setting reruns its stage and those after it, nothing before.
    cfg = write_yaml(cfg, tiny_run_config(tmp_path, tiny_llama_hf, distill={"train_iters": 3}))
    caplog.clear()
    assert main(["run", str(cfg)]) == 0
    log = _stage_log(caplog)
    assert "stage prune: finished earlier" in log and "stage distill: minitron distill" in log
    assert "stage eval-distilled: minitron eval" in log
    assert (run / "distill" / "iter_0000003").is_dir()


def test_smollm2_pipeline_distilled_beats_pruned(smol_ckpt, tmp_path, capsys):
    """The demo's pipeline at a test's budget: the real model, real text, every stage after the
    GGUF conversion (the suite's converted SmolLM2 is the teacher)."""
    cfg = {"name": "smol", "run_dir": str(tmp_path / "run"),
           "teacher": {"source": str(smol_ckpt)},
           "importance": {"samples": 16, "seq_length": 64, "depth_samples": 0},
           "prune": {"ffn": 1024},
           "distill": {"train_iters": 4, "global_batch_size": 2, "seq_length": 64, "lr": 3e-4,
                       "eval_iters": 2},
           "eval": {"seq_length": 128, "max_windows": 4},
           "export": {"hf": False}}
    assert main(["run", str(write_yaml(tmp_path / "smol.yaml", cfg))]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "run" / "report.json").read_text())["models"]
    print(out)
    assert m["teacher"]["loss"] < m["distilled"]["loss"] < m["pruned"]["loss"], m
    assert m["pruned"]["parameters"] < m["teacher"]["parameters"]
    assert "distilled" in out and "perplexity" in out
