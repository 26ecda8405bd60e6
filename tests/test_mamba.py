"""Mamba-2 layers of hybrid models (Nemotron-H) on CPU: Megatron-Core's own `MambaMixer`, its
`mamba_ssm` kernels replaced by `runtime/mamba_cpu.py`, against transformers' NemotronH mixer."""

from __future__ import annotations

import pytest
import torch


def _hf_mixer(heads: int, head_dim: int, groups: int, state: int, chunk: int, seed: int):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    cfg = NemotronHConfig(hidden_size=48, mamba_num_heads=heads, mamba_head_dim=head_dim,
                          n_groups=groups, ssm_state_size=state, chunk_size=chunk, conv_kernel=4,
                          layers_block_type=["mamba"], layer_norm_epsilon=1e-5)
    torch.manual_seed(seed)
    m = NemotronHMamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():  # A, D, dt bias and the gated norm away from their initial values
        m.A_log.copy_(torch.rand(heads) * 2 - 1)
        m.D.copy_(torch.randn(heads))
        m.dt_bias.copy_(torch.randn(heads) * 0.5)
        m.norm.weight.add_(0.2 * torch.randn_like(m.norm.weight))
        m.conv1d.bias.normal_()
    return cfg, m


def _megatron_mixer(cfg, hf, mem_eff: bool):
    from megatron_minitron.runtime import mamba_cpu

    assert mamba_cpu.install() or torch.cuda.is_available()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.runtime.distributed import init_runtime

    init_runtime(ParallelConfig())
    tc = TransformerConfig(num_layers=1, hidden_size=cfg.hidden_size, num_attention_heads=1,
                           mamba_state_dim=cfg.ssm_state_size, mamba_head_dim=cfg.mamba_head_dim,
                           mamba_num_groups=cfg.n_groups, mamba_num_heads=cfg.mamba_num_heads,
                           use_mamba_mem_eff_path=mem_eff, add_bias_linear=False,
                           use_cpu_initialization=True)
    m = MambaMixer(tc, MambaMixerSubmodules(in_proj=ColumnParallelLinear,
                                            out_proj=RowParallelLinear),
                   d_model=cfg.hidden_size, d_conv=cfg.conv_kernel, chunk_size=cfg.chunk_size,
                   pg_collection=ProcessGroupCollection.use_mpu_process_groups()).eval()
    m.norm.eps = cfg.layer_norm_epsilon
    with torch.no_grad():
        for name in ("in_proj.weight", "out_proj.weight", "conv1d.weight", "conv1d.bias",
                     "A_log", "D", "dt_bias", "norm.weight"):
            m.get_parameter(name).copy_(hf.get_parameter(name))
    return m


@pytest.mark.parametrize("mem_eff", [True, False], ids=["fused path", "prefill path"])
@pytest.mark.parametrize("heads,head_dim,groups,state,chunk,length", [
    (4, 8, 2, 16, 8, 37),   # 5 chunks, the last one padded
    (6, 4, 3, 8, 16, 16),   # one whole chunk, 2 heads per group
    (2, 16, 1, 4, 64, 5),   # shorter than a chunk and than the conv
])
def test_megatron_mamba_mixer_on_cpu_matches_transformers_nemotron_h(
        mem_eff, heads, head_dim, groups, state, chunk, length):
    """Both of Megatron's paths through the mixer (the fused conv + scan that training and
    evaluation take, and the prefill scan with the norm outside) give transformers' NemotronH
    mixer output within 1e-5, across chunk boundaries and padding."""
    cfg, hf = _hf_mixer(heads, head_dim, groups, state, chunk, seed=heads + length)
    ours = _megatron_mixer(cfg, hf, mem_eff)
    x = torch.randn(2, length, cfg.hidden_size)
    with torch.no_grad():
        want = hf(x)
        got, bias = ours(x.transpose(0, 1).contiguous())
    assert bias is None
    err = (got.transpose(0, 1) - want).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), err


