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


def test_nemotron_h_pruning_units_that_contribute_nothing_keeps_the_logits(tmp_path,
                                                                            tiny_tokens):
    """Function preservation on every axis of a hybrid at once: a Mamba head per group and a
    head dimension whose gate is zero (their channels enter the gated norm as zeros), hidden
    channels nobody writes, MLP neurons and attention heads with zero output weights, and a
    Mamba layer that writes nothing. Exact but for the norms' epsilon (kept, see slicing; the
    gated norms' set aside): the same pruning without the RMSNorm rescale moves the logits
    orders of magnitude more. The pruned model's export loads in transformers equal."""
    from tests.test_prune import _save_modified, _scores_dropping

    src = tmp_path / "src"
    assert main(["convert", str(tiny_nemotron_h(tmp_path / "hf", seed=3)), str(src)]) == 0
    heads_gone, dim_gone = torch.tensor([1, 2]), 5  # one head in each group of two
    channels = torch.cat([(heads_gone[:, None] * 8 + torch.arange(8)).flatten(),
                          torch.arange(4) * 8 + dim_gone]).unique()
    hidden = torch.arange(0, 48, 4)
    ffn, attn_heads, dead = torch.arange(0, 64, 2), torch.tensor([0, 3]), 3

    def silence(model):
        # A residual stream of a typical size (a random model's is so small that the norms'
        # epsilon dominates)
        model.embedding.word_embeddings.weight.mul_(50)
        model.embedding.word_embeddings.weight[:, hidden] = 0
        for i, layer in enumerate(model.decoder.layers):
            if hasattr(layer, "mixer"):
                layer.mixer.in_proj.weight[channels] = 0  # z = 0: silu(z) gates them to zero
                out = layer.mixer.out_proj.weight
                out[hidden] = 0
                if i == dead:
                    out.zero_()
            elif hasattr(layer.self_attention, "linear_proj"):
                proj = layer.self_attention.linear_proj.weight
                proj[hidden] = 0
                for h in attn_heads.tolist():
                    proj[:, h * 12:(h + 1) * 12] = 0
            else:
                layer.mlp.linear_fc2.weight[:, ffn] = 0
                layer.mlp.linear_fc2.weight[hidden] = 0

    zeroed = _save_modified(src, tmp_path / "zeroed", silence)
    scores = _scores_dropping(zeroed, tmp_path / "s.safetensors", ffn=[ffn] * 6,
                              heads=[attn_heads] * 6, hidden=hidden, layer=dead,
                              mamba=[channels] * 6)
    def logits_without_gated_norm_epsilon(ckpt):
        """Megatron fixes the gated norms' epsilon at 1e-5, more than a random mixer's gated
        values' mean square, and the only term the rescale cannot carry: set aside here."""
        from megatron_minitron.model.forward import logits

        chunks = load_in_process(ckpt)[1]
        for layer in chunks[0].decoder.layers:
            if hasattr(layer, "mixer"):
                layer.mixer.norm.eps = 1e-20
        return logits(chunks, tiny_tokens, micro_batch_size=2)

    before = logits_without_gated_norm_epsilon(zeroed)
    targets = ("--target-mamba-heads", "2", "--target-mamba-head-dim", "7", "--target-hidden",
               "36", "--target-ffn", "32", "--target-heads", "2", "--target-layers", "5")
    diffs = {}
    for name, flags in (("rescaled", ()), ("plain", ("--no-norm-rescale",))):
        out = tmp_path / name
        assert main(["prune", "--load", str(zeroed), "--scores", str(scores), "--out", str(out),
                     *targets, *flags, "--hf-out", str(tmp_path / f"{name}_hf")]) == 0
        diffs[name] = (logits_without_gated_norm_epsilon(out) - before).abs().max().item()
        after = in_process_logits(out, tiny_tokens)
        assert (hf_logits(tmp_path / f"{name}_hf", tiny_tokens) - after).abs().max() <= 1e-5
    cfg = load_in_process(tmp_path / "rescaled")[0]
    assert (cfg.hybrid_pattern, cfg.mamba_heads, cfg.mamba_head_dim, cfg.hidden_size) == \
        ("M*--M", 2, 7, 36)
    print(f"max |dlogit| after pruning silent units: {diffs}")
    assert diffs["rescaled"] <= 1e-5 and diffs["plain"] > 100 * diffs["rescaled"]


