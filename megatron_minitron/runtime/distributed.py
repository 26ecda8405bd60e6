"""Process-group and Megatron parallel-state set-up for torchrun, srun and plain `python`.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; srun exports SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID and the node list. A single `python` process runs as world size 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_minitron.config import ConfigError, ParallelConfig
from megatron_minitron.runtime import children, cpu_compat

# Ranks waiting for rank 0's host-only work (tokenizing, Megatron's dataset indices) wait on a
# gloo group with this timeout, outside the NCCL watchdog's window (`host_barrier`).
HOST_WAIT = timedelta(days=1)
_host_group = None


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    parallel: ParallelConfig
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as `gpu[003-005,007],cpu1` -> `gpu003`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ConfigError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launch_env(env: dict | None = None) -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, init_method) from torchrun or SLURM variables."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", 0)), f"tcp://{addr}:{port}")
    # Plain `python`: a fresh port each time, so repeated runs in one process never collide.
    return 0, 1, 0, f"tcp://127.0.0.1:{_free_port()}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_device_index(local_rank: int, visible: int) -> int:
    """With one GPU bound per task (--gpus-per-task, cgroups) every rank sees only device 0."""
    return local_rank % visible


def init_runtime(parallel: ParallelConfig, seed: int = 1234) -> Runtime:
    """Initialise torch.distributed and Megatron's parallel state once per process."""
    cpu_compat.import_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    rank, world, local_rank, init_method = launch_env()
    if world % (parallel.tp * parallel.pp):
        raise ConfigError(f"world size {world} is not divisible by tp*pp = "
                          f"{parallel.tp}*{parallel.pp}")
    if world % (parallel.tp * parallel.ep * parallel.pp):  # experts are split over tp too
        raise ConfigError(f"world size {world} is not divisible by tp*ep*pp = "
                          f"{parallel.tp}*{parallel.ep}*{parallel.pp}")
    children.install()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_device_index(local_rank, torch.cuda.device_count()))
    else:
        cpu_compat.apply()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                init_method=init_method,
                                timeout=timedelta(minutes=parallel.distributed_timeout_minutes))
    global _host_group
    if _host_group is None and world > 1:
        _host_group = dist.new_group(backend="gloo", timeout=HOST_WAIT)
    # Consecutive stages at one layout (a pipeline, search candidates) keep the communicators:
    # NCCL's cost a collective each to create and GPU memory to hold.
    if _megatron_layout() != parallel.layout():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
            expert_model_parallel_size=parallel.ep,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return Runtime(rank, world, local_rank, parallel, device())


def _megatron_layout() -> tuple | None:
    """The layout Megatron's process groups were made for (ParallelConfig.layout's order)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size())


def device() -> torch.device:
    """Where models, batches and collective buffers live: this rank's GPU. On CPU the shim maps
    `cuda` to the CPU, so code is written once, for the GPU (and strict mode can check it)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", 0) if cpu_compat.applied() else torch.device("cpu")


def to_device(batch: dict) -> dict:
    """A microbatch's tensors on the device, as Megatron's `get_batch` does it: pinned host
    memory, non-blocking copies. Called where a microbatch enters the schedule."""
    dev = device()
    pin = torch.cuda.is_available()
    return {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(dev, non_blocking=pin)
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """A world barrier; nothing in a single process."""
    if dist.is_initialized():
        dist.barrier()


def host_barrier() -> None:
    """A world barrier for ranks that wait while rank 0 works on the host: over gloo with a day's
    timeout, so a long tokenization is not killed by NCCL's watchdog (`--distributed-timeout-
    minutes` bounds device collectives only). Nothing in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_host_group)


def main_rank_first(build):
    """`build()` on every rank, rank 0 first and alone. Megatron's dataset builder writes its
    index files on rank 0 while the other ranks wait in a device barrier, which NCCL's watchdog
    ends after the process group's timeout; a large corpus takes longer. So rank 0 builds alone
    first (the builder's barriers, which no other rank meets then, skipped) while the others wait
    on the host barrier, which has no such limit; then every rank builds, from rank 0's cache,
    through the builder's own barriers at no wait."""
    from unittest import mock

    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            with mock.patch.object(dist, "barrier", lambda *args, **kwargs: None):
                build()
        host_barrier()
    return build()


def shutdown() -> None:
    """Tear down what `init_runtime` set up; a no-op (and no Megatron import) if it never ran."""
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    global _host_group
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()
