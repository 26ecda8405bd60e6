"""The one place that knows how Hugging Face and Megatron-Core lay out the same weights.

All functions work on full (TP=1) tensors keyed by name; sharding is Megatron's business.
Facts encoded here:
- fused QKV: rows grouped per query group g = [q heads of g | k_g | v_g];
- SwiGLU `linear_fc1` = [gate; up] (HF gate_proj, up_proj); under TP each rank holds
  [gate_r; up_r], not a contiguous slice of the full tensor (`tp_blocks`); a Mamba mixer's
  `in_proj` = [z | x | B | C | dt] and its conv over [x | B | C] likewise;
- `linear_proj` input columns are head-major (head h = columns h*d .. (h+1)*d);
- local spec norms are `input_layernorm` / `pre_mlp_layernorm`; TE fuses them into
  `linear_qkv.layer_norm_*` / `linear_fc1.layer_norm_*`;
- Nemotron's LayerNorm1P and Gemma's (1 + w) RMSNorm store zero-centred gamma in both formats,
  so norms copy unchanged;
- Gemma's HF `post_attention_layernorm` is a post-norm (Megatron: `linear_proj.post_layernorm`),
  its pre-MLP norm `pre_feedforward_layernorm`; Llama's `post_attention_layernorm` is the pre-MLP
  norm;
- MoE (SequentialMLP): `mlp.router.weight` [experts, h] is HF's `gate`, expert j's SwiGLU is
  `mlp.experts.local_experts.j.linear_fc1/fc2`; TE fuses no norm into an MoE layer's MLP, so
  its pre-MLP norm is a module there too (`pre_mlp_layernorm.weight`, both specs, also in the
  sharded state dict: see `model.build.local_keys_map`). Qwen2-MoE's shared expert is
  `mlp.shared_experts.linear_*` and its sigmoid gate [1, h] `mlp.shared_experts.gate_weight`
  (HF `shared_expert_gate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_minitron.config import FAMILIES, ModelConfig

HF_LAYER = "model.layers.{i}."
# The only RoPE scaling Megatron-Core's GPTModel implements (Llama-3.1's), with its fixed factors.
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
MC_LAYER = "decoder.layers.{i}."
LOCAL_EXPERTS = "mlp.experts.local_experts."  # + expert number: global in our names, see sharding
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
# Norm parameters under both specs: local `input_layernorm.weight`, TE `layer_norm_weight`.
# Norm parameters: GPTModel's layer norms (fused into TE's linears or not), a hybrid layer's
# `norm` and MambaStack's `final_norm`.
NORM_PARAMS = ("norm.weight", "layernorm.bias", "layer_norm_weight", "layer_norm_bias")
FINAL_NORMS = ("decoder.final_layernorm", "decoder.final_norm")  # GPTModel, MambaModel
MAMBA_MIXER = "mixer."  # a hybrid layer's Mamba mixer, before its tensor names
QK_NORMS = ("q_layernorm.weight", "k_layernorm.weight")  # per-head q/k norms (Qwen3, Gemma 3)
# A layer's two blocks, each with its norm (both specs): what a heterogeneous layer loses with
# its attention or its MLP.
ATTENTION_BLOCK = ("input_layernorm.", "self_attention.")
MLP_BLOCK = ("pre_mlp_layernorm.", "mlp.")


def removed_blocks(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """Name prefixes (relative to the layer) of the blocks layer `layer` of `cfg` lacks."""
    return ((() if cfg.attention_of(layer) else ATTENTION_BLOCK) +
            (() if cfg.ffn_of(layer) else MLP_BLOCK))


# HF's MoE block, and the names of an expert's gate, up and down projections.
MOE_HF = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
          "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
          "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}
SHARED_EXPERT = "mlp.shared_experts."


def renumber_expert(name: str, number: Callable[[int], int]) -> str:
    """`name` with its expert number j replaced by number(j); other names unchanged."""
    j = expert_number(name)
    if j is None:
        return name
    head, _, rest = name.partition(LOCAL_EXPERTS)
    return f"{head}{LOCAL_EXPERTS}{number(j)}.{rest.split('.', 1)[1]}"


def expert_number(name: str) -> int | None:
    """The expert a parameter belongs to, None outside the experts."""
    _, sep, rest = name.partition(LOCAL_EXPERTS)
    return int(rest.split(".", 1)[0]) if sep else None


def norm_prefixes(te: bool, moe: bool = False) -> tuple[str, str]:
    """Megatron name prefixes (`+ "weight"` / `+ "bias"`) of a layer's pre-attention and pre-MLP
    norm parameters. TE fuses each norm into the next linear (`linear_qkv.layer_norm_weight`),
    except an MoE layer's pre-MLP norm: no single linear follows it, so it stays a `TENorm`
    module (`pre_mlp_layernorm.weight`), as in Megatron-Core's TE spec."""
    if te:
        return ("self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm." if moe else "mlp.linear_fc1.layer_norm_")
    return "input_layernorm.", "pre_mlp_layernorm."


