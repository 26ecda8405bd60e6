"""Run Megatron-LM's own training code (megatron/training, pretrain_gpt's builders) on one CPU.

Shared by make_fixture.py and load_check.py, which are run by hand:

    PYTHONPATH=/path/to/Megatron-LM .venv/bin/python tests/assets/megatron_lm/<script>.py \
        --megatron-lm /path/to/Megatron-LM ...

Everything that shapes a checkpoint (argument parsing and validation, global variables, process
groups, model building, save_checkpoint/load_checkpoint) is Megatron-LM's code from that tree.
This module only adds what a CPU-only, Transformer-Engine-free, Triton-free machine lacks; each
shim below says why it is needed.
"""

from __future__ import annotations

import os
import socket
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # /work/main: for megatron_minitron.runtime.cpu_compat

# Megatron-LM flags a CPU without NCCL, Apex, Transformer Engine or CUDA kernels needs.
CPU_ARGS = [
    "--distributed-backend", "gloo",          # default nccl
    "--no-gradient-accumulation-fusion",      # needs Apex's fused_weight_gradient_mlp_cuda
    "--no-masked-softmax-fusion",             # CUDA kernel
    "--no-bias-swiglu-fusion",                # jit-fused CUDA path
    "--no-rope-fusion",                       # needs Transformer Engine / Apex
    "--no-persist-layer-norm",                # Apex; WrappedTorchNorm asserts it is off
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(megatron_lm: str | Path) -> None:
    """Put the Megatron-LM tree first on sys.path and install the CPU shims (before any import of
    megatron.training)."""
    megatron_lm = Path(megatron_lm).resolve()
    for p in (str(REPO), str(megatron_lm)):  # megatron_lm ends up first
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    # Single process, world size 1: torch.distributed's env:// rendezvous (used by Megatron's
    # _initialize_distributed) reads these.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.pop("MINITRON_STRICT_DEVICE", None)  # the project's strict mode is for its tests

    # Shim 1: megatron/training/initialize.py imports
    # megatron.core.transformer.custom_layers.batch_invariant_kernels, which does `import triton`
    # at module level (Triton kernels for --batch-invariant-mode). Triton is not installed on this
    # CPU machine, so register a stand-in module exposing the one name initialize.py imports; it
    # fails loudly if --batch-invariant-mode were ever requested.
    name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
    try:
        import triton  # noqa: F401
    except ImportError:
        stub = types.ModuleType(name)

        def enable_batch_invariant_mode(*args, **kwargs):
            raise RuntimeError("--batch-invariant-mode needs Triton, which is not installed")

        stub.enable_batch_invariant_mode = enable_batch_invariant_mode
        sys.modules[name] = stub

    import megatron.core
    import torch

    core_file = Path(megatron.core.__file__).resolve()
    if megatron_lm not in core_file.parents:
        raise SystemExit(f"megatron.core comes from {core_file}, not from {megatron_lm}: "
                         f"run with PYTHONPATH={megatron_lm}")

    if torch.cuda.is_available():
        return
    # Shim 2: the project's CPU shim for Megatron-Core (megatron_minitron/runtime/cpu_compat.py):
    # routes device="cuda" tensor factories and .cuda() to the CPU, makes torch.cuda.synchronize /
    # current_device / current_stream answer on CPU, and installs a CPU-forking RNG tracker as
    # Megatron's CUDA RNG tracker (used by model_parallel_cuda_manual_seed and param init).
    from megatron_minitron.runtime import cpu_compat

    cpu_compat.apply()

    # Shim 3: training.get_model wraps chunks in DDP inside `torch.cuda.stream(torch.cuda.Stream())`
    # and synchronises with `torch.cuda.current_stream().wait_stream(...)`; a CPU build of torch
    # cannot create CUDA streams. On one CPU everything is ordered already: a host stream class
    # (cpu_compat's, no-op waits; a class, since libraries annotate `torch.cuda.Stream | None`)
    # and a null context stand in.
    class CpuStream(cpu_compat._HostStream):
        def __init__(self, *args, **kwargs):
            pass

    torch.cuda.Stream = CpuStream
    torch.cuda.stream = lambda stream=None: _NullContext()

    # Shim 4: checkpointing.get_rng_state (called by save_checkpoint even with --no-save-rng, whose
    # result is then dropped from the state dict) calls torch.cuda.get_rng_state(), which raises on
    # a CPU build. Answer with the CPU generator's state (never written: --no-save-rng).
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def initialize(argv: list[str]) -> types.SimpleNamespace:
    """Megatron-LM's initialize_megatron for one CPU process: argv is parsed by Megatron's own
    parse_args (sys.argv is set to it), --use-checkpoint-args is applied by initialize_megatron,
    then validate_args, set_global_variables (tokenizer -> padded_vocab_size), logging and the
    rerun state machine; then torch.distributed (gloo), the model-parallel groups and the seeds.
    """
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.training import get_args
    from megatron.training import initialize as mlm_init

    sys.argv = [sys.argv[0], *argv]
    # allow_no_cuda: initialize_megatron asserts torch.cuda.is_available() otherwise.
    # skip_mpu_initialization: its finish_mpu_init only creates the model-parallel groups when
    # torch.cuda.device_count() > 0, so the same steps are done below explicitly.
    mlm_init.initialize_megatron(allow_no_cuda=True, skip_mpu_initialization=True)
    args = get_args()
    # torch.distributed.init_process_group(backend=args.distributed_backend (gloo), env://)
    mlm_init._initialize_distributed(None, None, None)
    mpu.initialize_model_parallel(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        create_gloo_process_groups=args.enable_gloo_process_groups,
    )
    mlm_init._set_random_seed(args.seed, args.data_parallel_random_init)
    # _set_random_seed seeds Megatron's RNG tracker only when torch.cuda.device_count() > 0; do it
    # here (the tracker is cpu_compat's CPU one).
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    assert torch.distributed.get_world_size() == 1
    return args
