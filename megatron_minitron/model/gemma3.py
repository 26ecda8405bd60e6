"""Gemma 3 on Megatron-Core's GPT layer spec: the three things Megatron-Core 0.16.1 has no switch
for, plugged in through ModuleSpec (the layer, attention and MLP code stay Megatron's).

- Norms after attention and after the MLP, before the residual add: the output projections
  (`linear_proj`, `linear_fc2`) carry them as `post_layernorm`, so the layer's bias-dropout-add
  sees the normed output. Under sequence parallelism the norm sees this rank's tokens, like
  every other norm, and its gradient is reduced the same way.
- Sliding-window layers use their own RoPE base (10k against 1M for the global layers): their
  attention swaps the model's rotary table for its own, of the same length.
- Embeddings scaled by sqrt(hidden): `scale_embedding` hooks the embedding's output.
Which layers slide is `ModelConfig.window_layers`, handed to Megatron as `window_attn_skip_freq`.
"""

from __future__ import annotations

import math

import torch

from megatron_minitron.model.spec_compat import submodules, with_submodules


def with_post_norm(linear_cls, norm_cls):
    """`linear_cls` whose output goes through a norm over its (full, unsplit) output features."""

    class PostNormLinear(linear_cls):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = norm_cls(config=config, hidden_size=output_size,
                                           eps=config.layernorm_epsilon)

        def forward(self, x):
            out, bias = super().forward(x)
            return self.post_layernorm(out), bias

    PostNormLinear.__name__ = PostNormLinear.__qualname__ = f"PostNorm{linear_cls.__name__}"
    return PostNormLinear


def local_rope_attention(attention_cls):
    """`attention_cls` that, in sliding-window layers, applies RoPE with `local_rotary_base`."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.utils import is_layer_window_attention

    class LocalRopeAttention(attention_cls):
        def __init__(self, config, submodules, layer_number: int, local_rotary_base: float,
                     **kwargs):
            super().__init__(config, submodules, layer_number, **kwargs)
            self.local_rope = None
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                         layer_number):
                self.local_rope = RotaryEmbedding(config.kv_channels, rotary_percent=1.0,
                                                  rotary_base=local_rotary_base)

        def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
            if self.local_rope is not None and rotary_pos_emb is not None:
                rotary_pos_emb = self.local_rope(rotary_pos_emb.shape[0])
            return super().forward(hidden_states, attention_mask, *args,
                                   rotary_pos_emb=rotary_pos_emb, **kwargs)

    return LocalRopeAttention


def gemma3_spec(spec, local_rotary_base: float, norm_cls):
    """The GPT layer `spec` (local or TE) made Gemma 3's."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    sub = spec.submodules
    attn, mlp = sub.self_attention, sub.mlp
    attn = ModuleSpec(module=local_rope_attention(attn.module),
                      params={**attn.params, "local_rotary_base": local_rotary_base},
                      submodules=dataclasses.replace(
                          attn.submodules,
                          linear_proj=with_post_norm(attn.submodules.linear_proj, norm_cls)))
    mlp = with_submodules(mlp, linear_fc2=with_post_norm(submodules(mlp).linear_fc2, norm_cls))
    return dataclasses.replace(spec, submodules=dataclasses.replace(sub, self_attention=attn,
                                                                    mlp=mlp))


def scale_embedding(model, hidden_size: int) -> None:
    """Gemma multiplies embeddings by sqrt(hidden), rounded to the activations' dtype."""
    if getattr(model, "embedding", None) is None:
        return
    scale = math.sqrt(hidden_size)

    def hook(_module, _args, out: torch.Tensor) -> torch.Tensor:
        return out * torch.tensor(scale, dtype=out.dtype)

    model.embedding.register_forward_hook(hook)
