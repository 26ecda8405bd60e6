"""Plain dataclasses that describe a model and how it is sharded.

A checkpoint directory stores `ModelConfig` as JSON, so every command rebuilds the exact GPTModel
from the directory alone. Family-specific choices (norm, activation, zero-centred gamma) are derived
from `family` in one place, `family_traits`, rather than stored as free fields that could
disagree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_minitron.options import option


class ConfigError(ValueError):
    """A shape, parallel layout or file that cannot work; the message names the offending value.
    Commands exit 2 (bad usage or input)."""

    exit_code = 2


class TrainingError(RuntimeError):
    """Training cannot continue (NaN/Inf); the last good checkpoint is kept. Commands exit 3."""

    exit_code = 3


@contextlib.contextmanager
def prefixed(where: str):
    """Errors of a stage run inside another command (run, search) name where they happened;
    their type, hence the exit code, is kept."""
    try:
        yield
    except (ConfigError, TrainingError) as e:
        raise type(e)(f"{where}: {e}") from e


@dataclass(frozen=True)
class FamilyTraits:
    """Everything that sets one model family apart, in one row: the network (norm, activation,
    QKV bias, q/k norm) and its Hugging Face names. Layout code reads these flags; no stage
    branches on the family's name."""

    architecture: str  # transformers class
    model_type: str  # config.json "model_type"
    hidden_act: str  # config.json "hidden_act"
    normalization: str = "RMSNorm"  # "RMSNorm" | "LayerNorm"
    activation: str = "swiglu"  # "swiglu" | "geglu" (tanh GELU gate) | "squared_relu"
    zero_centered_gamma: bool = False  # stored gamma is (weight - 1): LayerNorm1P, Gemma's RMSNorm
    qkv_bias: bool = False  # Qwen2: biases on q/k/v (not on o_proj)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k (shared by heads)
    post_norms: bool = False  # Gemma 3: norms on the attention and MLP outputs too
    scaled_embedding: bool = False  # Gemma: embeddings times sqrt(hidden)

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")


FAMILIES = {
    "llama": FamilyTraits("LlamaForCausalLM", "llama", "silu"),
    "mistral": FamilyTraits("MistralForCausalLM", "mistral", "silu"),
    "qwen2": FamilyTraits("Qwen2ForCausalLM", "qwen2", "silu", qkv_bias=True),
    "qwen3": FamilyTraits("Qwen3ForCausalLM", "qwen3", "silu", qk_norm=True),
    "nemotron": FamilyTraits("NemotronForCausalLM", "nemotron", "relu2", "LayerNorm",
                             "squared_relu", zero_centered_gamma=True),
    "gemma3": FamilyTraits("Gemma3ForCausalLM", "gemma3_text", "gelu_pytorch_tanh",
                           activation="geglu", zero_centered_gamma=True, qk_norm=True,
                           post_norms=True, scaled_embedding=True),
    # Mixture of experts in every layer (`ModelConfig.num_moe_experts`).
    "mixtral": FamilyTraits("MixtralForCausalLM", "mixtral", "silu"),
    "qwen3_moe": FamilyTraits("Qwen3MoeForCausalLM", "qwen3_moe", "silu", qk_norm=True),
    "qwen2_moe": FamilyTraits("Qwen2MoeForCausalLM", "qwen2_moe", "silu", qkv_bias=True),
    # Hybrid Mamba-2 / attention / MLP layers (`ModelConfig.hybrid_pattern`), no position
    # embedding: Nemotron-H, Nemotron Nano 2.
    "nemotron_h": FamilyTraits("NemotronHForCausalLM", "nemotron_h", "relu2",
                               activation="squared_relu"),
}


