"""SIGKILL at chosen points of every writer, then the same command again: it completes and its
output is identical to an uninterrupted run's. `minitron run` with a candidate search drives
every writer in turn (convert, preprocess, importance, a search candidate's prune, KD and result,
distill checkpoints, eval, HF export, stage markers, the report); each rerun kills the next point
(`tests/kill_worker.py`). Disk failures and bad inputs are in test_distill and test_errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_minitron.cli import main
from megatron_minitron.distill.report import read_metrics
from tests.conftest import ROOT, child_env, load_in_process, tiny_run_config, write_yaml

# (event, path text[, n]) in the order a run meets them; see kill_worker.py. Before, during and
# after the checkpoint write of convert; a write and its commit point for every other writer.
KILL_POINTS = [
    "open:convert.pending",                              # before any work
    "open:.teacher.partial/weights/",                    # during a checkpoint write
    "renamed:run/teacher",                               # checkpoint committed, marker not yet
    "renamed:data/train/train.bin",                      # between .bin and .idx
    "written:scores.safetensors",                        # written, not renamed
    "open:.pruned.partial/weights/",                     # a candidate's pruned checkpoint
    "renamed:result.json",                               # the first candidate's result
    "open:/distill/.iter_0000001.partial/",              # the second one's KD checkpoint
    "open:run/distill/.iter_0000004.partial/optimizer",  # the last checkpoint, mid-write
    "open:eval/.pruned.json.partial",                    # an evaluation's result
    "open:.hf.partial/config.json",                      # the HF export's weights written
    "open:export.json",                                  # the last stage's done marker
    "open:report.json",                                  # the report
]


def _config(tmp, source, name: str):
    cfg = tiny_run_config(tmp / name, source, distill={"train_iters": 4},
                          search={"target_params": 100000, "tolerance": 0.1, "candidates": 2,
                                  "step": 16, "kd_tokens": 128,
                                  "kd": {"global_batch_size": 4, "seq_length": 32,
                                         "eval_iters": 1}})
    del cfg["prune"]
    return write_yaml(tmp / f"{name}.yaml", cfg)


def _state(ckpt) -> dict[str, torch.Tensor]:
    from megatron_minitron.checkpoint import mcore

    return mcore.model_state_dict(load_in_process(ckpt)[1])


def _same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _killed_at(point: str, cfg) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_worker.py"), "run", str(cfg)],
                       env=child_env(KILL_AT=point), capture_output=True, text=True,
                       start_new_session=True, timeout=600)
    assert r.returncode == -9, f"{point}: not reached (exit {r.returncode}):\n{r.stderr[-3000:]}"


@pytest.fixture
def one_thread():
    """This process's maths as in the commands a test starts (OMP_NUM_THREADS=1), so that a run
    here and one in a subprocess agree to the bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_search_pipeline_killed_at_every_write_reruns_to_identical_output(
        tiny_llama_hf, tmp_path, capsys, one_thread):
    ref_cfg = _config(tmp_path, tiny_llama_hf, "reference")
    assert main(["run", str(ref_cfg), "--dry-run"]) == 0
    assert "search candidates" in capsys.readouterr().out
    assert main(["run", str(ref_cfg)]) == 0
    ref = tmp_path / "reference" / "run"
    best = json.loads((ref / "search" / "results.json").read_text())["best"]
    models = json.loads((ref / "report.json").read_text())["models"]
    assert models["distilled"]["parameters"] == models["pruned"]["parameters"] == best["params"]
    assert best["name"] in (ref / "search" / "ranking.md").read_text()

    cfg = _config(tmp_path, tiny_llama_hf, "killed")
    for point in KILL_POINTS:
        _killed_at(point, cfg)
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "killed" / "run"

    for ckpt in ("teacher", "search/best_pruned", "distill/iter_0000004"):
        _same_tensors(_state(ref / ckpt), _state(run / ckpt), ckpt)
    for f in ("importance/scores.safetensors", "hf/model.safetensors"):
        _same_tensors(load_file(ref / f), load_file(run / f), f)
    for f in ("data/train/train.bin", "data/train/train.idx", "hf/config.json"):
        assert (ref / f).read_bytes() == (run / f).read_bytes(), f

    def results(d):
        r = json.loads((d / "search" / "results.json").read_text())["ranking"]
        return [(c["name"], c["loss_pruned"], c["loss_kd"]) for c in r]

    def losses(d):
        return [{k: v for k, v in r.items() if "loss" in k or k.startswith("val")}
                for r in read_metrics(d / "distill")]

    assert results(ref) == results(run)
    assert losses(ref) == losses(run)
    for name in ("teacher", "pruned", "distilled"):
        f = f"eval/{name}.json"
        assert json.loads((ref / f).read_text())["tasks"] == \
            json.loads((run / f).read_text())["tasks"], f
    def models_of(d):
        m = json.loads((d / "report.json").read_text())["models"]
        return {k: {f: v for f, v in row.items() if f != "checkpoint"} for k, row in m.items()}

    assert models_of(ref) == models_of(run)
    assert not list(run.rglob(".*.partial")), "a staging name was left behind"
