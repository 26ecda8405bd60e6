"""Hybrid Mamba-Transformer models (Nemotron-H) on Megatron-Core's `MambaModel`.

Megatron-Core ships only a Transformer Engine spec for `MambaModel` (its stack's final norm is a
`TENorm` even there). `local_stack_spec` is the same stack on Megatron's own parallel linears and
`MinitronNorm`, so that it builds without TE: a Mamba layer is norm -> mixer, an attention layer
norm -> self-attention (no position embedding, as Nemotron-H), an MLP layer norm -> MLP. The
layer kinds come from the pattern string both Megatron and transformers use: `M` Mamba, `*`
attention, `-` MLP (`E`, MoE, is refused for now). On a GPU without `mamba_ssm`, and on CPU,
`runtime.mamba_cpu` stands in for the SSD kernels.
"""

from __future__ import annotations

import dataclasses

import torch

# transformers' layer type names -> Megatron's pattern symbols.
HF_LAYER_TYPES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                  "mlp": "-"}


def pattern_from_layer_types(layer_types: list[str]) -> str:
    """Megatron's `hybrid_override_pattern` from transformers' `layers_block_type`."""
    unknown = sorted(set(layer_types) - set(HF_LAYER_TYPES))
    if unknown:
        from megatron_minitron.config import ConfigError

        raise ConfigError(f"hybrid layer types {unknown} are not supported "
                          f"({', '.join(sorted(HF_LAYER_TYPES))})")
    return "".join(HF_LAYER_TYPES[t] for t in layer_types)


@dataclasses.dataclass(frozen=True)
class MambaShape:
    """A Mamba-2 mixer's shape: heads of `head_dim` channels, B/C shared by `groups` groups of
    heads, `state` channels of SSM state, a causal conv of `conv_kernel` taps."""

    heads: int
    head_dim: int
    groups: int
    state: int
    conv_kernel: int = 4
    chunk_size: int = 128


def local_stack_spec(shape: MambaShape):
    """`MambaStack` spec on Megatron's local layers with `MinitronNorm` (the final norm too); the
    mixer's conv width and scan chunk are spec parameters (not TransformerConfig fields)."""
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
        mixer=ModuleSpec(module=MambaMixer, params={"d_conv": shape.conv_kernel,
                                                    "chunk_size": shape.chunk_size},
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


def mamba_config_fields(shape: MambaShape) -> dict:
    """TransformerConfig's Mamba fields."""
    return dict(mamba_state_dim=shape.state, mamba_head_dim=shape.head_dim,
                mamba_num_groups=shape.groups, mamba_num_heads=shape.heads)


def nemotron_h_to_mcore(hf: dict[str, torch.Tensor], pattern: str, attention
                        ) -> dict[str, torch.Tensor]:
    """transformers' NemotronH tensors -> MambaModel's (local spec, TP=1). Attention's q, k, v
    fuse per query group as in a GPT layer (`attention` holds heads, groups and head size as a
    ModelConfig names them)."""
    from megatron_minitron.checkpoint.layout import fuse_qkv

    out = {"embedding.word_embeddings.weight": hf["model.embeddings.weight"],
           "decoder.final_norm.weight": hf["model.norm_f.weight"]}
    if "lm_head.weight" in hf:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i, kind in enumerate(pattern):
        s, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        if kind == "M":
            out[m + "norm.weight"] = hf[s + "norm.weight"]
            for name in ("in_proj.weight", "out_proj.weight", "conv1d.weight", "conv1d.bias",
                         "A_log", "D", "dt_bias", "norm.weight"):
                out[m + "mixer." + name] = hf[s + "mixer." + name]
        elif kind == "*":
            out[m + "input_layernorm.weight"] = hf[s + "norm.weight"]
            out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
                *(hf[s + f"mixer.{x}_proj.weight"] for x in "qkv"), attention)
            out[m + "self_attention.linear_proj.weight"] = hf[s + "mixer.o_proj.weight"]
        else:
            out[m + "pre_mlp_layernorm.weight"] = hf[s + "norm.weight"]
            out[m + "mlp.linear_fc1.weight"] = hf[s + "mixer.up_proj.weight"]
            out[m + "mlp.linear_fc2.weight"] = hf[s + "mixer.down_proj.weight"]
    return out