def family_traits(family: str) -> FamilyTraits:
    if family not in FAMILIES:
        raise ConfigError(f"unsupported model family {family!r}; supported: "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[family]


@dataclass
class ModelConfig:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    # Llama-3.1 RoPE scaling (Megatron's fixed low/high frequency factors 1/4, original context
    # 8192); None = plain RoPE.
    rope_scaling_factor: float | None = None
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    # Sliding-window attention: each token sees itself and the window - 1 before it (Megatron's
    # `window_size`, honoured by the local and TE attention alike), in every layer (Mistral) or
    # in the layers flagged 1 in `window_layers` (Gemma 3), whose RoPE base is
    # `local_rotary_base` when set.
    sliding_window: int | None = None
    window_layers: list[int] | None = None
    local_rotary_base: float | None = None
    softmax_scale: float | None = None  # None: 1 / sqrt(kv_channels)
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is `num_moe_experts` SwiGLU
    # experts of width `moe_ffn_hidden_size`, `moe_router_topk` of them per token. Weights are the
    # softmax over the top k router logits (Mixtral; Qwen3-MoE's norm_topk_prob), or with
    # `moe_router_pre_softmax` the top k of the softmax over all experts, not renormalised.
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    moe_router_pre_softmax: bool = False
    # A shared expert every token goes through, its output scaled by sigmoid(gate . x) (Qwen2-MoE).
    moe_shared_ffn_hidden_size: int | None = None
    # Weight of the router's load-balancing loss in training (HF router_aux_loss_coef); 0: off.
    moe_aux_loss_coeff: float = 0.0
    # Hybrid models (Nemotron-H): layer i is a Mamba-2 mixer ("M"), self-attention ("*") or an
    # MLP ("-") after its own norm, Megatron's and transformers' pattern string. A Mamba mixer has
    # `mamba_heads` heads of `mamba_head_dim` channels whose B and C are shared within each of
    # `mamba_groups` groups, `mamba_state` state channels, a causal conv of
    # `mamba_conv_kernel` taps, and scans in chunks of `mamba_chunk_size` tokens.
    hybrid_pattern: str | None = None
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 0
    mamba_state: int = 0
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    # Heterogeneous students (Puzzle, `prune --heterogeneous`): layer i's MLP is `layer_ffn[i]`
    # wide (0: no MLP) and it has attention when `layer_attention[i]`; None: every layer has
    # ffn_hidden_size and attention. Built with Megatron-Core's HeterogeneousTransformerConfig.
    layer_ffn: list[int] | None = None
    layer_attention: list[bool] | None = None

    @property
    def traits(self) -> FamilyTraits:
        return family_traits(self.family)

    @property
    def moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def hybrid(self) -> bool:
        return self.hybrid_pattern is not None

    @property
    def attention_layers(self) -> list[int] | None:
        """A hybrid's attention layers (None: every layer has attention)."""
        if not self.hybrid:
            return None
        return [i for i, kind in enumerate(self.hybrid_pattern) if kind == "*"]

    @property
    def heterogeneous(self) -> bool:
        return self.layer_ffn is not None

    def ffn_of(self, layer: int) -> int:
        """Layer `layer`'s MLP width (0: the layer has no MLP)."""
        return self.layer_ffn[layer] if self.heterogeneous else self.ffn_hidden_size

    def attention_of(self, layer: int) -> bool:
        return bool(self.layer_attention[layer]) if self.heterogeneous else True

    @property
    def mamba_inner(self) -> int:
        """A Mamba mixer's channels (heads x head_dim): the width of x, z and the gated norm."""
        return self.mamba_heads * self.mamba_head_dim

    @property
    def mlp_width(self) -> int:
        """The width of each MLP: an expert's under MoE."""
        return self.moe_ffn_hidden_size if self.moe else self.ffn_hidden_size

    def validate(self) -> None:
        family_traits(self.family)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.window_layers is not None and len(self.window_layers) != self.num_layers:
            raise ConfigError(f"window_layers has {len(self.window_layers)} entries for "
                              f"{self.num_layers} layers")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}")
        if self.hybrid:
            self._validate_hybrid()
        if self.heterogeneous or self.layer_attention is not None:
            self._validate_heterogeneous()
        if self.moe:
            if self.num_moe_experts < 1 or not self.moe_ffn_hidden_size:
                raise ConfigError(f"num_moe_experts={self.num_moe_experts} and "
                                  f"moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be "
                                  "positive")
            if (self.moe_shared_ffn_hidden_size or 1) < 1:
                raise ConfigError(f"moe_shared_ffn_hidden_size={self.moe_shared_ffn_hidden_size} "
                                  "must be positive")
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                raise ConfigError(f"moe_router_topk={self.moe_router_topk} must be between 1 "
                                  f"and num_moe_experts={self.num_moe_experts}")

    def _validate_hybrid(self) -> None:
        if len(self.hybrid_pattern) != self.num_layers or set(self.hybrid_pattern) - set("M*-"):
            raise ConfigError(f"hybrid_pattern {self.hybrid_pattern!r} must give each of the "
                              f"{self.num_layers} layers one of M (Mamba), * (attention), - (MLP)")
        for name in ("mamba_heads", "mamba_head_dim", "mamba_groups", "mamba_state",
                     "mamba_conv_kernel", "mamba_chunk_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mamba_heads % self.mamba_groups:
            raise ConfigError(f"mamba_heads={self.mamba_heads} is not a multiple of "
                              f"mamba_groups={self.mamba_groups}")

    def _validate_heterogeneous(self) -> None:
        if self.moe or self.hybrid:
            raise ConfigError("per-layer widths (layer_ffn, layer_attention) are for dense "
                              f"transformers; this {self.family} model has experts or Mamba layers")
        for name in ("layer_ffn", "layer_attention"):
            value = getattr(self, name)
            if value is None or len(value) != self.num_layers:
                raise ConfigError(f"{name} must give each of the {self.num_layers} layers a "
                                  f"value, got {value}")
        blocks = zip(self.layer_ffn, self.layer_attention, strict=True)
        for i, (width, attention) in enumerate(blocks):
            if width < 0 or width > self.ffn_hidden_size:
                raise ConfigError(f"layer {i}: MLP width {width} must be between 0 and "
                                  f"ffn_hidden_size={self.ffn_hidden_size}")
            if width == 0 and not attention:
                raise ConfigError(f"layer {i} has neither attention nor an MLP: drop it instead")

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Raise unless this shape can be split over `tp` tensor, `pp` pipeline and `ep` expert
        ranks."""
        if tp < 1 or pp < 1 or ep < 1:
            raise ConfigError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} ep={ep}")
        if ep > 1 and not self.moe:
            raise ConfigError(f"expert parallel size {ep} needs a mixture-of-experts model; "
                              f"this {self.family} model has none")
        if self.moe and self.num_moe_experts % ep:
            raise ConfigError(f"expert parallel size {ep} does not divide "
                              f"num_moe_experts={self.num_moe_experts}")
        for name in ("num_attention_heads", "num_query_groups",
                     *(("moe_ffn_hidden_size", "moe_shared_ffn_hidden_size") if self.moe
                       else ("ffn_hidden_size",)),
                     *(("mamba_heads", "mamba_groups") if self.hybrid else ())):
            if (getattr(self, name) or 0) % tp:
                raise ConfigError(f"tensor parallel size {tp} does not divide "
                                  f"{name}={getattr(self, name)}")
        for i, width in enumerate(self.layer_ffn or ()):
            if width % tp:
                raise ConfigError(f"tensor parallel size {tp} does not divide layer {i}'s MLP "
                                  f"width {width}")
        if self.num_layers % pp:
            raise ConfigError(f"pipeline parallel size {pp} does not divide "
                              f"num_layers={self.num_layers}")

    def num_parameters(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Exact parameter count of the GPTModel this config builds (tied weights counted once);
        `active`: the parameters one token goes through (an MoE layer's router and its top-k
        experts), what sets the compute per token."""
        h, f, t = self.hidden_size, self.mlp_width, self.traits
        q = self.num_attention_heads * self.kv_channels
        kv = 2 * self.num_query_groups * self.kv_channels
        norm = h * (2 if t.normalization == "LayerNorm" else 1)

        def mlp_of(width: int) -> int:
            return (2 if t.gated else 1) * width * h + width * h

        mlp = mlp_of(f)
        if self.moe:  # the router, every expert (or the top k), the gated shared expert
            shared = self.moe_shared_ffn_hidden_size
            mlp = (self.num_moe_experts * h + (self.moe_router_topk if active else
                                               self.num_moe_experts) * mlp
                   + (mlp_of(shared) + h if shared else 0))
        attention = h * (q + kv) + q * h
        attention += (q + kv if t.qkv_bias else 0) + (2 * self.kv_channels if t.qk_norm else 0)
        if self.hybrid:  # each layer is one block after its own norm
            size = {"M": self._mamba_parameters(), "*": attention, "-": mlp}
            total = sum(size[k] + norm for k in self.hybrid_pattern) + norm
        else:  # each block with its norm (and Gemma's post-norm), where the layer has it
            block_norms = norm * (2 if t.post_norms else 1)

            def layer(i: int) -> int:
                width = self.ffn_of(i)
                return ((attention + block_norms if self.attention_of(i) else 0) +
                        ((mlp_of(width) if self.heterogeneous else mlp) + block_norms
                         if width else 0))

            total = sum(layer(i) for i in range(self.num_layers)) + norm
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    def _mamba_parameters(self) -> int:
        """in_proj (z, x, B, C, dt), the depthwise conv over x, B, C with its bias, A, D and the
        dt bias per head, the gated norm, out_proj."""
        h, inner, heads = self.hidden_size, self.mamba_inner, self.mamba_heads
        conv = inner + 2 * self.mamba_groups * self.mamba_state
        return (h * (inner + conv + heads) + conv * (self.mamba_conv_kernel + 1) + 3 * heads +
                inner + inner * h)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


# Megatron's precision flags (--bf16, --fp16; fp32 when neither) -> torch dtype names.
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ParallelConfig:
    """How a command runs its model: Megatron's parallel sizes (data parallelism is whatever the
    world size leaves) and the precision of the weights and activations."""

    tp: int = option(1, flag="--tensor-model-parallel-size", short="--tp",
                     help="tensor-parallel ranks")
    pp: int = option(1, flag="--pipeline-model-parallel-size", short="--pp",
                     help="pipeline-parallel stages")
    ep: int = option(1, flag="--expert-model-parallel-size", short="--ep",
                     help="expert-parallel ranks (mixture-of-experts models): each holds "
                          "experts / ep of every layer's experts")
    vpp: int | None = option(None, flag="--virtual-pipeline-model-parallel-size", short="--vpp",
                             help="virtual pipeline stages per rank (interleaved schedule)")
    sequence_parallel: bool = option(False, help="split activations along the sequence over "
                                                 "the TP ranks (Megatron's sequence parallel)")
    # None: bf16 on a GPU (TE's fused attention needs it), fp32 on CPU; commands that only
    # rewrite weights (convert, prune) keep the checkpoint's own dtype instead.
    precision: str | None = option(None, choices=tuple(PRECISIONS), choice_flags=True,
                                   help="weights and activations (default: bf16 on a GPU, "
                                        "fp32 on CPU; convert and prune keep the checkpoint's "
                                        "dtype)")

    distributed_timeout_minutes: float = option(
        10, help="how long a collective may wait before the job fails (torch.distributed's "
                 "timeout; NCCL's watchdog enforces it). Rank-0-only work (tokenizing, dataset "
                 "indices) is waited for without it")

    def layout(self) -> tuple:
        """What decides Megatron's process groups: equal layouts reuse them."""
        return self.tp, self.pp, self.vpp, self.ep

    def check_sequence(self, seq_length: int, flag: str = "--seq-length") -> None:
        """Sequence parallelism splits every sequence over the TP ranks."""
        if self.sequence_parallel and seq_length % self.tp:
            raise ConfigError(f"{flag} {seq_length} is not divisible by tensor parallel size "
                              f"{self.tp}; sequence parallelism splits each sequence over the TP "
                              "ranks")

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tp == 1:
            # Megatron ignores SP at TP=1; keep the flag honest.
            self.sequence_parallel = False
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r} (choose from "
                              f"{', '.join(PRECISIONS)})")

    def dtype(self, stored: str | None = None):
        """The torch dtype to build the model in; `stored`: the checkpoint's dtype, kept when no
        precision was asked for (weight rewrites)."""
        import torch

        if self.precision is not None:
            return getattr(torch, PRECISIONS[self.precision])
        if stored is not None:
            return getattr(torch, stored)
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32


