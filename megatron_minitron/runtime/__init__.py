from megatron_minitron.runtime.distributed import Runtime, init_runtime

__all__ = ["Runtime", "init_runtime"]
