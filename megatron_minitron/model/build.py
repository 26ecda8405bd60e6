"""Build a Megatron-Core GPTModel (this rank's pipeline chunks) from a ModelConfig.

Transformer Engine's spec is used when TE imports and CUDA is present; otherwise the local spec with
`MinitronNorm` plugged in through the ModuleSpec (no fork of Megatron's layer code).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.model import heterogeneous
from megatron_minitron.model.hybrid import build_hybrid_model, mamba_config_fields
from megatron_minitron.model.spec_compat import submodules, with_submodules


@functools.cache
def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"swiglu": F.silu, "geglu": gelu_tanh, "squared_relu": squared_relu}


def pipeline_layout(layers_per_stage: list[int]) -> list[list[str]]:
    """Megatron's custom pipeline layout: virtual stage s (= vpp_rank * pp + pp_rank) holds
    `layers_per_stage[s]` decoder layers; the embedding is on the first, the loss on the last."""
    layout = [["decoder"] * n for n in layers_per_stage]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def _router_without_te() -> None:
    """Megatron-Core's router asks `te_general_gemm is not None`, a name moe_utils defines only
    when Transformer Engine imports: without TE, a NameError (0.16.1). None is what TE's absence
    means there, and picks the router's torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_config(cfg: ModelConfig) -> dict:
    """TransformerConfig's MoE fields. Experts are separate modules (SequentialMLP, no grouped
    GEMM), the layout import and pruning slice; tokens reach them by all-gather, the dispatcher
    that also runs over gloo (all-to-all does not on CPU). The load-balancing loss is the
    model's (`moe_aux_loss_coeff`); Megatron applies it only to a module in training mode with
    gradients on, so a teacher, importance and evaluation never see it."""
    if not cfg.moe:
        return {}
    extra = {}
    if cfg.moe_shared_ffn_hidden_size:
        extra["moe_shared_expert_intermediate_size"] = cfg.moe_shared_ffn_hidden_size
        if _config_has("moe_shared_expert_gate"):  # before 0.16 a spec parameter (layer_spec)
            extra["moe_shared_expert_gate"] = True
    # The router in fp32 whatever the weights' precision: bf16 logits (8 bits of mantissa) tie
    # and flip top-k choices between otherwise equal runs, and between TP layouts.
    if _config_has("moe_router_dtype"):
        extra["moe_router_dtype"] = "fp32"
    return dict(num_moe_experts=cfg.num_moe_experts, moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
                moe_router_topk=cfg.moe_router_topk,
                moe_router_pre_softmax=cfg.moe_router_pre_softmax,
                moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
                moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff else "none",
                moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, **extra)


def _config_has(field: str) -> bool:
    """Whether this Megatron-Core's TransformerConfig has `field` (MoE options came one by one)."""
    from megatron.core.transformer import TransformerConfig

    return field in {f.name for f in dataclasses.fields(TransformerConfig)}


def _gate_shared_expert(layer):
    """Megatron-Core before 0.16 takes the shared expert's sigmoid gate from its spec's params."""
    moe = submodules(layer).mlp
    if _config_has("moe_shared_expert_gate") or not hasattr(moe, "submodules"):
        return layer
    shared = dataclasses.replace(moe.submodules.shared_experts, params={"gate": True})
    mlp = dataclasses.replace(moe, submodules=dataclasses.replace(moe.submodules,
                                                                  shared_experts=shared))
    return with_submodules(layer, mlp=mlp)


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                       layers_per_stage: list[int] | None = None):
    t = cfg.traits
    return heterogeneous.config_class(cfg)(
        **heterogeneous.config_fields(cfg),
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=t.normalization,
        layernorm_zero_centered_gamma=t.zero_centered_gamma,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=t.gated,
        activation_func=ACTIVATIONS[t.activation],
        add_bias_linear=False,
        add_qkv_bias=t.qkv_bias,
        qk_layernorm=t.qk_norm,
        **moe_config(cfg),
        **mamba_config_fields(cfg),
        window_size=(cfg.sliding_window - 1, 0) if cfg.sliding_window else None,
        window_attn_skip_freq=cfg.window_layers,
        softmax_scale=cfg.softmax_scale,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        expert_model_parallel_size=parallel.ep,
        pipeline_model_parallel_layout=pipeline_layout(layers_per_stage)
        if layers_per_stage and parallel.pp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=False,  # no full-size master weights (CPU: cpu_compat places them)
        # Weights always come from a checkpoint, so initialisation is a no-op; but it must "run":
        # Megatron marks TP-sharded parameters (tensor_model_parallel, partition_dim) only there,
        # and gradient clipping and pruning need those marks.
        perform_initialization=True,
        init_method=_no_init,
        output_layer_init_method=_no_init,
        bias_activation_fusion=te_available() and t.activation == "swiglu",
        bias_dropout_fusion=te_available(),
        masked_softmax_fusion=te_available(),
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        # Contract at the fp32 accumulator so CPU and GPU logits are comparable.
        attention_softmax_in_fp32=True,
    )


