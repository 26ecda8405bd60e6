"""Pure layout functions: no Megatron process needed."""

import torch

from megatron_minitron.checkpoint.gguf_io import unpermute_qk
from megatron_minitron.checkpoint.layout import fuse_qkv, hf_to_mcore, mcore_to_hf, split_qkv
from megatron_minitron.config import ModelConfig


def _cfg(family="llama", tie=False):
    return ModelConfig(family=family, num_layers=2, hidden_size=16, ffn_hidden_size=24,
                       num_attention_heads=4, num_query_groups=2, kv_channels=4, vocab_size=32,
                       tie_embeddings=tie)


def test_qkv_rows_are_grouped_per_query_group():
    cfg = _cfg()
    q = torch.arange(16).repeat_interleave(1).reshape(16, 1).float().expand(16, 3)
    k = 100 + torch.arange(8).reshape(8, 1).float().expand(8, 3)
    v = 200 + torch.arange(8).reshape(8, 1).float().expand(8, 3)
    qkv = fuse_qkv(q, k, v, cfg)
    # group 0 = q heads 0,1 (rows 0..7), k_0 (rows 0..3), v_0; then group 1
    expected = torch.cat([q[:8], k[:4], v[:4], q[8:], k[4:], v[4:]])
    assert torch.equal(qkv, expected)
    q2, k2, v2 = split_qkv(qkv, cfg)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def _hf_state_dict(cfg):
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g),
          "model.norm.weight": torch.randn(16, generator=g)}
    if cfg.traits.normalization == "LayerNorm":
        sd["model.norm.bias"] = torch.randn(16, generator=g)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = torch.randn(32, 16, generator=g)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16),
                  "self_attn.v_proj.weight": (8, 16), "self_attn.o_proj.weight": (16, 16),
                  "mlp.up_proj.weight": (24, 16), "mlp.down_proj.weight": (16, 24),
                  "input_layernorm.weight": (16,), "post_attention_layernorm.weight": (16,)}
        if cfg.traits.gated:
            shapes["mlp.gate_proj.weight"] = (24, 16)
        if cfg.traits.normalization == "LayerNorm":
            shapes |= {"input_layernorm.bias": (16,), "post_attention_layernorm.bias": (16,)}
        for k, s in shapes.items():
            sd[p + k] = torch.randn(*s, generator=g)
    return sd


def test_hf_mcore_round_trip_is_exact_for_every_family_and_spec():
    for family in ("llama", "nemotron"):
        for tie in (False, True):
            cfg = _cfg(family, tie)
            hf = _hf_state_dict(cfg)
            for te in (False, True):
                back = mcore_to_hf(hf_to_mcore(hf, cfg, te=te), cfg, te=te)
                assert set(back) == set(hf)
                assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_swiglu_fc1_is_gate_then_up():
    cfg = _cfg()
    hf = _hf_state_dict(cfg)
    mc = hf_to_mcore(hf, cfg)
    fc1 = mc["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:24], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[24:], hf["model.layers.0.mlp.up_proj.weight"])


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(3 * 8, 5)
    n_head = 3
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, d/2, in).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


def test_parameter_count_formula_matches_smollm2_published_size():
    smol = ModelConfig(family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                       num_attention_heads=9, num_query_groups=3, kv_channels=64,
                       vocab_size=49152, tie_embeddings=True)
    assert smol.num_parameters() == 134_515_008


def test_spec_edits_keep_the_form_each_megatron_release_uses():
    """Up to megatron-core 0.16 a layer's MLP is a ModuleSpec; from 0.17 a functools.partial
    builder (0.19.2's source). The Gemma 3 spec edits either and returns the same form."""
    import functools

    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_minitron.model.spec_compat import submodules, with_submodules

    class Fc1:
        pass

    class Fc2:
        pass

    class PostNormFc2(Fc2):
        pass

    for spec in (ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=Fc1,
                                                                 linear_fc2=Fc2)),
                 functools.partial(MLP, submodules=MLPSubmodules(linear_fc1=Fc1,
                                                                 linear_fc2=Fc2), extra=1)):
        new = with_submodules(spec, linear_fc2=PostNormFc2)
        assert type(new) is type(spec)
        assert submodules(new).linear_fc2 is PostNormFc2 and submodules(new).linear_fc1 is Fc1
        assert submodules(spec).linear_fc2 is Fc2  # the original is untouched
        if isinstance(new, functools.partial):
            assert new.func is MLP and new.keywords["extra"] == 1
