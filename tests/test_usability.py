"""What a new user meets first: budgets written as people write them, errors that say what to do
next in one line, Ctrl-C, and files colleagues can read."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from megatron_minitron.cli import main
from tests.conftest import ROOT, child_env, fails, tiny_run_config, write_yaml


@pytest.mark.parametrize("text, value", [("95M", 95e6), ("4.5B", 4.5e9), ("95e6", 95e6),
                                         ("134,515,008", 134515008), ("0.7", 0.7), ("70%", 0.7)])
def test_parameter_budgets_read_as_people_write_them(text, value):
    from megatron_minitron.options import fraction_of, parse_size

    assert parse_size(text) == pytest.approx(value)
    assert fraction_of(parse_size(text), 1000) == pytest.approx(value * 1000 if value <= 1
                                                                else value)


def test_a_fractional_search_target_is_a_share_of_the_teacher(tiny_llama_ckpt):
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.search.space import enumerate_shapes

    teacher = mcore.read_meta(tiny_llama_ckpt).model
    shapes = enumerate_shapes(teacher, 0.7, 0.1, step=16)
    assert shapes and all(abs(c.params / (0.7 * teacher.num_parameters()) - 1) <= 0.1
                          for c in shapes)
    with pytest.raises(ValueError, match="fraction"):
        from megatron_minitron.options import parse_size

        parse_size("seventy percent")


def test_yaml_budget_with_a_suffix(tmp_path, tiny_llama_hf):
    from megatron_minitron.pipeline.config import load_config

    cfg = tiny_run_config(tmp_path, tiny_llama_hf, search={"target_params": "100K"})
    del cfg["prune"]
    assert load_config(write_yaml(tmp_path / "c.yaml", cfg)).search.target_params == 1e5


def test_errors_say_what_to_do_next(capsys, tiny_llama_hf, tiny_llama_ckpt, tmp_path):
    fails(capsys, ["prune", "--load", str(tiny_llama_ckpt), "--out", str(tmp_path / "p")],
           "no pruning target", "--target-ffn")
    assert not (tmp_path / "p").exists()
    fails(capsys, ["eval", "--load", str(tiny_llama_hf)], "Hugging Face",
           f"minitron convert {tiny_llama_hf} CKPT")
    fails(capsys, ["generate", "--load", str(tiny_llama_ckpt), "--prompt", ""], "prompt is empty")


def test_outputs_honour_the_umask(tiny_llama_ckpt, tmp_path):
    from megatron_minitron.data.demo import train_plays

    old = os.umask(0o022)
    try:
        scores = tmp_path / "s.safetensors"
        assert main(["importance", "--load", str(tiny_llama_ckpt), "--data",
                     str(train_plays()[1]), "--samples", "4", "--seq-length", "32",
                     "--depth-samples", "0", "--out", str(scores)]) == 0
        assert main(["prune", "--load", str(tiny_llama_ckpt), "--scores", str(scores),
                     "--target-ffn", "64", "--out", str(tmp_path / "p"), "--hf-out",
                     str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    for f in (scores, tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json",
              *(tmp_path / "p").rglob("*")):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == (0o755 if f.is_dir() else 0o644), (f, oct(mode))
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, tiny_llama_hf):
    """SIGINT in the middle of distillation (as Ctrl-C sends it): exit 130, one line, no staging
    directory left."""
    cfg = tiny_run_config(tmp_path, tiny_llama_hf, distill={"train_iters": 400})
    cmd = [sys.executable, "-m", "megatron_minitron.cli", "run",
           str(write_yaml(tmp_path / "c.yaml", cfg))]
    # A shell without job control starts background jobs with SIGINT ignored, and a process
    # that inherits SIG_IGN keeps it; the default disposition is what a terminal user has.
    p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "distill:" in line and "iterations" in line:
            break
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130, "".join(seen) + rest
    assert rest.strip().splitlines()[-1].startswith("minitron run: interrupted"), rest
    assert "Traceback" not in rest, rest
    assert not [x for x in (tmp_path / "run").rglob(".*.partial")]


def test_an_interrupt_swallowed_by_a_callback_stops_the_next_progress_tick():
    """Ctrl-C landing in a callback Python only prints (logging's at-fork hook, run when the
    checkpoint writer forks: seen in CI) is not lost: the loop's next tick raises it."""
    from megatron_minitron.runtime import interrupt
    from megatron_minitron.runtime.progress import Progress

    class SwallowsExceptions:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupt.install()
        SwallowsExceptions()
        with pytest.raises(KeyboardInterrupt):
            Progress("loop", 3).update(1)
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_a_checkpoint_write_is_raised_when_the_writer_is_done(
        tiny_llama_ckpt, tmp_path, monkeypatch, capfd):
    """The writer forks, and a Ctrl-C then lands in logging's at-fork hook, which prints a
    traceback and drops it (seen in CI). It is held until the write ends, then raised; the
    staging directory goes with it."""
    from megatron.core import dist_checkpointing

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.config import CheckpointMeta
    from megatron_minitron.runtime import interrupt
    from tests.conftest import load_in_process

    model, chunks = load_in_process(tiny_llama_ckpt)
    real_save, written = dist_checkpointing.save, []

    def save_with_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        written.append(real_save(*args, **kwargs))

    monkeypatch.setattr(dist_checkpointing, "save", save_with_ctrl_c)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    dst = tmp_path / "ckpt"
    try:
        interrupt.install()
        with pytest.raises(KeyboardInterrupt):
            mcore.save_checkpoint(chunks, CheckpointMeta(model=model), dst,
                                  mcore.tokenizer_files(tiny_llama_ckpt))
    finally:
        signal.signal(signal.SIGINT, before)
    assert written, "the interrupt cut the write short"
    assert not dst.exists() and not list(tmp_path.iterdir())
    assert "Traceback" not in capfd.readouterr().err