def layer_spec(cfg: ModelConfig, config, vp_stage: int | None = None, te: bool = False):
    """This stage's decoder block: Megatron's TE layer spec (`te`) or its local spec with
    `MinitronNorm`. TE's norm class comes from the backend provider Megatron's TE spec uses, so
    the spec can be built (and its parameter names checked) on a machine without TE by swapping
    that provider (tests/test_te_spec.py)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_minitron.model.gemma3 import gemma3_spec

    if te:
        norm = specs.TESpecProvider().layer_norm()
        layer = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_moe_experts, moe_grouped_gemm=False,
            qk_layernorm=cfg.traits.qk_norm)
        if cfg.traits.post_norms:
            layer = gemma3_spec(layer, cfg.local_rotary_base or cfg.rotary_base, norm)
    else:
        from megatron_minitron.model.norm import MinitronNorm

        norm = MinitronNorm
        spec = specs.get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts,
                                              moe_grouped_gemm=False,
                                              qk_layernorm=cfg.traits.qk_norm)
        attn = spec.submodules.self_attention
        if cfg.traits.qk_norm:  # the local spec's q/k norm refuses sequence parallelism too
            attn = dataclasses.replace(attn, submodules=dataclasses.replace(
                attn.submodules, q_layernorm=MinitronNorm, k_layernorm=MinitronNorm))
        layer = dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, input_layernorm=MinitronNorm, pre_mlp_layernorm=MinitronNorm,
            self_attention=attn, sharded_state_dict_keys_map=local_keys_map(
                spec.submodules.sharded_state_dict_keys_map, cfg.moe)))
        if cfg.traits.post_norms:
            layer = gemma3_spec(layer, cfg.local_rotary_base or cfg.rotary_base, MinitronNorm)
    if cfg.moe_shared_ffn_hidden_size:
        layer = _gate_shared_expert(layer)
    # The final norm too: a bare layer spec would get Megatron's default, apex's or torch's norm,
    # which refuses zero-centred gamma and sequence parallelism.
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=heterogeneous.layer_specs(cfg, layer, config, vp_stage, n), layer_norm=norm)


def local_keys_map(keys_map: dict[str, str], moe: bool) -> dict[str, str]:
    """The local spec's checkpoint names, made TE's: Megatron-Core's local spec saves its norms
    under the names of TE's fused norms, but also an MoE layer's pre-MLP norm, which TE keeps
    as a module of its own (`pre_mlp_layernorm.weight`): a CPU-written MoE checkpoint would not
    load into a TE model. So for MoE that one entry goes."""
    return {k: v for k, v in keys_map.items() if not (moe and k == "pre_mlp_layernorm.")}


def build_model(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype | None = None,
                layers_per_stage: list[int] | None = None, te: bool | None = None
                ) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) on the device, in Megatron's list
    convention; `dtype` defaults to the run's precision. `layers_per_stage` overrides the even
    split (pruning keeps each layer on its stage); `te` the spec (TE where it runs)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_minitron.model.gemma3 import scale_embedding
    from megatron_minitron.runtime.distributed import device

    dtype = dtype or parallel.dtype()
    if cfg.moe:
        _router_without_te()
    cfg.check_parallel(parallel.tp, 1 if layers_per_stage else parallel.pp, parallel.ep)
    # MambaStack splits layers evenly itself (build_hybrid_model refuses another split)
    config = transformer_config(cfg, parallel, dtype, None if cfg.hybrid else layers_per_stage)
    if cfg.hybrid:
        model = build_hybrid_model(cfg, parallel, config, layers_per_stage)
        return [model.to(device())]
    chunks = []
    for vp in range(parallel.vpp or 1):
        vp_stage = vp if parallel.vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(cfg, config, vp_stage,
                                              te_available() if te is None else te),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_percent=cfg.rotary_percent,
            rotary_base=int(cfg.rotary_base),
            rope_scaling=cfg.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
        )
        if cfg.traits.scaled_embedding:
            scale_embedding(model, cfg.hidden_size)
        model.to(device())
        chunks.append(model)
    return chunks
