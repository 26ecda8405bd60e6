"""Run under torchrun (2 ranks) by test_runtime: process-group reuse and rank-0-first work.

The process group's timeout is 3 s; rank 0 then works alone for 8 s, ending in a device barrier
the way Megatron's dataset builder does. Each check prints `ok NAME`."""

import sys
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_minitron.config import ParallelConfig
from megatron_minitron.runtime.distributed import init_runtime, main_rank_first, shutdown


def main(cache: Path) -> None:
    parallel = ParallelConfig(distributed_timeout_minutes=0.05)
    init_runtime(parallel)
    groups = (parallel_state.get_tensor_model_parallel_group(),
              parallel_state.get_data_parallel_group())
    init_runtime(ParallelConfig(distributed_timeout_minutes=0.05))
    if groups == (parallel_state.get_tensor_model_parallel_group(),
                  parallel_state.get_data_parallel_group()):
        print("ok groups reused", flush=True)

    def build() -> int:  # Megatron's builder: rank 0 writes the cache, a barrier, the rest read
        if dist.get_rank() == 0 and not cache.exists():
            time.sleep(8)
            cache.write_text("index")
        dist.barrier()
        return len(cache.read_text())

    if main_rank_first(build) == 5:
        print("ok rank 0 first", flush=True)
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
