"""Mamba-2 layers of hybrid models (Nemotron-H) on CPU: Megatron-Core's own `MambaMixer`, its
`mamba_ssm` kernels replaced by `runtime/mamba_cpu.py`, against transformers' NemotronH mixer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_minitron.cli import main
from tests.conftest import (
    hf_logits,
    in_process_logits,
    load_in_process,
    run_cli,
    tiny_tokenizer,
    torchrun_logits_of,
)


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


def tiny_nemotron_h(path, pattern=("mamba", "attention", "mlp", "mamba", "mlp", "mamba"),
                    seed=0, **extra):
    """A hybrid model of every layer kind written by transformers: Mamba-2 mixers of 4 heads in
    2 groups (chunks of 8 tokens), attention of 4 heads in 2 groups without position embedding,
    squared-ReLU MLPs; norms, A, D and the dt bias away from their initial values."""
    import transformers

    cfg = transformers.NemotronHConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=len(pattern),
        layers_block_type=list(pattern), num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
        ssm_state_size=16, chunk_size=8, conv_kernel=4, layer_norm_epsilon=1e-5, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("A_log", ".D", "dt_bias", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(path)
    return path


def test_nemotron_h_converts_and_matches_transformers_at_tp1_tp2_sp_and_pp2(tmp_path,
                                                                            tiny_tokens):
    """A tiny NemotronH converts to a Megatron checkpoint (hybrid pattern and Mamba shape in
    its config, the parameter count exact) whose logits equal transformers' within 1e-5 in one
    process, at TP2 with sequence parallelism (each rank scans its own heads and groups) and at
    PP2; converting at TP2 gives the same tensors (Mamba's fused in_proj and conv split block
    by block), and the TP2 export is the source tensor for tensor and loads in transformers."""
    hf = tiny_nemotron_h(tmp_path / "hf")
    ref = hf_logits(hf, tiny_tokens)
    ckpt = tmp_path / "mcore"
    assert main(["convert", str(hf), str(ckpt)]) == 0
    cfg, chunks = load_in_process(ckpt)
    assert cfg.family == "nemotron_h" and cfg.hybrid_pattern == "M*-M-M"
    assert (cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.mamba_state,
            cfg.mamba_chunk_size) == (4, 8, 2, 16, 8)
    src = load_file(str(hf / "model.safetensors"))
    assert cfg.num_parameters() == sum(t.numel() for t in src.values())
    assert (in_process_logits(ckpt, tiny_tokens) - ref).abs().max() <= 1e-5
    from megatron_minitron.evaluate.perplexity import evaluate_windows  # eval's loss

    want = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 128),
                                             tiny_tokens[:, 1:].reshape(-1)).item()
    assert abs(evaluate_windows(chunks, tiny_tokens, 2).loss - want) <= 1e-5

    layouts = [("--tp", "2", "--sequence-parallel", "--micro-batch-size", "2"), ("--pp", "2")]
    for layout in layouts:
        ours = torchrun_logits_of([ckpt], tiny_tokens, tmp_path, 2, *layout)[0]
        assert (ours - ref).abs().max() <= 1e-5, layout

    run_cli("convert", str(hf), str(tmp_path / "tp2"), "--tp", "2", nproc=2)
    tp1 = {k: v for k, v in chunks[0].state_dict().items() if "_extra_state" not in k}
    tp2 = load_in_process(tmp_path / "tp2")[1][0].state_dict()
    for k, v in tp1.items():
        assert torch.equal(tp2[k], v), k

    run_cli("convert", str(ckpt), str(tmp_path / "back"), "--to", "hf", "--tp", "2", nproc=2)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["architectures"] == ["NemotronHForCausalLM"]
    assert (hf_logits(tmp_path / "back", tiny_tokens) - ref).abs().max() <= 1e-5


def test_hybrid_models_are_refused_where_they_are_not_handled_yet(tmp_path, capsys):
    """Importance, prune, distill and search do not handle Mamba layers yet: each refuses a
    hybrid checkpoint in one line before any work, as do the Megatron-LM format and a NemotronH
    whose config asks for what the conversion does not implement."""
    from megatron_minitron.data.demo import train_plays
    from tests.conftest import fails

    hf = tiny_nemotron_h(tmp_path / "hf")
    ckpt = tmp_path / "mcore"
    assert main(["convert", str(hf), str(ckpt)]) == 0
    capsys.readouterr()  # transformers' progress bars
    data = str(train_plays()[0])
    for verb, args in (
            ("importance", ["--load", str(ckpt), "--out", str(tmp_path / "s.safetensors")]),
            ("prune", ["--load", str(ckpt), "--drop-layers", "1", "--out", str(tmp_path / "p")]),
            ("distill", ["--teacher", str(ckpt), "--student", str(ckpt), "--data", data,
                         "--save", str(tmp_path / "d"), "--train-iters", "1"])):
        fails(capsys, [verb, *args], f"{verb} does not handle hybrid Mamba models yet")
    fails(capsys, ["convert", str(ckpt), str(tmp_path / "lm"), "--to", "megatron-lm"],
          "hybrid Mamba models are written")
    assert not any((tmp_path / n).exists() for n in ("s.safetensors", "p", "lm"))

    cfg = json.loads((hf / "config.json").read_text())
    for key, value in (("use_conv_bias", False), ("time_step_limit", [0.0, 2.0]),
                       ("layers_block_type", ["mamba", "moe"] + ["mlp"] * 4)):
        (hf / "config.json").write_text(json.dumps({**cfg, key: value}))
        fails(capsys, ["convert", str(hf), str(tmp_path / key)], str(hf))
        assert not (tmp_path / key).exists()