def _norm_suffixes(cfg: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if cfg.traits.normalization == "LayerNorm" else ("weight",)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Weights [rows, h] or biases [rows] of q/k/v -> Megatron's per-group fused rows."""
    ng, d = cfg.num_query_groups, cfg.kv_channels
    per = cfg.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, per * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, d = cfg.num_query_groups, cfg.kv_channels
    per = cfg.num_attention_heads // ng
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (per + 2) * d, *rest)
    q, k, v = torch.split(g, [per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def qkv_rows(cfg: ModelConfig, heads: torch.Tensor) -> torch.Tensor:
    """Rows of `linear_qkv` that keep query `heads` (global, sorted indices) and the K/V rows of
    the groups they belong to (a group without kept heads is dropped), in fused per-group order."""
    d, per = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    span = torch.arange(d)
    rows = []
    for g in sorted({h // per for h in heads.tolist()}):
        base = g * (per + 2) * d
        rows += [base + (h - g * per) * d + span for h in heads.tolist() if h // per == g]
        rows += [base + per * d + span, base + (per + 1) * d + span]
    return torch.cat(rows)


def qk_rows_mask(cfg: ModelConfig) -> torch.Tensor:
    """True for the query and key rows of `linear_qkv` (False for value rows)."""
    d, per = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    group = torch.ones((per + 2) * d, dtype=torch.bool)
    group[(per + 1) * d:] = False
    return group.repeat(cfg.num_query_groups)


def head_columns(cfg: ModelConfig, heads: torch.Tensor) -> torch.Tensor:
    """Input columns of `linear_proj` that carry the given heads."""
    d = cfg.kv_channels
    return (heads[:, None] * d + torch.arange(d)).flatten()


def fc1_rows(cfg: ModelConfig, neurons: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of `linear_fc1` for the given neurons of an MLP (or expert) `width` wide (gate and
    up halves for SwiGLU)."""
    if cfg.traits.gated:
        return torch.cat([neurons, neurons + width])
    return neurons


def tp_blocks(name: str, rows: int, cfg: ModelConfig) -> list[int] | None:
    """The row blocks of a fused tensor that TP splits one by one (each rank holds its part of
    every block, in order): SwiGLU's `linear_fc1` [gate; up] and a Mamba mixer's fused tensors
    (`mamba_segments`). None where a rank holds a contiguous slice."""
    if cfg.traits.gated and name.endswith("linear_fc1.weight"):
        return [rows // 2, rows // 2]
    return mamba_segments(name, cfg)


def from_block_shards(shards: list[torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """The full tensor from TP shards that each hold their part of every block."""
    parts = [s.split([b // len(shards) for b in blocks]) for s in shards]
    return torch.cat([p[i] for i in range(len(blocks)) for p in parts])


def block_shard(full: torch.Tensor, blocks: list[int], rank: int, tp: int) -> torch.Tensor:
    """TP rank `rank`'s part of every block of a full fused tensor."""
    return torch.cat([b.chunk(tp)[rank] for b in full.split(blocks)])


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of: `fuse` joins them on import,
    `split` undoes it on export (identity for a plain rename)."""

    mcore: str
    hf: tuple[str, ...]
    fuse: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = lambda t: (t,)


def _mlp_rules(mc: str, hf: str, gated: bool, gate: str = "gate_proj", up: str = "up_proj",
               down: str = "down_proj") -> list[Rule]:
    """One MLP (or expert): `linear_fc1` = [gate; up] when gated, `linear_fc2` = down."""
    fc1 = (Rule(mc + "linear_fc1.weight", (hf + f"{gate}.weight", hf + f"{up}.weight"),
                torch.cat, lambda t: torch.chunk(t, 2, dim=0)) if gated else
           Rule(mc + "linear_fc1.weight", (hf + f"{up}.weight",)))
    return [Rule(mc + "linear_fc2.weight", (hf + f"{down}.weight",)), fc1]


# A Mamba mixer's parameters, the same names in transformers' NemotronH and Megatron's MambaMixer.
MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias",
                "norm.weight", "out_proj.weight")


def mamba_segments(name: str, cfg: ModelConfig) -> list[int] | None:
    """The row blocks TP splits one by one in a Mamba mixer's fused tensors: `in_proj` is
    [z | x | B | C | dt] and the conv runs over [x | B | C]; under TP each rank holds its part
    of every block in that order (heads, and the groups their B and C belong to). None for
    every other tensor."""
    if not cfg.hybrid:
        return None
    bc = cfg.mamba_groups * cfg.mamba_state
    if name.endswith("mixer.in_proj.weight"):
        return [cfg.mamba_inner, cfg.mamba_inner, bc, bc, cfg.mamba_heads]
    if name.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
        return [cfg.mamba_inner, bc, bc]
    return None


def mamba_channels(cfg: ModelConfig, heads: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """A mixer's channels (x, z, the gated norm, out_proj's input) of the kept `heads` and
    head dimensions `dims` (global, sorted): channel h * head_dim + d, head by head."""
    return (heads[:, None] * cfg.mamba_head_dim + dims).flatten()


def mamba_rows(name: str, cfg: ModelConfig, heads: torch.Tensor, dims: torch.Tensor
               ) -> torch.Tensor:
    """Rows of `in_proj` [z | x | B | C | dt] or of the conv [x | B | C] that keep `heads` x
    `dims`: every group's B and C stay (heads are pruned within groups), dt per kept head."""
    ch, inner = mamba_channels(cfg, heads, dims), cfg.mamba_inner
    bc = torch.arange(2 * cfg.mamba_groups * cfg.mamba_state)
    if name.endswith("in_proj.weight"):
        return torch.cat([ch, inner + ch, 2 * inner + bc, 2 * inner + len(bc) + heads])
    return torch.cat([ch, inner + bc])


def _hybrid_rules(cfg: ModelConfig) -> list[Rule]:
    """NemotronH as its files name it (`backbone.`, which transformers maps to `model.` in
    memory): `layers.i.norm` then `.mixer`, a Mamba mixer, an attention block (q/k/v/o_proj) or
    an MLP (up/down_proj) by the pattern; Megatron's local stack names the norm after the block
    (`norm`, `input_layernorm`, `pre_mlp_layernorm`)."""
    out = [Rule(EMBEDDING, ("backbone.embeddings.weight",))]
    for i, kind in enumerate(cfg.hybrid_pattern):
        s, m = f"backbone.layers.{i}.", MC_LAYER.format(i=i)
        norm = {"M": "norm.", "*": "input_layernorm.", "-": "pre_mlp_layernorm."}[kind]
        out.append(Rule(m + norm + "weight", (s + "norm.weight",)))
        if kind == "M":
            out += [Rule(m + "mixer." + p, (s + "mixer." + p,)) for p in MAMBA_PARAMS]
        elif kind == "*":
            out += [Rule(m + "self_attention.linear_qkv.weight",
                         tuple(s + f"mixer.{x}_proj.weight" for x in "qkv"),
                         lambda ts: fuse_qkv(*ts, cfg), lambda t: split_qkv(t, cfg)),
                    Rule(m + "self_attention.linear_proj.weight", (s + "mixer.o_proj.weight",))]
        else:
            out += _mlp_rules(m + "mlp.", s + "mixer.", gated=False)
    out.append(Rule("decoder.final_norm.weight", ("backbone.norm_f.weight",)))
    if not cfg.tie_embeddings:
        out.append(Rule(OUTPUT_LAYER, ("lm_head.weight",)))
    return out


def _attention_rules(cfg: ModelConfig, s: str, m: str, norm: str) -> list[Rule]:
    """A layer's attention block with its norm(s): HF layer prefix `s`, Megatron's `m`."""
    out = [Rule(m + norm + suf, (s + f"input_layernorm.{suf}",)) for suf in _norm_suffixes(cfg)]
    if cfg.traits.post_norms:  # Gemma: HF's post_attention_layernorm is a real post-norm
        out.append(Rule(m + "self_attention.linear_proj.post_layernorm.weight",
                        (s + "post_attention_layernorm.weight",)))
    qkv = ("weight", "bias") if cfg.traits.qkv_bias else ("weight",)
    out += [Rule(m + f"self_attention.linear_qkv.{p}",
                 tuple(s + f"self_attn.{x}_proj.{p}" for x in "qkv"),
                 lambda ts: fuse_qkv(*ts, cfg), lambda t: split_qkv(t, cfg)) for p in qkv]
    if cfg.traits.qk_norm:
        out += [Rule(m + f"self_attention.{x}_layernorm.weight",
                     (s + f"self_attn.{x}_norm.weight",)) for x in "qk"]
    out.append(Rule(m + "self_attention.linear_proj.weight", (s + "self_attn.o_proj.weight",)))
    return out


def _mlp_block_rules(cfg: ModelConfig, s: str, m: str, norm: str) -> list[Rule]:
    """A layer's MLP (or MoE) block with its norm(s)."""
    post = cfg.traits.post_norms
    out = [Rule(m + norm + suf, (s + ("pre_feedforward_layernorm" if post else
                                      "post_attention_layernorm") + f".{suf}",))
           for suf in _norm_suffixes(cfg)]
    if post:
        out.append(Rule(m + "mlp.linear_fc2.post_layernorm.weight",
                        (s + "post_feedforward_layernorm.weight",)))
    if not cfg.moe:
        return out + _mlp_rules(m + "mlp.", s + "mlp.", cfg.traits.gated)
    block, gate, up, down = MOE_HF[cfg.family]
    out.append(Rule(m + "mlp.router.weight", (s + f"{block}.gate.weight",)))
    out += [r for j in range(cfg.num_moe_experts) for r in _mlp_rules(
        m + f"{LOCAL_EXPERTS}{j}.", s + f"{block}.experts.{j}.", True, gate, up, down)]
    if cfg.moe_shared_ffn_hidden_size:
        out += [*_mlp_rules(m + SHARED_EXPERT, s + "mlp.shared_expert.", True),
                Rule(m + SHARED_EXPERT + "gate_weight", (s + "mlp.shared_expert_gate.weight",))]
    return out


def rules(cfg: ModelConfig, te: bool = False) -> list[Rule]:
    """The HF <-> Megatron name map of a model, written once: import applies it, export inverts
    it. Hybrid models are built on the local stack on every machine (model/hybrid.py)."""
    if cfg.hybrid:
        return _hybrid_rules(cfg)
    out = [Rule(EMBEDDING, ("model.embed_tokens.weight",))]
    attn_norm, mlp_norm = norm_prefixes(te, cfg.moe)
    for i in range(cfg.num_layers):
        s, m = HF_LAYER.format(i=i), MC_LAYER.format(i=i)
        if cfg.attention_of(i):  # a heterogeneous layer may lack either block
            out += _attention_rules(cfg, s, m, attn_norm)
        if cfg.ffn_of(i):
            out += _mlp_block_rules(cfg, s, m, mlp_norm)
    out += [Rule(f"decoder.final_layernorm.{suf}", (f"model.norm.{suf}",))
            for suf in _norm_suffixes(cfg)]
    if not cfg.tie_embeddings:
        out.append(Rule(OUTPUT_LAYER, ("lm_head.weight",)))
    return out


def hf_to_mcore(hf: dict[str, torch.Tensor], cfg: ModelConfig, te: bool = False
                ) -> dict[str, torch.Tensor]:
    return {r.mcore: r.fuse([hf[n] for n in r.hf]) for r in rules(cfg, te)}


def mcore_to_hf(mc: dict[str, torch.Tensor], cfg: ModelConfig, te: bool = False
                ) -> dict[str, torch.Tensor]:
    return {n: t.contiguous() for r in rules(cfg, te)
            for n, t in zip(r.hf, r.split(mc[r.mcore]), strict=True)}


# HF architecture -> family. A hidden-pruned Llama is exported as Mistral (see `hf_config`) and
# reads back as Mistral: the same network.
HF_ARCHITECTURES = {t.architecture: name for name, t in FAMILIES.items()}
# Heterogeneous Llama students: NVIDIA's Nemotron-NAS format (Llama-Nemotron, Puzzle's models),
# one `block_configs` entry per layer, Llama's tensor names; transformers loads it with the
# model's own code (trust_remote_code), vLLM and TensorRT-LLM natively.
NEMOTRON_NAS = {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas"}
HF_ARCHITECTURES[NEMOTRON_NAS["architectures"][0]] = "llama"

# config.json fields that change the network and that we do not implement: refused when set to
# anything but the value given (or absent), never silently dropped.
UNSUPPORTED = {"attention_bias": False, "mlp_bias": False, "attn_logit_softcapping": None,
               "final_logit_softcapping": None, "use_sliding_window": False,
               "use_bidirectional_attention": False, "qkv_bias": True}
LAYER_TYPES = {"full_attention": 0, "sliding_attention": 1}
# A hybrid model's layer kinds: our pattern symbol -> transformers' NemotronH layer type, and the
# names transformers (and NVIDIA's hub configs) have used for them.
HYBRID_HF = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
HYBRID_SYMBOLS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*",
                  "mlp": "-", "M": "M", "*": "*", "-": "-"}


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for `transformers`, from the family's row in FAMILIES."""
    t = cfg.traits
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling_factor is not None:
        rope = {**rope, **LLAMA3_ROPE, "factor": cfg.rope_scaling_factor}
    out = {
        "architectures": [t.architecture], "model_type": t.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": t.hidden_act,
        "rope_theta": cfg.rotary_base,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    if cfg.hybrid:
        return _nemotron_h_config(cfg, out)
    if cfg.heterogeneous:
        return _nemotron_nas_config(cfg, out)
    if t.normalization == "LayerNorm":  # Nemotron
        return {**out, "norm_eps": cfg.norm_epsilon, "partial_rotary_factor": cfg.rotary_percent,
                "rope_parameters": {**rope, "partial_rotary_factor": cfg.rotary_percent}}
    out["rms_norm_eps"] = cfg.norm_epsilon
    if cfg.family == "llama":
        out.update(attention_bias=False, mlp_bias=False,
                   rope_scaling=rope if cfg.rope_scaling_factor is not None else None)
        if cfg.hidden_size % cfg.num_attention_heads == 0:
            return out
        # transformers' LlamaConfig refuses hidden % heads != 0 even with an explicit head_dim
        # (a hidden-pruned model); Mistral's takes head_dim and is the same network.
        return {**out, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": None}
    if cfg.family in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.sliding_window
    if cfg.family == "mistral":
        return out
    if cfg.family == "mixtral":  # routing weights: always the softmax over the top k
        return {**out, "intermediate_size": cfg.moe_ffn_hidden_size,
                "num_local_experts": cfg.num_moe_experts,
                "num_experts_per_tok": cfg.moe_router_topk,
                "router_aux_loss_coef": cfg.moe_aux_loss_coeff}
    if cfg.family == "gemma3":
        local = {**rope, "rope_theta": cfg.local_rotary_base or cfg.rotary_base}
        out.pop("hidden_act")
        return {**out, "hidden_activation": t.hidden_act, "rope_parameters": {
                    "full_attention": rope, "sliding_attention": local},
                "sliding_window": cfg.sliding_window,
                "layer_types": [("sliding_attention" if w else "full_attention")
                                for w in cfg.window_layers or [0] * cfg.num_layers],
                "query_pre_attn_scalar": (_integral(cfg.softmax_scale ** -2) if cfg.softmax_scale
                                          else cfg.kv_channels),
                "final_logit_softcapping": None, "attn_logit_softcapping": None,
                "attention_bias": False}
    out = {**out, "use_sliding_window": False, "sliding_window": None,  # qwen2/3 (MoE)
           "max_window_layers": cfg.num_layers,
           **({"attention_bias": False} if not t.qkv_bias else {}),
           **({"qkv_bias": True} if cfg.family == "qwen2_moe" else {})}
    if cfg.moe:
        out.update(num_experts=cfg.num_moe_experts, num_experts_per_tok=cfg.moe_router_topk,
                   moe_intermediate_size=cfg.moe_ffn_hidden_size,
                   norm_topk_prob=not cfg.moe_router_pre_softmax, decoder_sparse_step=1,
                   mlp_only_layers=[], router_aux_loss_coef=cfg.moe_aux_loss_coeff)
    if cfg.moe_shared_ffn_hidden_size:
        out["shared_expert_intermediate_size"] = cfg.moe_shared_ffn_hidden_size
    return out


def _nemotron_h_config(cfg: ModelConfig, common: dict) -> dict:
    """config.json of transformers' NemotronH (as its `save_pretrained` writes it)."""
    drop = ("hidden_act", "rope_theta", "rope_parameters")
    return {**{k: v for k, v in common.items() if k not in drop},
            "layers_block_type": [HYBRID_HF[k] for k in cfg.hybrid_pattern],
            "layer_norm_epsilon": cfg.norm_epsilon, "mlp_hidden_act": cfg.traits.hidden_act,
            "mamba_hidden_act": "silu", "mamba_num_heads": cfg.mamba_heads,
            "mamba_head_dim": cfg.mamba_head_dim, "n_groups": cfg.mamba_groups,
            "ssm_state_size": cfg.mamba_state, "conv_kernel": cfg.mamba_conv_kernel,
            "chunk_size": cfg.mamba_chunk_size, "use_conv_bias": True, "use_bias": False,
            "mamba_proj_bias": False, "mlp_bias": False, "attention_bias": False}


def check_nemotron_nas(cfg: ModelConfig) -> None:
    """Refuse, before any work, a heterogeneous export of a family other than Llama."""
    from megatron_minitron.config import ConfigError

    if cfg.family != "llama":
        raise ConfigError(f"a heterogeneous {cfg.family} model has no Hugging Face format: "
                          "Nemotron-NAS (the one per-layer format) is Llama's")


def _nemotron_nas_config(cfg: ModelConfig, common: dict) -> dict:
    """config.json of a heterogeneous Llama in the Nemotron-NAS format. Each block gives its
    width twice: `ffn_hidden_size`, exact, which Megatron-Core's HeterogeneousTransformerConfig
    reads, and `ffn_mult`, which the DeciLM code reads and rounds up to a multiple of 256
    (exact for such widths)."""
    check_nemotron_nas(cfg)
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    blocks = [{"attention": {"no_op": not cfg.attention_of(i), "replace_with_linear": False,
                             "n_heads_in_group": per_group if cfg.attention_of(i) else None},
               "ffn": {"no_op": not cfg.ffn_of(i), "replace_with_linear": False,
                       "ffn_hidden_size": cfg.ffn_of(i) or None,
                       "ffn_mult": 1.5 * cfg.ffn_of(i) / cfg.hidden_size if cfg.ffn_of(i)
                       else None}}
              for i in range(cfg.num_layers)]
    drop = ("intermediate_size", "num_key_value_heads")
    return {**{k: v for k, v in common.items() if k not in drop}, **NEMOTRON_NAS,
            "block_configs": blocks, "rms_norm_eps": cfg.norm_epsilon,
            "attention_bias": False, "mlp_bias": False,
            "rope_scaling": common["rope_parameters"] if cfg.rope_scaling_factor else None}


def _heterogeneous_fields(hf: dict, source: str) -> dict:
    """A Nemotron-NAS config's per-layer widths and attention; refused: blocks replaced by a
    linear layer, and query groups that differ between layers."""
    from megatron_minitron.config import ConfigError

    if "block_configs" not in hf:
        return {}
    heads, ffn, attention, per_group = hf["num_attention_heads"], [], [], set()
    for i, b in enumerate(hf["block_configs"]):
        a, f = b["attention"], b.get("ffn") or b["mlp"]
        if a.get("replace_with_linear") or f.get("replace_with_linear"):
            raise ConfigError(f"{source}: layer {i} replaces a block with a linear layer, which "
                              "is not supported")
        attention.append(not a.get("no_op"))
        if attention[-1]:
            per_group.add(a.get("n_heads_in_group") or 1)
        width = 0 if f.get("no_op") else f.get("ffn_hidden_size") or _ffn_mult_width(
            f["ffn_mult"], hf["hidden_size"])
        ffn.append(int(width))
    if len(per_group) > 1:
        raise ConfigError(f"{source}: query groups differ between layers ({sorted(per_group)} "
                          "heads per group), which is not supported")
    return dict(layer_ffn=ffn, layer_attention=attention, ffn_hidden_size=max(ffn),
                num_query_groups=heads // (per_group.pop() if per_group else 1))


def _ffn_mult_width(mult: float, hidden: int) -> int:
    """The DeciLM code's MLP width for `ffn_mult`: 2/3 of mult x hidden, rounded up to 256."""
    width = int(2 * mult * hidden / 3)
    return -(-width // 256) * 256


def _integral(x: float) -> float | int:
    return round(x) if abs(x - round(x)) < 1e-6 else x


def _refuse_unsupported(hf: dict, source: str) -> None:
    from megatron_minitron.config import ConfigError

    for key, ok in UNSUPPORTED.items():
        if hf.get(key, ok) not in (ok, None):
            raise ConfigError(f"{source}: config field {key}={hf[key]!r} changes the network and "
                              "is not supported")
    unknown = set(hf.get("layer_types") or ()) - set(LAYER_TYPES)
    if unknown and hf.get("model_type") != "nemotron_h":
        raise ConfigError(f"{source}: layer types {sorted(unknown)} are not supported "
                          f"({', '.join(LAYER_TYPES)})")


def _windows(hf: dict, family: str) -> tuple[int | None, list[int] | None]:
    """(sliding window, per-layer flags): Mistral slides in every layer; Gemma 3 (and any model
    with `layer_types`) in the layers marked sliding; Qwen's window is off unless
    `use_sliding_window`, which is refused."""
    flags = [LAYER_TYPES[t] for t in hf.get("layer_types") or ()]
    if any(flags):
        return hf["sliding_window"], flags
    return (hf.get("sliding_window") if family in ("mistral", "mixtral") else None), None


def model_config_from_hf(hf: dict, source: str) -> ModelConfig:
    from megatron_minitron.config import ConfigError

    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    family = HF_ARCHITECTURES.get(arch)
    if family is None:
        raise ConfigError(f"{source}: unsupported architecture {arch!r} "
                          f"(supported: {', '.join(HF_ARCHITECTURES)})")
    _refuse_unsupported(hf, source)
    traits = FAMILIES[family]
    for key in ("hidden_act", "hidden_activation"):
        if hf.get(key, traits.hidden_act) != traits.hidden_act:
            raise ConfigError(f"{source}: {key} {hf[key]!r} is not supported for {arch} "
                              f"(expected {traits.hidden_act!r})")
    params = hf.get("rope_parameters") or {}
    local = params.get("sliding_attention", {}).get("rope_theta", hf.get("rope_local_base_freq"))
    params = params.get("full_attention", params)  # Gemma 3: one RoPE per layer type
    rope = {**(hf.get("rope_scaling") or {}), **params}
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    scaling = _rope_scaling_factor(rope, source)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    scalar = hf.get("query_pre_attn_scalar", head_dim)
    window, window_layers = _windows(hf, family)
    cfg = ModelConfig(
        family=family,
        # NemotronH's config.json gives its layers only as their kinds
        num_layers=hf.get("num_hidden_layers") or len(hf.get("layers_block_type") or
                                                      hf.get("hybrid_override_pattern") or ""),
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf.get("intermediate_size", 0),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rotary_percent=float(rope.get("partial_rotary_factor",
                                      hf.get("partial_rotary_factor", 1.0))),
        norm_epsilon=float(hf.get("rms_norm_eps", hf.get("norm_eps",
                                                         hf.get("layer_norm_epsilon", 1e-5)))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling_factor=scaling,
        sliding_window=window,
        window_layers=window_layers,
        local_rotary_base=float(local) if local is not None and window_layers else None,
        softmax_scale=None if scalar == head_dim else float(scalar) ** -0.5,
        **_moe_fields(hf, family, source),
        **_hybrid_fields(hf, family, source),
    )
    cfg = dataclasses.replace(cfg, **_heterogeneous_fields(hf, source))
    cfg.validate()
    return cfg


def _hybrid_fields(hf: dict, family: str, source: str) -> dict:
    """NemotronH's layer pattern and Mamba shape. Refused: MoE layers, biases, another
    activation, a clamped time step (Megatron's mixer does not clamp)."""
    from megatron_minitron.config import ConfigError

    if family != "nemotron_h":
        return {}
    kinds = hf.get("layers_block_type") or list(hf.get("hybrid_override_pattern") or "")
    unknown = sorted(set(kinds) - set(HYBRID_SYMBOLS))
    if unknown or not kinds:
        raise ConfigError(f"{source}: hybrid layer types {unknown or 'missing'} are not supported "
                          "(Mamba, attention and MLP layers; not MoE)")
    refused = {"use_bias": False, "mamba_proj_bias": False, "use_conv_bias": True,
               "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2"}
    for key, ok in refused.items():
        if hf.get(key, ok) != ok:
            raise ConfigError(f"{source}: config field {key}={hf[key]!r} is not supported "
                              f"(expected {ok!r})")
    limit = hf.get("time_step_limit") or [0.0, None]
    if float(limit[0]) != 0.0 or not (limit[1] is None or isinstance(limit[1], dict) or
                                     float(limit[1]) == float("inf")):
        raise ConfigError(f"{source}: time_step_limit {limit} is not supported (no clamp)")
    return dict(hybrid_pattern="".join(HYBRID_SYMBOLS[k] for k in kinds),
                mamba_heads=hf["mamba_num_heads"], mamba_head_dim=hf["mamba_head_dim"],
                mamba_groups=hf["n_groups"], mamba_state=hf["ssm_state_size"],
                mamba_conv_kernel=hf.get("conv_kernel", 4),
                mamba_chunk_size=hf.get("chunk_size", 128))


def _moe_fields(hf: dict, family: str, source: str) -> dict:
    """Mixtral's, Qwen3-MoE's and Qwen2-MoE's expert fields; every layer must be an MoE layer.
    Absent fields take transformers' defaults (Qwen's norm_topk_prob is False)."""
    from megatron_minitron.config import ConfigError

    if family not in MOE_HF:
        return {}
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise ConfigError(f"{source}: dense MLP layers among the MoE layers (decoder_sparse_step "
                          f"{hf.get('decoder_sparse_step')}, mlp_only_layers "
                          f"{hf.get('mlp_only_layers')}) are not supported")
    # Qwen3-MoE's Hub configs say num_experts, transformers 5 writes num_local_experts
    experts = next((k for k in ("num_local_experts", "num_experts") if k in hf),
                   "num_local_experts")
    width = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    shared = ("shared_expert_intermediate_size",) if family == "qwen2_moe" else ()
    missing = [k for k in (experts, width, "num_experts_per_tok", *shared) if not hf.get(k)]
    if missing:
        raise ConfigError(f"{source}: a {family} config needs {', '.join(missing)}")
    return dict(num_moe_experts=hf[experts], moe_ffn_hidden_size=hf[width],
                moe_router_topk=hf["num_experts_per_tok"],
                moe_router_pre_softmax=not hf.get("norm_topk_prob", family == "mixtral"),
                moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0),
                moe_shared_ffn_hidden_size=hf[shared[0]] if shared else None)


def _rope_scaling_factor(rope: dict, source: str) -> float | None:
    from megatron_minitron.config import ConfigError

    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    fixed = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    if kind == "llama3" and all(float(rope.get(k, -1)) == v for k, v in fixed.items()):
        return float(rope["factor"])
    raise ConfigError(f"{source}: RoPE scaling {rope} is not supported (plain RoPE, or llama3 "
                      f"scaling with {fixed})")
