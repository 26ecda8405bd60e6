"""Make Megatron-Core run on CPU (gloo) when CUDA is absent.

Megatron-Core assumes a GPU in a handful of places: buffers placed with
`torch.cuda.current_device()` or a literal `device="cuda"`, `.cuda()` calls, `pin_memory`,
`torch.cuda.synchronize`, and the CUDA RNG tracker. Rather than patching each call site (they
move between releases), this module
 1. routes every tensor-factory request for a CUDA device to the CPU with one TorchFunctionMode;
 2. makes `torch.cuda.synchronize` and `Tensor.cuda` CPU no-ops, and `torch.cuda.current_device()`
    answer `cpu:0`: a CPU device that factories accept even in backward passes (where no
    TorchFunctionMode runs) and that strict mode tells apart from a plain `cpu` allocation;
 3. installs an RNG tracker with the same interface that forks the CPU generator;
 4. lets gloo gather 0-d tensors (it rejects them; Megatron gathers scalars in a few places);
 5. reports CPU float tensors' `Tensor.type()` as `torch.cuda.*` (gradient clipping and the mixed
    precision optimizers assert on that string);
 6. answers `torch.cuda.current_stream()` with a host stream whose waits are no-ops (from
    megatron-core 0.19 the DDP gradient reduction waits on the current stream's events).
`apply()` is called once by the runtime and only when `torch.cuda.is_available()` is False; on a GPU
none of this is touched. Code is written for the GPU: it asks for `runtime.device()` (`cuda:0` here
too, redirected), so the strict device mode (`strict_device`, for tests) can tell the tensors a GPU
run would hold on the device from host tensors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_minitron.runtime import strict_device

_applied = False


def applied() -> bool:
    return _applied


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and (device.type == "cuda" or
                                                 device == strict_device.GPU_ON_CPU)


def _to_host(func, args, kwargs) -> bool:
    """`.cpu()` / `.to("cpu")` of a device tensor: on a GPU a copy to the host."""
    if func is torch.Tensor.cpu:
        return strict_device.is_device(args[0])
    if func is not torch.Tensor.to or not strict_device.is_device(args[0]):
        return False
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return target == "cpu" or target == torch.device("cpu")  # not GPU_ON_CPU (cpu:0)


class _CudaRequestsToCpu(TorchFunctionMode):
    def __init__(self, strict: bool):
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.strict and getattr(func, "__self__", None) is strict_device.DEVICE_GETTER:
            return strict_device.reported_device(args[0])
        if self.strict and _to_host(func, args, kwargs):
            return strict_device.unmark(func(*args, **{**kwargs, "copy": True})
                                        if func is torch.Tensor.to else args[0].clone())
        requested = _is_cuda(kwargs.get("device"))
        if requested:
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and any(_is_cuda(a) for a in args[1:]):
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
            requested = True
        if not (requested and self.strict):
            return func(*args, **kwargs)
        if func is torch.Tensor.to and not strict_device.is_device(args[0]):
            kwargs["copy"] = True  # host -> device is a copy on a GPU: the host tensor stays
        return strict_device.mark(func(*args, **kwargs))


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Megatron's tracker, forking torch's CPU generator instead of the CUDA one."""

        def add(self, name, seed):
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return mcore_random, CpuRNGStatesTracker


def _gloo_safe_all_gather_into_tensor(original):
    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if input_tensor.dim() == 0:
            input_tensor = input_tensor.reshape(1)
        return original(output_tensor, input_tensor, group=group, async_op=async_op)

    return all_gather_into_tensor


def _cuda_type_names(original):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name if "cuda" in name else name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _to_device(self, *args, **kwargs):
    """`Tensor.cuda()`: a no-op on CPU; under strict mode a host tensor's copy becomes device."""
    if not strict_device.enabled() or strict_device.is_device(self):
        return self
    return strict_device.mark(self.clone())


class _HostStream:
    """The one stream of a CPU: everything is already ordered."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def apply() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    strict = strict_device.enabled()
    _CudaRequestsToCpu(strict).__enter__()
    torch.cuda.current_device = lambda: strict_device.GPU_ON_CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _HostStream()
    torch.Tensor.cuda = _to_device
    dist.all_gather_into_tensor = _gloo_safe_all_gather_into_tensor(dist.all_gather_into_tensor)
    if strict:
        strict_device.apply()
    torch.Tensor.type = _cuda_type_names(torch.Tensor.type)
    mcore_random, tracker_cls = _cpu_rng_tracker_class()
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker_cls()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _applied = True


def import_megatron() -> None:
    """Import Megatron-Core, on a host without CUDA with its JIT fusions off. Megatron decorates
    its fused elementwise kernels with `torch.compile` as it imports them, and that decoration
    alone imports TorchDynamo and Inductor: 1.4 of the 2.2 s Megatron takes to import, paid by
    every rank of every launch, for kernels our CPU paths never call (their fusion flags follow
    Transformer Engine, see model/build.py). So `torch.compile` passes functions through while
    Megatron imports, and Megatron's own switch (`jit.disable_jit_fuser`) does the same for
    the modules it imports later. On a GPU this does nothing: the fusions stay compiled."""
    import sys

    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = _no_compile
    try:
        from megatron.core import jit

        if hasattr(jit, "disable_jit_fuser"):  # megatron-core >= 0.16
            jit.disable_jit_fuser()
        else:  # 0.15: the same switch, by hand
            jit.jit_fuser = _no_compile
    finally:
        torch.compile = compile_


def _no_compile(model=None, **_options):
    """`torch.compile`'s two call forms (`@torch.compile`, `@torch.compile(...)`), compiling
    nothing."""
    return model if model is not None else (lambda fn: fn)
