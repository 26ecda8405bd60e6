"""Megatron-Core's Mamba mixer without `mamba_ssm` and `causal_conv1d` (CPU, tests).

`megatron.core.ssm.mamba_mixer` calls three things from `mamba_ssm`, all Triton kernels that need
CUDA: the gated RMSNorm module, the chunked SSD scan (`mamba_chunk_scan_combined`) and the fused
conv + scan (`mamba_split_conv1d_scan_combined`, the training and evaluation path). Without them the
module still imports (with a MagicMock norm) but refuses to build a mixer. `install()` puts the
pure-PyTorch equivalents below in their place, only when `mamba_ssm` is absent; on a GPU with the
kernels nothing is touched. `causal_conv1d` needs nothing: Megatron falls back to `nn.Conv1d`.

The scan is the state space duality (SSD) form of Mamba-2 (Dao & Gu, arXiv 2405.21060): per head
h, state S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T and output y_t = S_t C_t + D_h x_t. Inside a
chunk of Q tokens it is computed as masked attention (quadratic in Q); between chunks the state is
carried by a loop over chunks. Everything runs in fp32, as the kernels accumulate.
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F


def segment_decay(a: torch.Tensor) -> torch.Tensor:
    """exp(sum of a over (s, t]) for t >= s, else 0: the decay from position s to t in a chunk.
    `a` [..., Q] -> [..., Q, Q] (t rows, s columns)."""
    cum = a.cumsum(-1)
    diff = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool, device=a.device).tril()
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, D: torch.Tensor | None = None,
             initial_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence over x [b, l, h, p] with dt [b, l, h] (already softplus'd and clamped),
    A [h], B and C [b, l, g, n] shared by h / g heads each, D [h] or [h, p]. Returns y [b, l, h, p]
    in fp32 and the final state [b, h, p, n]."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-length) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc, q = (length + pad) // chunk_size, chunk_size
    xs = x.view(b, nc, q, h, p)
    Bs, Cs = B.view(b, nc, q, h, n), C.view(b, nc, q, h, n)
    a = (dt * A.float()).view(b, nc, q, h).permute(0, 1, 3, 2)  # [b, c, h, q] log decay per step
    xdt = xs * dt.view(b, nc, q, h, 1)

    # Within each chunk: y_t = sum_{s <= t} decay(s -> t) (C_t . B_s) dt_s x_s.
    scores = torch.einsum("bcthn,bcshn->bchts", Cs, Bs) * segment_decay(a)
    y = torch.einsum("bchts,bcshp->bcthp", scores, xdt)

    # Between chunks: each chunk's contribution to the state at its end, carried forward.
    cum = a.cumsum(-1)
    to_end = torch.exp(cum[..., -1:] - cum)  # [b, c, h, q]
    chunk_states = torch.einsum("bchs,bcshn,bcshp->bchpn", to_end, Bs, xdt)
    state = (initial_states.float() if initial_states is not None
             else x.new_zeros(b, h, p, n))
    starts = []
    for c in range(nc):
        starts.append(state)
        state = torch.exp(cum[:, c, :, -1])[..., None, None] * state + chunk_states[:, c]
    start = torch.stack(starts, 1)  # [b, c, h, p, n]
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cs, start) * torch.exp(cum).permute(
        0, 1, 3, 2)[..., None]

    y = y.reshape(b, nc * q, h, p)[:, :length]
    if D is not None:
        y = y + x[:, :length] * (D.float() if D.dim() == 2 else D.float()[:, None])
    return y, state


def _dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool,
        limit: tuple[float, float]) -> torch.Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=limit[0], max=limit[1])


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float,
                   group_size: int, norm_before_gate: bool) -> torch.Tensor:
    """RMSNorm over groups of `group_size` channels, gated by silu(z) before (Nemotron-H, Megatron's
    default) or after the norm."""
    dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    groups = x.view(*x.shape[:-1], -1, group_size)
    x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).view(x.shape)
    x = x * weight.float()
    if z is not None and norm_before_gate:
        x = x * F.silu(z.float())
    return x.to(dtype)


class RMSNormGated(torch.nn.Module):
    """`mamba_ssm.ops.triton.layernorm_gated.RMSNorm`'s interface and parameter, in PyTorch."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.group_size = group_size or hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """`mamba_ssm`'s chunked scan for whole sequences (no packed or variable-length batches)."""
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("the CPU Mamba scan takes whole sequences only (no packing)")
    y, state = ssd_scan(x, _dt(dt, dt_bias, dt_softplus, dt_limit), A, B, C, chunk_size, D,
                        initial_states)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D,
                                     chunk_size, initial_states=None, seq_idx=None,
                                     dt_limit=(0.0, float("inf")), return_final_states=False,
                                     activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6,
                                     outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """`mamba_ssm`'s fused path: split z | xBC | dt, causal depthwise conv + silu on xBC, the scan
    gated by silu(z) (or the gated norm when its weight is given), then the optional projection."""
    if seq_idx is not None or initial_states is not None or return_final_states:
        raise NotImplementedError("the CPU Mamba scan takes whole sequences only (no packing)")
    if activation not in ("silu", "swish"):
        raise NotImplementedError(f"Mamba conv activation {activation!r}")
    nheads = A.shape[0]
    headdim = headdim or D.shape[-1]
    dim = nheads * headdim
    dstate = (zxbcdt.shape[-1] - 2 * dim - nheads) // (2 * ngroups)
    z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    length = xBC.shape[1]
    xBC = F.conv1d(xBC.transpose(1, 2), conv1d_weight.unsqueeze(1), conv1d_bias,
                   padding=conv1d_weight.shape[-1] - 1, groups=conv1d_weight.shape[0])
    xBC = F.silu(xBC[..., :length]).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    b = zxbcdt.shape[0]
    y, _ = ssd_scan(x.reshape(b, length, nheads, headdim), _dt(dt, dt_bias, True, dt_limit), A,
                    B.reshape(b, length, ngroups, dstate), C.reshape(b, length, ngroups, dstate),
                    chunk_size, D)
    y = y.reshape(b, length, dim)
    if rmsnorm_weight is None:
        y = y * F.silu(z.float())
    else:
        y = gated_rms_norm(y, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    y = y.to(zxbcdt.dtype)
    return y if outproj_weight is None else F.linear(y, outproj_weight, outproj_bias)


_TRITON_STATE_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def _without_triton_state_ops() -> None:
    """The mixer imports three Triton kernels that only dynamic-batching inference calls; without
    Triton they are stood in by functions that say so, and the module imports."""
    import importlib.util
    import types

    if importlib.util.find_spec("triton") is not None or _TRITON_STATE_OPS in sys.modules:
        return

    def needs_triton(*args, **kwargs):
        raise NotImplementedError("Megatron's dynamic-batching Mamba inference needs Triton")

    stub = types.ModuleType(_TRITON_STATE_OPS)
    stub.tensor_get_slice_after = stub.tensor_masked_update = stub.tensor_merge = needs_triton
    sys.modules[_TRITON_STATE_OPS] = stub


def install() -> bool:
    """Use the functions above in Megatron's mixer when `mamba_ssm` is absent. Returns whether it
    did. Megatron's `ExtendedRMSNorm` (the gated norm with a TP-sharded state dict) subclasses the
    missing kernel module; it is rebuilt on the PyTorch norm."""
    _without_triton_state_ops()
    from megatron.core import parallel_state
    from megatron.core.ssm import mamba_mixer
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    if getattr(mamba_mixer, "_minitron_cpu", False):
        return True
    if mamba_mixer.HAVE_MAMBA_SSM:
        return False

    groups_named = "tp_group" in inspect.signature(make_sharded_tensors_for_checkpoint).parameters

    class ExtendedRMSNorm(RMSNormGated):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """The weight split along its channels across TP ranks, as Megatron's (which names
            the process groups from 0.16 on)."""
            groups = dict(tp_group=parallel_state.get_tensor_model_parallel_group(),
                          dp_cp_group=(metadata or {}).get("dp_cp_group")) if groups_named else {}
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                sharded_offsets, **groups)

    mamba_mixer.RMSNormGated = RMSNormGated
    mamba_mixer.ExtendedRMSNorm = ExtendedRMSNorm
    mamba_mixer.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    mamba_mixer.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
    mamba_mixer.HAVE_MAMBA_SSM = True
    mamba_mixer._minitron_cpu = True
    return True
