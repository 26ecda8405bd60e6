"""Hybrid Mamba-Transformer models (Nemotron-H) on Megatron-Core's `MambaModel`.

Megatron-Core ships only a Transformer Engine spec for `MambaModel` (its stack's final norm is a
`TENorm` even there). `local_stack_spec` is the same stack on Megatron's own parallel linears and
`MinitronNorm`, so that it builds without TE, and it is the spec on every machine for now: a
Mamba layer is norm -> mixer, an attention layer norm -> self-attention (no position embedding,
as Nemotron-H), an MLP layer norm -> MLP, by `ModelConfig.hybrid_pattern`. Without `mamba_ssm`
(CPU, or a GPU without it) `runtime.mamba_cpu` stands in for the SSD kernels.
"""

from __future__ import annotations

import torch

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig


def mamba_config_fields(cfg: ModelConfig) -> dict:
    """TransformerConfig's Mamba fields."""
    if not cfg.hybrid:
        return {}
    return dict(mamba_state_dim=cfg.mamba_state, mamba_head_dim=cfg.mamba_head_dim,
                mamba_num_groups=cfg.mamba_groups, mamba_num_heads=cfg.mamba_heads)


def local_stack_spec(cfg: ModelConfig):
    """`MambaStack` spec on Megatron's local layers with `MinitronNorm` (the final norm too); the
    mixer's conv width and scan chunk are spec parameters (not TransformerConfig fields)."""
    from megatron_minitron.runtime import mamba_cpu

    mamba_cpu.install()  # before Megatron's mixer is imported
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    from megatron_minitron.model.norm import MinitronNorm

    class LocalNormMambaStack(MambaStack):
        """Megatron's stack with its final norm built from our norm instead of `TENorm`."""

        def __init__(self, config, submodules, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = MinitronNorm(config, config.hidden_size,
                                               eps=config.layernorm_epsilon)

    mamba = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        norm=MinitronNorm,
        mixer=ModuleSpec(module=MambaMixer, params={"d_conv": cfg.mamba_conv_kernel,
                                                    "chunk_size": cfg.mamba_chunk_size},
                         submodules=MambaMixerSubmodules(
            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
        mamba_bda=get_bias_dropout_add))
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=MinitronNorm,
        self_attention=ModuleSpec(module=SelfAttention,
                                  params={"attn_mask_type": AttnMaskType.causal},
                                  submodules=SelfAttentionSubmodules(
                                      linear_qkv=ColumnParallelLinear,
                                      core_attention=DotProductAttention,
                                      linear_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=MinitronNorm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                            linear_fc2=RowParallelLinear)),
        mlp_bda=get_bias_dropout_add))
    return ModuleSpec(module=LocalNormMambaStack, submodules=MambaStackSubmodules(
        mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp))


def build_hybrid_model(cfg: ModelConfig, parallel: ParallelConfig, config,
                       layers_per_stage: list[int] | None) -> torch.nn.Module:
    """This rank's `MambaModel` (one pipeline stage: Megatron's hybrid stack has no virtual
    stages, and splits the layers evenly)."""
    from megatron.core import parallel_state
    from megatron.core.models.mamba import MambaModel

    if parallel.vpp or len(set(layers_per_stage or [0])) > 1:
        raise ConfigError(f"hybrid Mamba models take no virtual pipeline stages and no uneven "
                          f"layer split (Megatron's MambaStack splits layers evenly; here "
                          f"{layers_per_stage} per stage): prune them at PP=1, or drop as many "
                          "layers from each stage")
    model = MambaModel(
        config=config, mamba_stack_spec=local_stack_spec(cfg), vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        hybrid_override_pattern=cfg.hybrid_pattern, position_embedding_type="none",
        share_embeddings_and_output_weights=cfg.tie_embeddings)
    for layer in model.decoder.layers:
        norm = getattr(getattr(layer, "mixer", None), "norm", None)
        if norm is not None:  # split over TP by channel; megatron-core 0.15 does not mark it
            norm.weight.tensor_model_parallel, norm.weight.partition_dim = True, 0
    return model
