"""Heterogeneous students: each layer its own MLP width, attention kept or removed (Puzzle).

Megatron-Core describes such a model with `HeterogeneousTransformerConfig`, whose
`block_configs` JSON (the Llama-Nemotron / Nemotron-NAS `config.json` format) gives every
layer's attention and MLP; `TransformerBlock` then builds layer i with `get_config_for_layer(i)`.
We use that config as is, but keep our own layer spec (TE or local with `MinitronNorm`, the
family's plug-ins) and only swap a removed block, its norm and its residual add for identities:
Megatron's own heterogeneous spec would bring its own norms (no zero-centred gamma, no sequence
parallelism on CPU) and no family plug-ins.
"""

from __future__ import annotations

import dataclasses
import json

from megatron_minitron.config import ModelConfig


def block_configs(cfg: ModelConfig) -> list[dict]:
    """Each layer's attention and MLP in the `block_configs` format both Megatron-Core and
    Nemotron-NAS checkpoints read (explicit widths; `no_op` for a removed block)."""
    return [{"attention": {"no_op": not cfg.attention_of(i), "replace_with_linear": False,
                           "num_query_groups": None},
             "ffn": {"no_op": cfg.ffn_of(i) == 0, "replace_with_linear": False,
                     "ffn_hidden_size": cfg.ffn_of(i) or None}}
            for i in range(cfg.num_layers)]


def config_class(cfg: ModelConfig):
    """TransformerConfig, or Megatron's heterogeneous subclass for per-layer shapes."""
    if not cfg.heterogeneous:
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig
    from megatron.core.transformer.heterogeneous.heterogeneous_config import (
        HeterogeneousTransformerConfig,
    )

    return HeterogeneousTransformerConfig


def config_fields(cfg: ModelConfig) -> dict:
    if not cfg.heterogeneous:
        return {}
    return {"heterogeneous_layers_config_encoded_json":
            json.dumps({"block_configs": block_configs(cfg)})}


def layer_specs(cfg: ModelConfig, layer, config, vp_stage: int | None, n: int) -> list:
    """The `n` layer specs of this pipeline stage: `layer` itself, or with a heterogeneous model
    its removed blocks made identities (the residual stream passes through untouched)."""
    if not cfg.heterogeneous:
        return [layer] * n
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    out = []
    for i in range(offset, offset + n):
        drop = {}
        if not cfg.attention_of(i):
            drop.update(input_layernorm=IdentityOp, self_attention=IdentityOp,
                        self_attn_bda=IdentityFuncOp)
        if cfg.ffn_of(i) == 0:
            drop.update(pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
        out.append(dataclasses.replace(layer, submodules=dataclasses.replace(
            layer.submodules, **drop)) if drop else layer)
    return out
