"""Distillation: the KD loss is exact, the teacher stays frozen, the trajectory is the same under
DP/TP/PP, a killed run resumes exactly, and KD recovers a pruned SmolLM2 better than CE."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_minitron.cli import main
from megatron_minitron.distill.losses import kd_loss, top_k_logits
from tests.conftest import ROOT, _free_port, _run, child_env, converted, run_cli, tiny_hf_dir


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_and_gradient_equal_full_vocabulary_reference(temperature):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    t = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 4
    ours = kd_loss(s, t, temperature)
    (grad,) = torch.autograd.grad((ours * torch.arange(7.0, dtype=torch.float64)).sum(), s)
    s2 = s.detach().clone().requires_grad_(True)
    ref = F.kl_div(F.log_softmax(s2 / temperature, -1), F.softmax(t / temperature, -1),
                   reduction="none").sum(-1) * temperature ** 2
    (ref * torch.arange(7.0, dtype=torch.float64)).sum().backward()
    assert (ours - ref).abs().max() <= 1e-10
    assert (grad - s2.grad).abs().max() <= 1e-10


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_kd_loss_renormalises_the_teacher_over_its_top_k(temperature):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(2, 5, 40, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    t = torch.randn(2, 5, 40, generator=g, dtype=torch.float64) * 4
    top = top_k_logits(t, 6)
    assert torch.equal(top.ids, t.topk(6, -1).indices)
    ours = kd_loss(s, top, temperature)
    (grad,) = torch.autograd.grad(ours.sum(), s)
    s2 = s.detach().clone().requires_grad_(True)
    masked = torch.full_like(t, float("-inf")).scatter(-1, top.ids, top.values)
    ref = F.kl_div(F.log_softmax(s2 / temperature, -1), F.softmax(masked / temperature, -1),
                   reduction="none").sum(-1) * temperature ** 2
    ref.sum().backward()
    assert (ours - ref).abs().max() <= 1e-10 and (grad - s2.grad).abs().max() <= 1e-10
    assert (ours - kd_loss(s, t, temperature)).abs().max() > 1e-3  # top-k is a different loss


def test_kd_loss_vocab_parallel_tp2():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "kd_worker.py")]
    _run(cmd, True)


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_ckpt, tmp_path_factory):
    """Teacher: tiny Llama (4 layers); student: its layers 0 and 2; train and validation data."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    d = tmp_path_factory.mktemp("distill")
    assert main(["prune", "--load", str(tiny_llama_ckpt), "--drop-layers", "1,3",
                 "--out", str(d / "student")]) == 0
    for name, files in (("train", train_plays()[:3]), ("valid", held_out_plays()[:1])):
        assert main(["preprocess", "--input", *map(str, files), "--tokenizer",
                     str(tiny_llama_ckpt), "--output-prefix", str(d / name)]) == 0
    return tiny_llama_ckpt, d


def _distill_args(setup, save: Path, iters: int = 3, *extra: str) -> list[str]:
    teacher, d = setup
    return ["distill", "--teacher", str(teacher), "--student", str(d / "student"), "--data",
            str(d / "train"), "--valid-data", str(d / "valid"), "--save", str(save),
            "--train-iters", str(iters), "--global-batch-size", "4", "--micro-batch-size", "1",
            "--seq-length", "32", "--lr", "1e-3", "--lm-weight", "0.5", "--eval-iters", "1",
            *extra]


