"""Every verb under strict device mode (CPU runs that fail where CUDA or NCCL would) at TP=2 with
sequence parallelism and PP=2: `convert` reshards, and `minitron run` with a width search runs
importance, prune (per candidate), distill, eval and the final distillation, each on 2 torchrun
ranks. The per-verb distributed tests (importance, prune, distill, eval, tasks, search) run
strict too, DP=2 among them: `run_cli` sets the mode for every command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import _free_port, child_env, run_cli

LAYOUTS = {"tp2": ("--tp", "2", "--sequence-parallel"), "pp2": ("--pp", "2")}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_verb_in_strict_device_mode(layout, tiny_llama_ckpt, tmp_path):
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.demo import held_out_plays, train_plays

    flags = LAYOUTS[layout]
    resharded = tmp_path / "resharded"
    run_cli("convert", str(tiny_llama_ckpt), str(resharded), *flags, nproc=2)
    assert mcore.read_meta(resharded).fingerprint == mcore.read_meta(tiny_llama_ckpt).fingerprint
    parallel = {"tp": 2, "sequence_parallel": True} if layout == "tp2" else {"pp": 2}
    cfg = {"name": layout, "run_dir": str(tmp_path / "run"),
           "teacher": {"source": str(resharded)}, "parallel": parallel,
           "data": {"train": [str(train_plays()[1])], "valid": [str(held_out_plays()[0])]},
           "importance": {"samples": 4, "seq_length": 32, "depth_samples": 0},
           "search": {"target_params": 100000, "tolerance": 0.1, "candidates": 1,
                      "axes": ["hidden", "ffn"], "step": 16, "kd_tokens": 128,
                      "kd": {"global_batch_size": 4, "seq_length": 32, "eval_iters": 1}},
           "distill": {"train_iters": 2, "global_batch_size": 4, "seq_length": 32,
                       "eval_iters": 1},
           "eval": {"seq_length": 64, "max_windows": 4,
                    "tasks": ["perplexity"]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("run", str(tmp_path / "run.yaml"), nproc=2)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {"teacher", "pruned", "distilled"} <= set(report["models"]), report["models"].keys()
    assert report["models"]["distilled"]["loss"] > 0


# Production code with one device mistake put back, and the command that must then fail under
# strict mode: the batch left on the host where microbatches enter Megatron's schedule, and a
# host receive buffer in the pipeline broadcast of a result.
MUTATIONS = {
    "host batch": ("model/forward.py", "mb = to_device(next(data_iterator))",
                   "mb = next(data_iterator)", ("--tp", "2", "--sequence-parallel")),
    "host collective buffer": (
        "model/forward.py", "torch.zeros(shape, dtype=dtype, device=device())",
        "torch.zeros(shape, dtype=dtype)", ("--pp", "2")),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_strict_mode_fails_the_production_code_with_a_device_mistake_put_back(
        mutation, tiny_llama_ckpt, tmp_path):
    """The strict tests guard the package itself, not only examples of the mistakes: a copy of
    the package with one fix reverted fails `eval` at the layout that reaches it, and the same
    command passes on the package as it is."""
    import shutil

    from megatron_minitron.data.demo import held_out_plays
    from tests.conftest import ROOT

    path, fixed, broken, flags = MUTATIONS[mutation]
    shutil.copytree(ROOT / "megatron_minitron", tmp_path / "megatron_minitron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    source = tmp_path / "megatron_minitron" / path
    text = source.read_text()
    assert text.count(fixed) == 1, f"{path} no longer holds {fixed!r}: update MUTATIONS"
    source.write_text(text.replace(fixed, broken))
    args = ("eval", "--load", str(tiny_llama_ckpt), "--data", str(held_out_plays()[0]),
            "--seq-length", "32", "--max-windows", "2", *flags)
    assert run_cli(*args, nproc=2).returncode == 0
    # From the copy's directory (python -m puts the working directory first on the path).
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "megatron_minitron.cli", *args],
                       cwd=tmp_path, env=child_env(PYTHONPATH=str(tmp_path)), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "DeviceMistake" in r.stderr, r.stderr[-2000:]
    assert str(tmp_path / "megatron_minitron") in r.stderr  # the copy ran, not the checkout