def test_nemotron_h_importance_and_pruning_are_the_same_at_tp1_and_tp2_sp(tmp_path,
                                                                          tiny_tokens):
    """Importance of a tiny NemotronH on real text gives the same scores at TP2 with sequence
    parallelism (each rank scores its own Mamba heads' channels) as in one process, each site
    only where its layer kind has it; pruning Mamba heads and head dimensions with hidden, MLP,
    attention heads and a layer gives the same tensors at TP2 (Mamba's fused tensors sliced
    and split again block by block) with the exact parameter count, and its Hugging Face
    export equals it in transformers."""
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.importance import load_scores

    ckpt = tmp_path / "mcore"
    assert main(["convert", str(tiny_nemotron_h(tmp_path / "hf", seed=1)), str(ckpt)]) == 0
    args = ["importance", "--load", str(ckpt), "--data", str(train_plays()[1]), "--samples", "8",
            "--seq-length", "32", "--depth-samples", "4", "--head-samples", "2",
            "--micro-batch-size", "2", "--out"]
    assert main([*args, str(tmp_path / "tp1.safetensors")]) == 0
    run_cli(*args, str(tmp_path / "tp2.safetensors"), "--tp", "2", "--sequence-parallel",
            nproc=2)
    ref, got = (load_scores(tmp_path / f"{n}.safetensors") for n in ("tp1", "tp2"))
    assert got.tensors.keys() == ref.tensors.keys()
    for k, v in ref.tensors.items():
        torch.testing.assert_close(got.tensors[k], v, rtol=1e-5, atol=1e-6, msg=k)
    masked = ref.tensors["heads.mask_loss"].abs().sum(1)  # attention layers only
    assert masked[1] > 0 and (masked[[0, 2, 3, 4, 5]] == 0).all()
    kinds = torch.tensor([ord(c) for c in "M*-M-M"])
    for site, where in (("mamba", "M"), ("ln_attn", "M*"), ("ln_mlp", "-"), ("heads", "*"),
                        ("ffn", "-")):
        present = sum(kinds == ord(c) for c in where).bool()
        per_layer = ref.tensors[f"sums.{site}"].flatten(1).abs().sum(1)
        assert bool((per_layer[present] > 0).all() and (per_layer[~present] == 0).all()), site

    prune = ["prune", "--load", str(ckpt), "--scores", str(tmp_path / "tp1.safetensors"),
             "--target-mamba-heads", "2", "--target-mamba-head-dim", "6", "--target-hidden", "40",
             "--target-ffn", "48", "--target-heads", "2", "--drop-layers", "4", "--out"]
    assert main([*prune, str(tmp_path / "p1"), "--hf-out", str(tmp_path / "p1_hf")]) == 0
    run_cli(*prune, str(tmp_path / "p2"), "--tp", "2", nproc=2)
    cfg, chunks = load_in_process(tmp_path / "p1")
    assert (cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.hybrid_pattern) == \
        (2, 6, 2, "M*-MM")
    assert cfg.num_parameters() == sum(p.numel() for p in chunks[0].parameters())
    one = {k: v for k, v in chunks[0].state_dict().items() if "_extra_state" not in k}
    two = load_in_process(tmp_path / "p2")[1][0].state_dict()
    for k, v in one.items():
        assert torch.equal(two[k], v), k
    ours = in_process_logits(tmp_path / "p1", tiny_tokens)
    assert (hf_logits(tmp_path / "p1_hf", tiny_tokens) - ours).abs().max() <= 1e-5


