"""Forward hooks that turn activations into running sums as they pass (no activation is kept).

Sites, per transformer layer (Megatron-Core names):
- `ln_attn`, `ln_mlp`: outputs of the input LN and the pre-MLP LN. With TE's spec those norms are
  fused into `linear_qkv` / `linear_fc1`, so the norm is recomputed from the fused module's input
  and `layer_norm_weight`. Under sequence parallelism each TP rank sees s/tp tokens: the token
  sums are all-reduced over TP before the per-sample value is taken.
- `heads`: input of `linear_proj`, L2 over each head's kv_channels, for this TP rank's heads
  (the paper's activation metric).
- `heads_out`: each head's contribution to the residual, L2 of W_O[:, head] @ o_head: what the
  head writes, not how large its input to the projection is (exact per TP rank: each holds its
  heads' columns of W_O).
- `ffn`: input of `linear_fc2` (after the activation, and after the gate for SwiGLU), for this TP
  rank's neurons.
- block influence: 1 - cos(layer input, layer output) per token (ShortGPT), summed.
- `experts` (MoE layers, instead of `ffn`): per expert, the L2 norm of its routed output (already
  weighted by its routing probability) summed over the tokens it received, and from the router
  the tokens routed to it and the probability mass it got. Each rank scores its own experts
  (global numbers); an expert split over TP gives partial outputs, summed over TP first.
- `shared_ffn`: input of the shared expert's `linear_fc2` (Qwen2-MoE), as `ffn`.
- `mamba` (a hybrid's Mamba layers): input of the mixer's `out_proj` (after the gated norm), per
  channel, for this TP rank's heads; head and head-dimension scores are derived from it
  (prune.plan.mamba_scores). A Mamba layer's norm is its `ln_attn`; a hybrid's attention layers
  have no `ln_mlp` and its MLP layers no `ln_attn` or heads.
- `moe_ffn`: per expert and neuron, token sums of |x|, x, x^2 at the input of the expert's
  `linear_fc2`, over the tokens routed to it (its columns on each expert-TP rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_minitron.importance import stats
from megatron_minitron.model.norm import apply_norm
from megatron_minitron.runtime.distributed import device

# columns split across TP ranks; the others are replicated
TP_SPLIT_SITES = ("heads", "heads_out", "ffn", "shared_ffn", "mamba")


def decoder_layers(chunks):
    for chunk in chunks:
        yield from chunk.decoder.layers


def _present(module) -> bool:
    """False for the IdentityOp a hybrid's attention-only or MLP-only layer has in place of the
    other block."""
    from megatron.core.transformer.identity_op import IdentityOp

    return not isinstance(module, IdentityOp)


def _norm_site(layer, which: str):
    """(module, fused): the module whose output (local spec) or input (TE, fused) is the LN."""
    from megatron.core.transformer.identity_op import IdentityOp

    norm = layer.input_layernorm if which == "attn" else layer.pre_mlp_layernorm
    if not isinstance(norm, IdentityOp):
        return norm, False
    return (layer.self_attention.linear_qkv if which == "attn" else layer.mlp.linear_fc1), True


class ImportanceHooks:
    """Context manager: attach to every decoder layer of this rank's chunks; `reduce()` afterwards
    gives the whole model's sums on every rank."""

    def __init__(self, chunks):
        from megatron.core import parallel_state

        self.chunks = chunks
        self.config = chunks[0].config
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.sp = bool(self.config.sequence_parallel) and self.tp > 1
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.influence: dict[int, torch.Tensor] = {}  # [sum of 1 - cos, tokens]
        # per MoE layer [3, experts]: output L2 sums, tokens, probability mass
        self.experts: dict[int, torch.Tensor] = {}
        self.moe_ffn: dict[int, torch.Tensor] = {}  # per MoE layer [3, experts, expert width]
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> ImportanceHooks:
        for layer in decoder_layers(self.chunks):
            i = layer.layer_number - 1
            self._handles += [
                layer.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: self._keep_input(i, args, kwargs),
                    with_kwargs=True),
                layer.register_forward_hook(lambda m, args, out, i=i: self._add_influence(i, out)),
            ]
            if hasattr(layer, "mixer"):  # a hybrid's Mamba layer: norm -> mixer
                self._handles += [
                    layer.norm.register_forward_hook(
                        lambda m, args, out, i=i: self._add(i, "ln_attn", out, True)),
                    layer.mixer.out_proj.register_forward_pre_hook(
                        lambda m, args, i=i: self._add(i, "mamba", args[0], False))]
                continue
            attention, mlp = _present(layer.self_attention), _present(layer.mlp)
            for site, which in (("ln_attn", "attn"),) * attention + (("ln_mlp", "mlp"),) * mlp:
                module, fused = _norm_site(layer, which)
                if fused:
                    self._handles.append(module.register_forward_pre_hook(
                        lambda m, args, i=i, site=site: self._add_fused_norm(i, site, m, args[0])))
                else:
                    self._handles.append(module.register_forward_hook(
                        lambda m, args, out, i=i, site=site: self._add(i, site, out, True)))
            if mlp and hasattr(layer.mlp, "router"):
                self._hook_experts(i, layer.mlp)
                if layer.mlp.shared_experts is not None:
                    self._handles.append(
                        layer.mlp.shared_experts.linear_fc2.register_forward_pre_hook(
                            lambda m, args, i=i: self._add(i, "shared_ffn", args[0], False)))
            elif mlp:
                self._handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(
                    lambda m, args, i=i: self._add(i, "ffn", args[0], False)))
            if attention:
                self._handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
                    lambda m, args, i=i: self._add_heads(i, args[0], m.weight)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()

    def _hook_experts(self, i: int, moe) -> None:
        from megatron.core import parallel_state

        etp = parallel_state.get_expert_tensor_parallel_world_size()
        etp_group = parallel_state.get_expert_tensor_parallel_group()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        c = self.config
        self.experts[i] = torch.zeros(3, c.num_moe_experts, dtype=torch.float64, device=device())
        self.moe_ffn[i] = torch.zeros(stats.SEQ_SUMS, c.num_moe_experts, c.moe_ffn_hidden_size,
                                      dtype=torch.float64, device=device())

        def routed(expert: int, out) -> None:
            y = out[0].detach()
            if etp > 1:  # fc2 leaves its all-reduce to the token dispatcher
                y = y.clone()
                dist.all_reduce(y, group=etp_group)
            self.experts[i][0, expert] += y.float().norm(dim=-1).sum(dtype=torch.float64)

        def neurons(expert: int, x: torch.Tensor) -> None:
            width = x.shape[-1]  # this expert-TP rank's columns
            cols = slice(etp_rank * width, (etp_rank + 1) * width)
            self.moe_ffn[i][:, expert, cols] += stats.sequence_sums(x.reshape(-1, 1, width))[:, 0]

        def router(out) -> None:
            probs, routing_map = out
            self.experts[i][1] += routing_map.sum(0, dtype=torch.float64)
            self.experts[i][2] += probs.detach().sum(0, dtype=torch.float64)

        self._handles.append(moe.router.register_forward_hook(lambda m, a, out: router(out)))
        for j, expert in enumerate(moe.experts.local_experts):
            e = moe.local_expert_indices[j]
            self._handles += [
                expert.register_forward_hook(lambda m, a, out, e=e: routed(e, out)),
                expert.linear_fc2.register_forward_pre_hook(
                    lambda m, args, e=e: neurons(e, args[0]))]

    def _add(self, i: int, site: str, x: torch.Tensor, sequence_split: bool) -> None:
        sums = stats.sequence_sums(x)
        seq_length = x.shape[0]
        if sequence_split and self.sp:
            dist.all_reduce(sums, group=self.tp_group)
            seq_length *= self.tp
        v = stats.sample_sums(stats.per_sample(sums, seq_length))
        key = (site, i)
        self.sums[key] = self.sums[key] + v if key in self.sums else v

    def _add_fused_norm(self, i: int, site: str, module, x: torch.Tensor) -> None:
        c = self.config
        y = apply_norm(x, module.layer_norm_weight, getattr(module, "layer_norm_bias", None),
                       c.normalization == "RMSNorm", c.layernorm_zero_centered_gamma,
                       c.layernorm_epsilon)
        self._add(i, site, y, True)

    def _add_heads(self, i: int, x: torch.Tensor, w_o: torch.Tensor) -> None:
        s, b, _ = x.shape
        d = self.config.kv_channels
        per_head = x.reshape(s, b, -1, d)
        self._add(i, "heads", per_head.norm(dim=-1), False)
        out = torch.stack([(per_head[:, :, j] @ w_o[:, j * d:(j + 1) * d].t()).float().norm(dim=-1)
                           for j in range(per_head.shape[2])], dim=-1)
        self._add(i, "heads_out", out, False)

    def _keep_input(self, i: int, args, kwargs) -> None:
        self._inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _add_influence(self, i: int, out) -> None:
        x_in = self._inputs.pop(i).detach()
        x_out = (out[0] if isinstance(out, tuple) else out).detach()
        one_minus_cos = 1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
        t = torch.stack([one_minus_cos.sum(dtype=torch.float64),
                         torch.tensor(one_minus_cos.numel(), dtype=torch.float64,
                                      device=x_in.device)])
        self.influence[i] = self.influence[i] + t if i in self.influence else t

    def reduce(self, num_layers: int, widths: dict[str, int]) -> dict[str, torch.Tensor]:
        """Whole-model sums on every rank: each rank writes what only it holds into zero buffers
        (its layers; its TP columns; replicated sites from TP rank 0 only) and one all-reduce over
        the world adds pipeline stages, TP shards and data-parallel replicas together."""
        dev = device()
        out = {site: torch.zeros(num_layers, stats.SEQ_SUMS, 2, width, dtype=torch.float64,
                                 device=dev) for site, width in widths.items()}
        for (site, i), t in self.sums.items():
            if site in TP_SPLIT_SITES:
                c = t.shape[-1]
                out[site][i, ..., self.tp_rank * c:(self.tp_rank + 1) * c] = t
            elif self.tp_rank == 0:
                out[site][i] = t
        c = self.config
        if c.num_moe_experts:  # every rank's own experts; the router's tokens once per TP group
            from megatron.core import parallel_state

            first_etp = parallel_state.get_expert_tensor_parallel_rank() == 0
            out["experts"] = torch.zeros(num_layers, 3, c.num_moe_experts, dtype=torch.float64,
                                         device=dev)
            out["moe_ffn"] = torch.zeros(num_layers, stats.SEQ_SUMS, c.num_moe_experts,
                                         c.moe_ffn_hidden_size, dtype=torch.float64, device=dev)
            for i, t in self.experts.items():
                if first_etp:
                    out["experts"][i, 0] = t[0]
                if self.sp or self.tp_rank == 0:
                    out["experts"][i, 1:] = t[1:]
                out["moe_ffn"][i] = self.moe_ffn[i]  # zero but for this rank's experts and columns
        out["influence"] = torch.zeros(num_layers, 2, dtype=torch.float64, device=dev)
        for i, t in self.influence.items():
            if self.sp or self.tp_rank == 0:  # under SP each TP rank saw different tokens
                out["influence"][i] = t
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([t.flatten() for t in out.values()])
            dist.all_reduce(flat)
            parts = flat.split([t.numel() for t in out.values()])
            out = {k: p.view_as(t) for (k, t), p in zip(out.items(), parts, strict=True)}
        return {k: t.cpu() for k, t in out.items()}
