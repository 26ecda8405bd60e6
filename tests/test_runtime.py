from megatron_minitron.runtime.distributed import first_slurm_host, launch_env


def test_torchrun_environment_wins():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "1"}
    assert launch_env(env)[:3] == (3, 8, 1)


def test_srun_environment_gives_ranks_and_master_address():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_JOB_NODELIST": "gpu[012-015,020]", "SLURM_JOB_ID": "4242"}
    assert launch_env(env) == (5, 16, 5, f"tcp://gpu012:{20000 + 4242}")
    env["MASTER_ADDR"], env["MASTER_PORT"] = "head", "6000"
    assert launch_env(env)[3] == "tcp://head:6000"


def test_single_process_defaults():
    rank, world, local, init = launch_env({})
    assert (rank, world, local) == (0, 1, 0) and init.startswith("tcp://127.0.0.1:")


def test_first_slurm_host_forms():
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[1-4],b2") == "a1"
    assert first_slurm_host("dgx-[07,09]") == "dgx-07"


def test_strict_device_mode_catches_what_cuda_and_nccl_would(tmp_path):
    """A batch left on the host and a host buffer in a collective (the two mistakes that kept
    every verb off the GPU) raise under strict mode at TP=2 over 2 ranks; the fixes pass."""
    import sys

    from tests.conftest import ROOT, _free_port, _run

    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(_free_port()), str(ROOT / "tests" / "strict_worker.py")],
             check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("ok ") == 20, r.stdout


def test_device_follows_local_rank_modulo_visible_gpus():
    """One GPU bound per task (--gpus-per-task): every rank sees device 0."""
    from megatron_minitron.runtime.distributed import local_device_index

    assert [local_device_index(r, 8) for r in (0, 7)] == [0, 7]
    assert [local_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]


def test_stages_reuse_process_groups_and_ranks_wait_for_rank_0_without_a_timeout(tmp_path):
    """Two ranks, a 3 s collective timeout: a second runtime at the same layout keeps Megatron's
    groups, and rank 0's 8 s of host work (Megatron's dataset-index build) is waited for on
    the host barrier, not inside a device barrier the watchdog would end."""
    import sys

    from tests.conftest import ROOT, _free_port, _run

    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(_free_port()), str(ROOT / "tests" / "launch_worker.py"),
              str(tmp_path / "cache")], check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("ok groups reused") == 2 and r.stdout.count("ok rank 0 first") == 2


_IMPORT_PROBE = """
import sys, torch
from megatron_minitron.runtime.cpu_compat import import_megatron
torch.cuda.is_available = lambda: {cuda}
import_megatron()
from megatron.core import jit
import megatron.core.models.gpt
print(jit.jit_fuser is torch.compile, "torch._dynamo" in sys.modules, torch.compile.__module__)
"""


def test_megatron_imports_without_torch_compile_on_cpu_only():
    """Without CUDA, Megatron imports with its fusions off (no TorchDynamo imported: 1.4 s off
    every rank's start) and torch.compile is itself again afterwards; with CUDA nothing
    changes: the fusions stay compiled."""
    import subprocess
    import sys

    def probe(cuda: bool) -> str:
        return subprocess.run([sys.executable, "-c", _IMPORT_PROBE.format(cuda=cuda)],
                              capture_output=True, text=True, check=True).stdout.split()

    assert probe(False) == ["False", "False", "torch"]
    assert probe(True) == ["True", "True", "torch"]