def test_nemotron_h_student_distils_the_same_under_dp2_and_tp2_sp(tmp_path):
    """A NemotronH pruned in Mamba heads, hidden and depth learns from its teacher (KL, LM and
    hidden-state losses; backward through the CPU scan): the trajectory and gradient norm at
    DP2 and at TP2 with sequence parallelism are one process's, the validation loss falls, and
    the distilled student exports to a checkpoint transformers loads with its logits."""
    from megatron_minitron.data.demo import held_out_plays, train_plays
    from tests.test_distill import _distill_args, _losses

    teacher = tmp_path / "teacher"
    assert main(["convert", str(tiny_nemotron_h(tmp_path / "hf", seed=2)), str(teacher)]) == 0
    d = tmp_path / "data"
    d.mkdir()
    scores = _scores_of(teacher, tmp_path / "s.safetensors")
    assert main(["prune", "--load", str(teacher), "--scores", str(scores), "--target-mamba-heads",
                 "2", "--target-hidden", "40", "--drop-layers", "4",
                 "--out", str(d / "student")]) == 0
    for name, files in (("train", train_plays()[:1]), ("valid", held_out_plays()[:1])):
        assert main(["preprocess", "--input", *map(str, files), "--tokenizer", str(teacher),
                     "--output-prefix", str(d / name)]) == 0
    extra = ("--hidden-weight", "0.5")
    assert main(_distill_args((teacher, d), tmp_path / "single", 3, *extra)) == 0
    ref = _losses(tmp_path / "single")
    for name, flags in (("dp2", ()), ("tp2", ("--tp", "2", "--sequence-parallel"))):
        run_cli(*_distill_args((teacher, d), tmp_path / name, 3, *extra), *flags, nproc=2)
        for (i, a, ga), (j, b, gb) in zip(ref, _losses(tmp_path / name), strict=True):
            assert i == j and abs(a - b) <= 1e-5 and abs(ga - gb) <= 1e-4, (name, i, a, b)
    metrics = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    valid = [r["val_kd"] for r in map(json.loads, metrics) if "val_kd" in r]
    assert len(valid) >= 2 and valid[-1] < valid[0], valid
    last = tmp_path / "single" / (tmp_path / "single" / "latest").read_text().strip()
    assert main(["convert", str(last), str(tmp_path / "out_hf"), "--to", "hf"]) == 0
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = in_process_logits(last, tokens)
    assert (hf_logits(tmp_path / "out_hf", tokens) - ours).abs().max() <= 1e-5