def test_chunked_scan_equals_the_recurrence_and_carries_a_state():
    """The SSD chunked form equals the token-by-token recurrence it stands for, and a sequence
    scanned in two calls (the first's final state fed to the second) equals one call."""
    from megatron_minitron.runtime.mamba_cpu import ssd_scan

    g = torch.Generator().manual_seed(0)
    b, t_len, h, p, gr, n = 2, 21, 4, 3, 2, 5
    x, B, C = (torch.randn(*s, generator=g) for s in ((b, t_len, h, p), (b, t_len, gr, n),
                                                     (b, t_len, gr, n)))
    dt, A, D = torch.rand(b, t_len, h, generator=g), -torch.rand(h, generator=g), torch.randn(h)
    y, final = ssd_scan(x, dt, A, B, C, chunk_size=4, D=D)

    state, ys = torch.zeros(b, h, p, n), []
    Bh, Ch = B.repeat_interleave(h // gr, 2), C.repeat_interleave(h // gr, 2)
    for t in range(t_len):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None] *
                                 Bh[:, t, :, None, :])
        ys.append((state * Ch[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    assert torch.allclose(y, torch.stack(ys, 1), atol=1e-5)
    assert torch.allclose(final, state, atol=1e-5)

    y1, mid = ssd_scan(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], chunk_size=4, D=D)
    y2, end = ssd_scan(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], chunk_size=4, D=D,
                       initial_states=mid)
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-5)
    assert torch.allclose(end, final, atol=1e-5)


def test_a_tiny_nemotron_h_on_megatrons_mamba_model_matches_transformers(tiny_tokens):
    """A hybrid model of every layer kind (Mamba, attention without position embedding, squared
    ReLU MLP) written by transformers, built as Megatron-Core's `MambaModel` on the local stack
    spec with the CPU scan, 4 chunks of 8 tokens: logits within 1e-5 of transformers'
    NemotronH. (Conversion, sharding and the verbs on hybrid models are still to come: issue 35.)"""
    import types

    import transformers
    from megatron.core.models.mamba import MambaModel
    from megatron.core.transformer import TransformerConfig

    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model.build import squared_relu
    from megatron_minitron.model.forward import logits
    from megatron_minitron.model.hybrid import (
        MambaShape,
        local_stack_spec,
        mamba_config_fields,
        nemotron_h_to_mcore,
        pattern_from_layer_types,
    )
    from megatron_minitron.runtime import mamba_cpu
    from megatron_minitron.runtime.distributed import init_runtime

    types_ = ["mamba", "attention", "mlp", "mamba", "mlp"]
    hf_cfg = transformers.NemotronHConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=len(types_), layers_block_type=types_,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=64,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=16, chunk_size=8,
        conv_kernel=4, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith(("A_log", "D", "dt_bias", "bias")):
                p.add_(0.1 * torch.randn_like(p))
        want = hf(tiny_tokens).logits

    assert mamba_cpu.install() or torch.cuda.is_available()
    init_runtime(ParallelConfig())
    pattern = pattern_from_layer_types(hf_cfg.layers_block_type)
    assert pattern == "M*-M-"
    shape = MambaShape(heads=4, head_dim=8, groups=2, state=16, chunk_size=8)
    config = TransformerConfig(
        num_layers=len(pattern), hidden_size=48, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=12, normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=False, activation_func=squared_relu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        masked_softmax_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, use_cpu_initialization=True,
        **mamba_config_fields(shape))
    model = MambaModel(config, local_stack_spec(shape), vocab_size=128, max_sequence_length=64,
                       hybrid_override_pattern=pattern, position_embedding_type="none",
                       share_embeddings_and_output_weights=False)
    assert model.decoder.layers[0].mixer.chunk_size == 8
    attention = types.SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=12)
    state = nemotron_h_to_mcore(hf.state_dict(), pattern, attention)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    got = logits([model.eval()], tiny_tokens, 2)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err
