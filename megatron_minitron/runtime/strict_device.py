"""Strict device mode: CPU runs that fail where CUDA and NCCL would.

Most sessions and CI have no GPU, and on CPU every tensor lives on the same device, so a batch left
on the host or a host buffer handed to a collective goes unnoticed until a GPU run. With
`MINITRON_STRICT_DEVICE=1` (tests set it; only without CUDA) the CPU shim tracks which tensors
*would* be on the GPU:

- device tensors: model parameters, every tensor created for `"cuda"` (which the shim redirects
  to the CPU) or with the `.device` of a device tensor (reported as `cuda:0` here, as on a GPU),
  and every result of an op that reads a device tensor;
- host tensors: everything else (data from disk or numpy, `torch.tensor(...)`, factories without
  a device, `.cpu()` results).

Then, as CUDA does, an op that mixes a device tensor with a host tensor raises (except copies, a
host index into a device tensor, and 0-d host scalars in pointwise ops), and, as NCCL does, a
collective on a non-gloo group given a host tensor raises. Groups created with `backend="gloo"`
(Megatron's host-metadata groups) take host tensors, as they do on a GPU cluster.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ENV = "MINITRON_STRICT_DEVICE"
_MARK = "_minitron_on_device"
DEVICE_GETTER = torch._C.TensorBase.device
REPORTED = torch.device("cuda", 0)
# What the CPU shim returns for `torch.cuda.current_device()`: a CPU device, so factories work
# even in backward passes (where no TorchFunctionMode runs), but one that the tracker can tell
# from a plain host allocation (`cpu` has no index).
GPU_ON_CPU = torch.device("cpu", 0)

aten = torch.ops.aten
# Ops that move data between host and device (allowed to mix; the result's place is decided by
# the op): copies into a destination, and host index tensors into a device tensor; 0-d host scalars
# are allowed there and in pointwise ops.
_COPIES = {aten.copy_.default, aten._to_copy.default, aten.copy.default,
           aten._copy_from_and_resize.default, aten.set_.source_Tensor}
_INDEXING = {aten.index.Tensor: (0,), aten.index_put_.default: (0, 2),
             aten.index_put.default: (0, 2), aten._index_put_impl_.default: (0, 2)}


class DeviceMistake(RuntimeError):
    """What CUDA or NCCL would have raised on a GPU."""


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def is_device(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or getattr(t, _MARK, False)


def mark(out):
    """Mark every tensor in `out` (a tensor or a nest of them) as living on the device."""
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            setattr(t, _MARK, True)
    return out


def unmark(t: torch.Tensor) -> torch.Tensor:
    """A copy brought to the host."""
    setattr(t, _MARK, False)
    return t


def reported_device(t: torch.Tensor) -> torch.device:
    """`tensor.device` as a GPU run would report it."""
    return REPORTED if is_device(t) else DEVICE_GETTER.__get__(t)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


class _Tracker(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        target = kwargs.get("device")
        if target == GPU_ON_CPU:  # allocated on (or copied to) `torch.cuda.current_device()`
            return mark(out)
        if func in _COPIES:
            # A cast stays where its source is (autograd's backward of a cast passes the source's
            # real device, `cpu`, explicitly); `.cpu()` is unmarked by the shim's function mode.
            if func is aten._to_copy.default and is_device(args[0]):
                mark(out)
            return out
        checked = args
        if func in _INDEXING:  # x[host_index] is fine on a GPU; the values must match x
            checked = [args[i] for i in _INDEXING[func] if i < len(args)]
        tensors = [t for t in pytree.tree_leaves((checked, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(is_device(t) for t in tensors):
            if func in _INDEXING and is_device(args[0]):
                mark(out)
            return out
        scalars_ok = func in _INDEXING or torch.Tag.pointwise in func.tags
        host = [t for t in tensors if not is_device(t) and not (scalars_ok and t.dim() == 0)]
        if host:
            raise DeviceMistake(
                f"{func}: mixes device tensors with host tensor(s) "
                f"{', '.join(_describe(t) for t in host)}; on a GPU this raises 'Expected all "
                "tensors to be on the same device'")
        return mark(out)


_HOST_GROUPS: set = set()
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "reduce_scatter", "reduce", "send", "recv", "isend",
                "irecv", "all_to_all_single", "gather", "scatter")


def _check_collective(name: str, fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        if group is None or group not in _HOST_GROUPS:
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and not is_device(t):
                    raise DeviceMistake(
                        f"torch.distributed.{name} given host tensor {_describe(t)}; NCCL "
                        "accepts only tensors on the GPU")
        return fn(*args, **kwargs)

    return checked


def _batch_isend_irecv(fn):
    @functools.wraps(fn)
    def checked(ops):
        for op in ops:
            if op.group not in _HOST_GROUPS and not is_device(op.tensor):
                raise DeviceMistake(f"torch.distributed.batch_isend_irecv given host tensor "
                                    f"{_describe(op.tensor)}; NCCL accepts only GPU tensors")
        return fn(ops)

    return checked


def _new_group(fn):
    @functools.wraps(fn)
    def new_group(*args, **kwargs):
        group = fn(*args, **kwargs)
        if str(kwargs.get("backend", "")).lower() == "gloo" and group is not None:
            _HOST_GROUPS.add(group)
        return group

    return new_group


def apply() -> None:
    """Start tracking (once per process; the CPU shim calls this when `enabled()`)."""
    from torch.distributed import distributed_c10d

    for name in _COLLECTIVES:
        setattr(dist, name, _check_collective(name, getattr(dist, name)))
    for name in ("isend", "irecv"):  # P2POp accepts only these very functions: patch both names
        setattr(distributed_c10d, name, getattr(dist, name))
    dist.batch_isend_irecv = _batch_isend_irecv(dist.batch_isend_irecv)
    dist.new_group = _new_group(dist.new_group)
    _Tracker().__enter__()