def test_nemotron_h_strategy_auto_chooses_alike_at_tp1_and_tp2_sp(tmp_path):
    """--strategy auto on a hybrid (Mamba heads and head dimensions, hidden and a layer cut):
    the RMSNorm rescale (hidden and gated norms) and the three orders are its candidates (no
    head metric: attention heads are not cut), with the same losses (1e-5) and the same written
    shape at TP2 with sequence parallelism; the written checkpoint's loss on the selection
    windows, computed afresh, is the lowest in the table."""
    from megatron_minitron.evaluate.perplexity import evaluate_windows
    from megatron_minitron.importance import load_scores
    from megatron_minitron.prune.strategy import calibration

    src = tmp_path / "src"
    assert main(["convert", str(tiny_nemotron_h(tmp_path / "hf", seed=4)), str(src)]) == 0
    scores = _scores_of(src, tmp_path / "s.safetensors", "--depth-samples", "2",
                        "--head-samples", "2")
    args = ("prune", "--load", str(src), "--scores", str(scores), "--strategy", "auto",
            "--select-samples", "4", "--target-mamba-heads", "2", "--target-mamba-head-dim", "6",
            "--target-hidden", "40", "--target-layers", "5")
    assert main([*args, "--out", str(tmp_path / "tp1"), "--json", str(tmp_path / "tp1.json")]) == 0
    run_cli(*args, "--out", str(tmp_path / "tp2"), "--json", str(tmp_path / "tp2.json"),
            "--tp", "2", "--sequence-parallel", nproc=2)
    ref, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tp1", "tp2"))
    table = ref["candidates"]
    assert len(table) == 1 + 1 + 2  # as given, the rescale off, the other two orders
    assert [r["strategy"] for r in got["candidates"]] == [r["strategy"] for r in table]
    for a, b in zip(got["candidates"], table, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["strategy"]
    assert (got["model"], got["kept_layers"]) == (ref["model"], ref["kept_layers"])
    cal = calibration(src, load_scores(scores).meta, 4)
    written = evaluate_windows(load_in_process(tmp_path / "tp1")[1], cal.select, 1).loss
    assert written == pytest.approx(min(r["loss"] for r in table), abs=1e-5)


def test_nemotron_h_search_cuts_mamba_heads_within_groups(tmp_path):
    """`search` over hidden, MLP and Mamba heads on a hybrid: the candidates spread over the
    Mamba head counts (whole heads per group); each is pruned to exactly the parameter count it
    was chosen by (the built model's own count) and briefly distilled, and they are ranked by
    their loss after KD."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    teacher = tmp_path / "teacher"
    assert main(["convert", str(tiny_nemotron_h(tmp_path / "hf", seed=5)), str(teacher)]) == 0
    for name, files in (("train", train_plays()[1:2]), ("valid", held_out_plays()[:1])):
        assert main(["preprocess", "--input", *map(str, files), "--tokenizer", str(teacher),
                     "--output-prefix", str(tmp_path / name)]) == 0
    scores = _scores_of(teacher, tmp_path / "s.safetensors")
    assert main(["search", "--load", str(teacher), "--scores", str(scores), "--data",
                 str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid"), "--out",
                 str(tmp_path / "search"), "--target-params", "40000", "--axes", "hidden",
                 "ffn", "mamba_heads", "--candidates", "2", "--step", "8", "--kd-tokens", "256",
                 "--global-batch-size", "4", "--seq-length", "32", "--eval-iters", "1"]) == 0
    ranking = json.loads((tmp_path / "search" / "results.json").read_text())["ranking"]
    assert {r["mamba_heads"] for r in ranking} == {2, 4}
    for r in ranking:
        cfg, chunks = load_in_process(tmp_path / "search" / r["name"] / "pruned")
        assert cfg.mamba_heads == r["mamba_heads"] and cfg.hidden_size == r["hidden"]
        assert sum(p.numel() for p in chunks[0].parameters()) == r["params"]
    assert [r["loss_kd"] for r in ranking] == sorted(r["loss_kd"] for r in ranking)


def _scores_of(ckpt, out, *flags):
    from megatron_minitron.data.demo import train_plays

    assert main(["importance", "--load", str(ckpt), "--data", str(train_plays()[1]),
                 "--samples", "8", "--seq-length", "32", "--depth-samples", "0", *flags,
                 "--out", str(out)]) == 0
    return out


def test_what_hybrid_models_cannot_take_is_refused_in_one_line(tmp_path, capsys,
                                                               tiny_llama_ckpt):
    """Mamba targets on a model without Mamba layers or that would split the groups unevenly,
    the Megatron-LM format for a hybrid, and a NemotronH whose config asks for what the
    conversion does not implement: each refused in one line before any work."""
    from tests.conftest import fails

    hf = tiny_nemotron_h(tmp_path / "hf")
    ckpt = tmp_path / "mcore"
    assert main(["convert", str(hf), str(ckpt)]) == 0
    capsys.readouterr()  # transformers' progress bars
    fails(capsys, ["prune", "--load", str(ckpt), "--target-mamba-heads", "3", "--out",
                   str(tmp_path / "p")], "not a multiple of the 2 groups")
    fails(capsys, ["prune", "--load", str(tiny_llama_ckpt), "--target-mamba-head-dim", "4",
                   "--out", str(tmp_path / "p")], "has no Mamba layers")
    fails(capsys, ["convert", str(ckpt), str(tmp_path / "lm"), "--to", "megatron-lm"],
          "hybrid Mamba models are written")
    assert not any((tmp_path / n).exists() for n in ("p", "lm"))

    cfg = json.loads((hf / "config.json").read_text())
    for key, value in (("use_conv_bias", False), ("time_step_limit", [0.0, 2.0]),
                       ("layers_block_type", ["mamba", "moe"] + ["mlp"] * 4)):
        (hf / "config.json").write_text(json.dumps({**cfg, key: value}))
        fails(capsys, ["convert", str(hf), str(tmp_path / key)], str(hf))
        assert not (tmp_path / key).exists()
