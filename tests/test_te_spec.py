"""Transformer Engine's layer spec, checked on a machine without TE.

Megatron-Core builds its TE spec from a backend provider (`TESpecProvider`); swapped for one that
hands out CPU modules holding exactly the parameters of TE's classes, the real spec function
builds a model whose parameter names and sharded-state-dict keys are the TE model's. The one fact
written here is that table of TE's parameters (from Megatron-Core's and TE's source):

| TE class                        | parameters                                             |
|---------------------------------|--------------------------------------------------------|
| TELayerNormColumnParallelLinear | weight, layer_norm_weight (+ layer_norm_bias: LayerNorm) |
| TENorm (RMSNorm / LayerNorm)    | weight (+ bias: LayerNorm)                              |
| TEColumn/RowParallelLinear      | weight                                                  |
| every TE module                 | _extra_state (FP8 metadata, in the state dict)          |

Every family: the HF name map for TE names exactly the TE model's parameters, a checkpoint's keys
are the same under both specs (a CPU-written checkpoint loads into a TE model and back), and HF
weights imported into the TE model give the local model's logits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_hf_dir

FAMILIES = ["llama", "nemotron", "qwen3", "gemma3", "mixtral", "qwen3_moe", "qwen2_moe"]


def _stand_in_provider():
    """`TESpecProvider` with CPU modules of TE's parameter names (the table above)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_minitron.model.norm import MinitronNorm, apply_norm

    class ExtraState:  # TE modules save FP8 metadata as `_extra_state`
        def get_extra_state(self):
            return torch.empty(0)

        def set_extra_state(self, state):
            pass

    class TENorm(ExtraState, MinitronNorm):
        pass

    class TELayerNormColumnParallelLinear(ExtraState, ColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            kwargs.pop("tp_comm_buffer_name", None)
            super().__init__(input_size, output_size, config=config, **kwargs)
            norm = MinitronNorm(config, input_size)
            self.layer_norm_weight, self.layer_norm_bias = norm.weight, norm.bias
            self.norm_args = (config.normalization == "RMSNorm",
                              config.layernorm_zero_centered_gamma, config.layernorm_epsilon)

        def forward(self, x):
            return super().forward(apply_norm(x, self.layer_norm_weight, self.layer_norm_bias,
                                              *self.norm_args))

    local = LocalSpecProvider()

    class StandIn(TESpecProvider):
        def column_parallel_layer_norm_linear(self):
            return TELayerNormColumnParallelLinear

        def layer_norm(self, rms_norm=False, for_qk=False):
            return TENorm

        def grouped_mlp_modules(self, *args):
            return local.grouped_mlp_modules(False, False)

    for name in ("column_parallel_linear", "row_parallel_linear", "core_attention"):
        setattr(StandIn, name, getattr(LocalSpecProvider, name))
    return StandIn


def _keys(chunks) -> set[str]:
    """The keys the model's tensors have in a dist checkpoint."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_minitron.checkpoint import mcore

    sharded = mcore.sharded_state_dict(chunks)
    apply_factories(sharded)
    return {t.key for t in nested_values(sharded) if "_extra_state" not in t.key}


@pytest.mark.parametrize("family", FAMILIES)
def test_te_spec_names_and_checkpoint_keys_match_the_local_spec(family, tmp_path, tiny_tokens,
                                                                monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_minitron.checkpoint.convert import import_weights
    from megatron_minitron.checkpoint.layout import rules
    from megatron_minitron.checkpoint.sources import open_source
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import logits
    from megatron_minitron.runtime import init_runtime

    source = open_source(tiny_hf_dir(tmp_path / "hf", family, seed=7), "hf")
    cfg = source.config
    init_runtime(ParallelConfig())
    local = build_model(cfg, ParallelConfig(), torch.float32, te=False)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", _stand_in_provider(), raising=False)
    te = build_model(cfg, ParallelConfig(), torch.float32, te=True)

    te_params = {n for n, _ in te[0].named_parameters()}
    assert te_params == {r.mcore for r in rules(cfg, te=True)}, family
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_params
    assert any(k.endswith("_extra_state") for k in te[0].state_dict())
    assert _keys(te) == _keys(local), sorted(_keys(te) ^ _keys(local))[:4]

    import_weights(local, source, te=False)
    import_weights(te, source, te=True)
    torch.testing.assert_close(logits(te, tiny_tokens, 2), logits(local, tiny_tokens, 2),
                               rtol=0, atol=1e-5)


def test_te_spec_of_a_heterogeneous_student_matches_the_local_spec(tmp_path, tiny_tokens,
                                                                    monkeypatch):
    """Per-layer widths and removed attention under TE's spec: the removed blocks' fused norms
    go with them (TE fuses the input norm into linear_qkv), the HF name map names exactly the TE
    model's parameters, checkpoint keys equal the local spec's, and a checkpoint the local model
    wrote gives the same logits in the TE model."""
    import dataclasses

    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.checkpoint.layout import rules
    from megatron_minitron.checkpoint.sources import open_source
    from megatron_minitron.config import CheckpointMeta, ParallelConfig
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import logits
    from megatron_minitron.runtime import init_runtime

    source = open_source(tiny_hf_dir(tmp_path / "hf", "llama", seed=7), "hf")
    cfg = dataclasses.replace(source.config, layer_ffn=[96, 48, 0, 24],
                              layer_attention=[True, False, True, True])
    cfg.validate()
    init_runtime(ParallelConfig())
    local = build_model(cfg, ParallelConfig(), torch.float32, te=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in local[0].parameters():
            p.normal_(0, 0.1)
    mcore.save_checkpoint(local, CheckpointMeta(model=cfg, source="test"), tmp_path / "ckpt", {})
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", _stand_in_provider(), raising=False)
    te = build_model(cfg, ParallelConfig(), torch.float32, te=True)

    te_params = {n for n, _ in te[0].named_parameters()}
    assert te_params == {r.mcore for r in rules(cfg, te=True)}
    assert not any(n.startswith("decoder.layers.1.self_attention") for n in te_params)
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" not in te_params
    assert _keys(te) == _keys(local), sorted(_keys(te) ^ _keys(local))[:4]
    mcore.load_checkpoint(te, tmp_path / "ckpt")
    torch.testing.assert_close(logits(te, tiny_tokens, 2), logits(local, tiny_tokens, 2),
                               rtol=0, atol=1e-5)