def _losses(save: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def test_teacher_is_frozen_and_has_no_optimizer_state(tiny_setup, tmp_path):
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.distill.train import DistillConfig, Distiller

    teacher, d = tiny_setup
    dist = Distiller(teacher, d / "student", [str(d / "train")], tmp_path / "run",
                     DistillConfig(train_iters=2, global_batch_size=2, seq_length=32),
                     ParallelConfig(), [str(d / "valid")])
    before = [p.detach().clone() for p in dist.teacher[0].parameters()]
    student_before = [p.detach().clone() for p in dist.modules[0].parameters()]
    dist.train_step()
    optimized = {id(p) for group in dist.optimizer.param_groups for p in group["params"]}
    for p, b in zip(dist.teacher[0].parameters(), before, strict=True):
        assert p.grad is None and not p.requires_grad and id(p) not in optimized
        assert torch.equal(p, b)
    assert any(not torch.equal(p, b) for p, b in
               zip(dist.modules[0].parameters(), student_before, strict=True))


def test_loss_trajectory_is_the_same_under_dp_tp_and_pp(tiny_setup, tmp_path):
    assert main(_distill_args(tiny_setup, tmp_path / "single")) == 0
    ref = _losses(tmp_path / "single")
    assert len(ref) == 3
    for name, flags in (("dp2", ()), ("tp2", ("--tp", "2", "--sequence-parallel")),
                        ("pp2", ("--pp", "2"))):
        run_cli(*_distill_args(tiny_setup, tmp_path / name), *flags, nproc=2)
        got = _losses(tmp_path / name)
        for (i, a, ga), (j, b, gb) in zip(ref, got, strict=True):
            assert i == j and abs(a - b) <= 1e-5 and abs(ga - gb) <= 1e-4, (name, i, a, b)


def test_new_families_train_the_same_under_tp_sp(tmp_path):
    """q/k norms shared by heads on different TP ranks (Qwen3), post-norms on sequence-split
    tokens (Gemma 3): KD steps at TP2+SP equal one process, gradient norm included."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    for family in ("qwen3", "gemma3"):
        d = tmp_path / family
        teacher = converted(tiny_hf_dir(d / "hf", family, seed=7), d / "teacher")
        assert main(["prune", "--load", str(teacher), "--drop-layers", "1,3",
                     "--out", str(d / "student")]) == 0
        for name, files in (("train", train_plays()[:1]), ("valid", held_out_plays()[:1])):
            assert main(["preprocess", "--input", *map(str, files), "--tokenizer", str(teacher),
                         "--output-prefix", str(d / name)]) == 0
        setup = (teacher, d)
        assert main(_distill_args(setup, d / "single", 2)) == 0
        run_cli(*_distill_args(setup, d / "tp2", 2), "--tp", "2", "--sequence-parallel", nproc=2)
        for (i, a, ga), (j, b, gb) in zip(_losses(d / "single"), _losses(d / "tp2"),
                                          strict=True):
            assert i == j and abs(a - b) <= 1e-5 and abs(ga - gb) <= 1e-4, (family, i, a, b)


def _router(save: Path) -> list[float]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r["router"] for r in rows if "router" in r]


def test_moe_trains_the_same_under_dp2_and_ep2(tmp_path):
    """Mixtral (2 of 4 experts) as its own student, LM loss and a strong load-balancing loss on:
    the trajectory, gradient norm and logged router loss included, is one process's at DP=2 and
    at EP=2 (each rank holds two experts, whose gradients are reduced over the expert
    data-parallel group, here of one rank). The router loss moves the trajectory, and is
    neither applied nor logged at coefficient 0."""
    import shutil

    from megatron_minitron.data.demo import held_out_plays, train_plays

    d = tmp_path
    teacher = converted(tiny_hf_dir(d / "hf", "mixtral", seed=7), d / "teacher")
    shutil.copytree(teacher, d / "student")
    for name, files in (("train", train_plays()[:1]), ("valid", held_out_plays()[:1])):
        assert main(["preprocess", "--input", *map(str, files), "--tokenizer", str(teacher),
                     "--output-prefix", str(d / name)]) == 0
    setup = (teacher, d)
    balance = ("--moe-aux-loss-coeff", "0.5")
    assert main(_distill_args(setup, d / "single", 3, *balance)) == 0
    ref, router = _losses(d / "single"), _router(d / "single")
    assert len(ref) == 3 and ref[0][2] > 0 and len(router) == 3 and min(router) > 0
    for name, flags in (("dp2", ()), ("ep2", ("--ep", "2"))):
        run_cli(*_distill_args(setup, d / name, 3, *balance), *flags, nproc=2)
        for (i, a, ga), (j, b, gb) in zip(ref, _losses(d / name), strict=True):
            assert i == j and abs(a - b) <= 1e-5 and abs(ga - gb) <= 1e-4, (name, i, a, b)
        assert _router(d / name) == pytest.approx(router, abs=1e-6), name
    assert main(_distill_args(setup, d / "off", 3, "--moe-aux-loss-coeff", "0")) == 0
    assert _router(d / "off") == [] and abs(_losses(d / "off")[-1][1] - ref[-1][1]) > 1e-4


def test_killed_run_resumes_exactly(tiny_setup, tmp_path, capsys):
    assert main(_distill_args(tiny_setup, tmp_path / "straight", 6)) == 0
    args = _distill_args(tiny_setup, tmp_path / "killed", 6, "--save-interval", "2")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_minitron.cli", *args],
                            env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once iteration 3 is logged
        if metrics.exists() and '"iteration": 3,' in metrics.read_text():
            # A second command on the same --save refuses while the first one runs.
            assert main(args) == 2 and "is in use by process" in capsys.readouterr().err
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert (tmp_path / "killed" / "latest").read_text() == "iter_0000002"
    assert (tmp_path / "killed" / ".lock").is_file()  # left by the killed run: stale
    assert main(args) == 0  # takes the stale lock over and resumes from iteration 2
    assert not (tmp_path / "killed" / ".lock").exists()
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert [r[0] for r in resumed] == list(range(1, 7))
    for (i, a, _), (_, b, _) in zip(straight, resumed, strict=True):
        assert abs(a - b) <= 1e-6, (i, a, b)


@pytest.mark.skipif(
    tuple(int(x) for x in __import__("megatron.core").core.__version__.split(".")[:2]) < (0, 16),
    reason="megatron-core 0.15's distributed-optimizer save asserts on torch Adam's 0-d step "
           "(no TE/apex, as on CPU); tested on 0.16.1")
def test_distributed_optimizer_resumes_after_sigkill_and_preemption_at_dp2(tiny_setup, tmp_path):
    """Megatron's distributed optimizer (on by default on GPUs) at DP=2: its checkpoint is written
    in a format named in the checkpoint (Megatron's default one can no longer be written), and a
    run SIGKILLed right after its iteration-2 checkpoint, or warned of a preemption, resumes to
    the same per-iteration losses as an uninterrupted one."""
    args = [*_distill_args(tiny_setup, tmp_path / "straight", 4, "--save-interval", "2"),
            "--use-distributed-optimizer"]
    run_cli(*args, nproc=2)
    killed = [a.replace("straight", "killed") for a in args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "kill_worker.py"), *killed]
    proc = subprocess.run(cmd, env=child_env(KILL_AT="renamed:killed/latest"),
                          start_new_session=True, capture_output=True, timeout=600)
    assert proc.returncode != 0
    assert (tmp_path / "killed" / "latest").read_text() == "iter_0000002"
    assert not (tmp_path / "killed" / "iter_0000004").exists()
    state = json.loads((tmp_path / "killed" / "iter_0000002" / "train_state.json").read_text())
    assert state["optimizer_format"]["distrib_optim_sharding_type"] == "dp_reshardable"
    run_cli(*killed, nproc=2)
    # SLURM's preemption warning (USR1) to rank 0 alone, after iteration 2, between checkpoints:
    # both ranks stop after that step with a checkpoint of it, and the rerun resumes from it.
    warned = [a.replace("straight", "warned") for a in args]
    warned[warned.index("--save-interval") + 1] = "0"
    cmd[cmd.index("--master_port") + 1] = str(_free_port())
    proc = subprocess.run([*cmd[:cmd.index(str(ROOT / "tests" / "kill_worker.py")) + 1], *warned],
                          env=child_env(KILL_AT="open:warned/metrics.jsonl:3", KILL_SIGNAL="USR1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "preempted; stopped after iteration 2" in proc.stderr
    assert (tmp_path / "warned" / "latest").read_text() == "iter_0000002"
    run_cli(*warned, nproc=2)
    straight = _losses(tmp_path / "straight")
    for name in ("killed", "warned"):
        resumed = _losses(tmp_path / name)
        assert [r[0] for r in resumed] == [1, 2, 3, 4], name
        for (i, a, ga), (_, b, gb) in zip(straight, resumed, strict=True):
            assert abs(a - b) <= 1e-6 and abs(ga - gb) <= 1e-5, (name, i, a, b, ga, gb)


def test_teacher_as_its_own_student_has_zero_kd_and_hidden_loss(tiny_setup, tmp_path):
    """The hooks pair each microbatch's teacher and student hidden states."""
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.distill.train import DistillConfig, Distiller

    teacher, d = tiny_setup
    dist = Distiller(teacher, teacher, [str(d / "train")], tmp_path / "run",
                     DistillConfig(train_iters=1, global_batch_size=2, seq_length=32,
                                   hidden_weight=1.0, eval_iters=2),
                     ParallelConfig(), [str(d / "valid")])
    val = dist.evaluate()
    assert abs(val["val_hidden"]) <= 1e-6 and abs(val["val_kd"]) <= 1e-6, val
    assert val["val_lm"] > 1.0
    dist.cfg.eval_iters = 0  # --eval-iters 0: no validation (it used to crash)
    assert dist.evaluate() == {}


def test_hidden_and_top_k_losses_are_the_same_under_tp_sp_and_pp(tiny_setup, tmp_path):
    """A hidden-pruned student (the loss maps the teacher's kept channels) trained on top-k KD
    plus the hidden-state loss follows one trajectory at TP1, TP2 with SP and PP2."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.demo import train_plays

    teacher, d = tiny_setup
    assert main(["importance", "--load", str(teacher), "--data", str(train_plays()[1]),
                 "--samples", "8", "--seq-length", "32", "--depth-samples", "2",
                 "--out", str(tmp_path / "scores.safetensors")]) == 0
    student = tmp_path / "narrow"
    assert main(["prune", "--load", str(teacher), "--scores", str(tmp_path / "scores.safetensors"),
                 "--target-hidden", "48", "--out", str(student)]) == 0
    channels = mcore.read_meta(student).hidden_map
    assert len(channels) == 48 and len(set(channels)) == 48 and max(channels) < 64

    def args(save: Path) -> list[str]:
        a = _distill_args((teacher, d), save)
        a[a.index("--student") + 1] = str(student)
        a[a.index("--lr") + 1] = "1e-4"
        return [*a, "--hidden-weight", "2", "--top-k", "16", "--eval-interval", "3"]

    assert main(args(tmp_path / "single")) == 0
    rows = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_hidden"] > 0.01 and rows[-1]["val_hidden"] < rows[0]["val_hidden"]
    ref = _losses(tmp_path / "single")
    for name, flags in (("tp2", ("--tp", "2", "--sequence-parallel")), ("pp2", ("--pp", "2"))):
        run_cli(*args(tmp_path / name), *flags, nproc=2)
        for (i, a, ga), (_, b, gb) in zip(ref, _losses(tmp_path / name), strict=True):
            assert abs(a - b) <= 1e-5 and abs(ga - gb) <= 1e-4, (name, i, a, b)


@pytest.mark.parametrize("error", ["ENOSPC", "EIO"])
def test_disk_failure_while_saving_keeps_the_last_checkpoint(error, tiny_setup, tmp_path):
    """The disk fails while iteration 3's checkpoint is written: one line, a non-zero exit,
    iterations 1 and 2 and `latest` intact, no staging directory left behind."""
    save = tmp_path / "run"
    r = _run([sys.executable, str(ROOT / "tests" / "fault_worker.py"),
              *_distill_args(tiny_setup, save, 4, "--save-interval", "1", "--keep-last", "3")],
             check=False, env={"FAULT_PATH": "iter_0000003", "FAULT_ERRNO": error})
    err = [line for line in r.stderr.splitlines() if line.startswith("minitron distill")]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert "iter_0000003" in err[0] and os.strerror(getattr(errno, error)) in err[0], err[0]
    assert (save / "latest").read_text() == "iter_0000002"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith(("iter_", ".iter"))) == \
        ["iter_0000001", "iter_0000002"]
    assert main(["eval", "--load", str(save / "iter_0000002"), "--seq-length", "32",
                 "--max-windows", "2"]) == 0


def _val_losses(save: Path) -> list[float]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r["val_kd"] for r in rows if "val_kd" in r]


def test_teacher_cache_gives_live_top_k_losses_and_needs_no_teacher_once_full(
        tiny_setup, tmp_path):
    """The first run fills the cache with what live top-k KD computes; a second run, and runs
    at DP=2 and PP=2, read it back and follow the same trajectory without the teacher's
    weights."""
    import shutil

    teacher, d = tiny_setup
    cache = tmp_path / "cache"
    args = lambda save: _distill_args(tiny_setup, save, 3, "--top-k", "16")  # noqa: E731
    assert main(args(tmp_path / "live")) == 0
    assert main([*args(tmp_path / "fill"), "--teacher-cache", str(cache)]) == 0
    assert len(list((cache / "train").rglob("*.safetensors"))) == 3 * 4
    # A teacher without its weight shards: loading it would fail; a full cache never loads it.
    hollow = tmp_path / "hollow_teacher"
    shutil.copytree(teacher, hollow, ignore=shutil.ignore_patterns("*.distcp"))
    hollow_args = lambda save: [  # noqa: E731
        *[str(hollow) if a == str(teacher) else a for a in args(save)],
        "--teacher-cache", str(cache)]
    assert main(hollow_args(tmp_path / "read")) == 0
    run_cli(*hollow_args(tmp_path / "read_dp2"), nproc=2)
    run_cli(*hollow_args(tmp_path / "read_pp2"), "--pp", "2", nproc=2)
    ref, ref_val = _losses(tmp_path / "live"), _val_losses(tmp_path / "live")
    for name in ("fill", "read", "read_dp2", "read_pp2"):
        tol = 1e-6 if name in ("fill", "read") else 1e-5  # 2 ranks sum in another order
        for (i, a, _), (_, b, _) in zip(ref, _losses(tmp_path / name), strict=True):
            assert abs(a - b) <= tol, (name, i, a, b)
        for a, b in zip(ref_val, _val_losses(tmp_path / name), strict=True):
            assert abs(a - b) <= tol, (name, a, b)


def test_teacher_cache_for_other_settings_or_data_is_refused(tiny_setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tests.conftest import fails

    cache = tmp_path / "cache"
    args = lambda save, *x: _distill_args(tiny_setup, save, 1, "--top-k", "16",  # noqa: E731
                                          "--teacher-cache", str(cache), *x)
    fails(capsys, _distill_args(tiny_setup, tmp_path / "a", 1, "--teacher-cache", str(cache)),
          "--top-k")
    assert main(args(tmp_path / "fill")) == 0
    fails(capsys, [*args(tmp_path / "k8"), "--top-k", "8"], str(cache), "top_k", "--teacher-cache")
    fails(capsys, [*args(tmp_path / "seq"), "--seq-length", "16"], "seq_length", "data")
    first = next((cache / "train").rglob("*.safetensors"))
    entry = load_file(first)
    entry["tokens"] = entry["tokens"].flip(0).contiguous()
    save_file(entry, str(first))
    fails(capsys, args(tmp_path / "tokens"), "holds other tokens")
    first.write_bytes(b"not a safetensors file")
    fails(capsys, args(tmp_path / "corrupt"), str(first), "unreadable")
    assert not (tmp_path / "corrupt" / "latest").exists()
