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