def test_megatron_flag_names_are_accepted():
    from megatron_minitron.cli import build_parser

    a = build_parser().parse_args(["distill", "--teacher", "T", "--student", "S", "--save", "R",
                                   "--data-path", "0.7", "A", "0.3", "B",
                                   "--valid-data-path", "V", "--lr-warmup-iters", "5",
                                   "--train-iters", "10"])
    assert (a.data, a.valid_data, a.warmup_iters) == (["0.7", "A", "0.3", "B"], ["V"], 5)


def test_prune_to_a_share_of_the_parameters_shows_its_plan_first(tiny_llama_ckpt, tmp_path,
                                                                capsys):
    """`--target-params 70% --dry-run` prints the shape it would write (hidden and MLP by one
    ratio) and writes nothing; without --dry-run it writes exactly that shape."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.demo import train_plays

    scores = tmp_path / "s.safetensors"
    assert main(["importance", "--load", str(tiny_llama_ckpt), "--data", str(train_plays()[1]),
                 "--samples", "4", "--seq-length", "32", "--depth-samples", "2",
                 "--out", str(scores)]) == 0
    capsys.readouterr()
    args = ["prune", "--load", str(tiny_llama_ckpt), "--scores", str(scores),
            "--target-params", "70%", "--target-layers", "3", "--out", str(tmp_path / "p")]
    assert main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "nothing written" in plan and "one ratio" in plan, plan
    assert not (tmp_path / "p").exists()
    assert main(args) == 0
    teacher, pruned = mcore.read_meta(tiny_llama_ckpt).model, mcore.read_meta(tmp_path / "p").model
    assert abs(pruned.num_parameters() / (0.7 * teacher.num_parameters()) - 1) <= 0.05
    assert pruned.hidden_size < teacher.hidden_size and pruned.num_layers == 3
    assert f"hidden {teacher.hidden_size} -> {pruned.hidden_size}" in plan, plan


def test_dry_run_states_the_data_parallel_batch(capsys):
    cfg = ROOT / "configs" / "nemotron4-15b-to-minitron-8b.yaml"
    assert main(["run", str(cfg), "--dry-run", "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "world 128 = tp 8 x pp 1 x data-parallel 16" in out, out
    assert "global batch 1152 = 16 data-parallel x micro-batch 1 x 72 accumulated" in out, out
    # held-out text absent on the planning machine is still planned as text, not a prefix
    evals = [ln for ln in out.splitlines() if "minitron eval" in ln]
    assert evals and all("--data /data/heldout/wiki.txt --out" in ln for ln in evals), evals


@pytest.mark.xdist_group("smollm2_scores")
def test_readme_recipe_on_smollm2(smol_gguf, tmp_path, capsys):
    """The README's "Prune your own model" commands, run as written on SmolLM2 (smaller
    calibration): a 70 % model, its HF export, and its held-out loss."""
    import json
    import shlex

    from megatron_minitron.data.demo import held_out_plays, train_plays

    text = (ROOT / "README.md").read_text().split("## Prune your own model")[1].split("\n## ")[0]
    lines = [ln.split("  # ")[0] for ln in text.split("```bash")[1].split("```")[0].splitlines()
             if ln.startswith("minitron ")]
    assert [ln.split()[1] for ln in lines] == ["convert", "importance", "prune", "prune", "eval"]
    sub = {"MODEL": str(smol_gguf), "TEXT": str(train_plays()[0]),
           "HELD_OUT": str(held_out_plays()[0]), "ckpt/": f"{tmp_path}/ckpt/",
           "hf/": f"{tmp_path}/hf/", "--samples 64": "--samples 8",
           "--max-windows 16": "--max-windows 2 --out " + str(tmp_path / "eval.json")}
    for line in lines:
        for k, v in sub.items():
            line = line.replace(k, v)
        start = time.time()
        assert main(shlex.split(line)[1:]) == 0, line
        print(f"{line.split()[1]}: {time.time() - start:.0f} s")
    teacher = json.loads((tmp_path / "ckpt/teacher/minitron.json").read_text())["model"]
    pruned = json.loads((tmp_path / "ckpt/pruned/minitron.json").read_text())["model"]
    from megatron_minitron.config import ModelConfig

    ratio = (ModelConfig.from_dict(pruned).num_parameters()
             / ModelConfig.from_dict(teacher).num_parameters())
    assert abs(ratio - 0.7) <= 0.035, ratio
    assert (tmp_path / "hf/pruned/model.safetensors").is_file()
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] < 8


def test_json_reports_for_scripts(tiny_llama_hf, tmp_path):
    import json

    from megatron_minitron.data.demo import train_plays

    ck, scores = tmp_path / "ck", tmp_path / "s.safetensors"
    assert main(["convert", str(tiny_llama_hf), str(ck), "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["model"]["hidden_size"] == 64
    assert main(["importance", "--load", str(ck), "--data", str(train_plays()[1]), "--samples",
                 "4", "--seq-length", "32", "--depth-samples", "2", "--out", str(scores),
                 "--json", str(tmp_path / "i.json")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["samples"] == 4
    assert main(["prune", "--load", str(ck), "--scores", str(scores), "--target-layers", "3",
                 "--target-ffn", "64", "--out", str(tmp_path / "p"), "--json",
                 str(tmp_path / "p.json")]) == 0
    rec = json.loads((tmp_path / "p.json").read_text())
    assert rec["written"] and len(rec["kept_layers"]) == 3 and rec["model"]["ffn_hidden_size"] == 64
    assert rec["parameters"][1] < rec["parameters"][0]


def test_the_budget_rule_finds_the_papers_shapes():
    """The --target-params rule, given the published sizes, picks the published widths:
    Minitron-8B from Nemotron-4 15B (hidden 4096, MLP 16384)."""
    from megatron_minitron.config import ModelConfig
    from megatron_minitron.prune.plan import width_for_params

    nemotron = ModelConfig("nemotron", 32, 6144, 24576, 48, 8, 128, 256000, rotary_percent=0.5)
    assert width_for_params(nemotron, 8.27e9) == (4096, 16384)