@dataclass
class CheckpointMeta:
    """What a checkpoint directory says about itself (stored as minitron.json)."""

    model: ModelConfig
    tokenizer: str | None = None  # file name inside <ckpt>/tokenizer/
    source: str = ""
    history: list[str] = field(default_factory=list)
    format_version: int = 1
    # Identity of the weights: set when a checkpoint with new weights is written, kept when the
    # same weights are resharded. Scores files record it so prune can refuse foreign scores.
    fingerprint: str = ""
    # Written by prune: the source checkpoint's embedding channel behind each of this model's
    # channels. Maps hidden states for the distillation hidden-state loss.
    hidden_map: list[int] | None = None
    # The dtype of the stored weights (written from the model that saved them).
    params_dtype: str = "float32"

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> CheckpointMeta:
        try:
            d = json.loads(Path(path).read_text())
        except (FileNotFoundError, NotADirectoryError):
            d = Path(path).parent
            hint = (f"it is a Hugging Face model: run `minitron convert {d} CKPT` and use CKPT"
                    if (d / "config.json").is_file() else
                    f"run `minitron convert {d} CKPT` and use CKPT"
                    if d.suffix == ".gguf" else
                    "give a directory written by minitron convert, prune or distill, or a "
                    "Megatron-LM save directory")
            raise ConfigError(f"{d} is not a megatron-minitron checkpoint ({Path(path).name} "
                              f"not found); {hint}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        d["model"] = ModelConfig.from_dict(d["model"])
        return cls(**d)
