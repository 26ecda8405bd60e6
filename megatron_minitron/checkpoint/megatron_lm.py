"""Megatron-LM's own checkpoints (`pretrain_gpt.py --save`, `--ckpt-format torch_dist`), read
and written, so that what users trained is pruned where it lies and what we write they keep
training.

A Megatron-LM save directory:
  latest_checkpointed_iteration.txt   the newest iteration, or `release` (converted weights)
  iter_0000100/ or release/           a dist checkpoint: the model's sharded state dict under
                                      `model` (`model0`, `model1` with virtual stages), the
                                      optimizer and RNG when saved, and in `common.pt` the
                                      training `args` (argparse.Namespace), `checkpoint_version`
                                      and `iteration`
Its model tensors are ours: Megatron-Core's GPTModel sharded state dict, TP/PP-independent keys
(`decoder.layers.self_attention.linear_qkv.weight`, layers stacked), whichever spec wrote them.
Only the description differs, and that is what this module maps: `args` <-> ModelConfig. The
args pickle is read with torch's weights-only unpickler and Megatron-Core's own allow-list
(`megatron.core.safe_globals`): nothing in it runs. Checked against Megatron-LM `core_v0.16.1`
(`megatron/training/checkpointing.py`, `arguments.py`); see docs/architecture.md.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Any

from megatron_minitron.config import CheckpointMeta, ConfigError, ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
COMMON_FILE = "common.pt"  # the non-sharded state, written by megatron-core up to 0.18
TOKENIZER_DIR = "tokenizer"  # where Megatron-LM (after 0.19) and we put the tokenizer's files
CHECKPOINT_VERSION = 3.0
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # the rest: optimizer, RNG, ...
_ITER_DIR = re.compile(r"iter_\d{7}|release")


def is_megatron_lm_dir(path: Path) -> bool:
    """A save directory (tracker file) or one of its iteration directories."""
    path = Path(path)
    return (path / TRACKER).is_file() or (
        bool(_ITER_DIR.fullmatch(path.name)) and (path / "metadata.json").is_file())


def iteration_dir(path: Path) -> Path:
    """The iteration the tracker names (Megatron-LM's `read_metadata`), or PATH itself when it
    is an `iter_*` / `release` directory."""
    path = Path(path)
    if _ITER_DIR.fullmatch(path.name):
        return path
    text = (path / TRACKER).read_text().strip()
    if text == RELEASE:
        return path / RELEASE
    if not text.isdigit():
        raise ConfigError(f"{path / TRACKER}: {text[:40]!r} is neither an iteration nor "
                          f"{RELEASE!r}")
    it = path / f"iter_{int(text):07d}"
    if not (it / "metadata.json").is_file():
        raise ConfigError(f"{path}: the tracker names iteration {int(text)} but {it.name}/ is "
                          "missing or incomplete (no metadata.json)")
    return it


def _safe_globals() -> list:
    """Megatron-Core's allow-list (what Megatron-LM itself reads back from common.pt), and the
    plain types a newer release's args hold that an older list lacks (0.16's `exit_signal`)."""
    import signal

    try:
        from megatron.core import safe_globals
        allowed = list(safe_globals.SAFE_GLOBALS)
    except ImportError:
        allowed = []
    return [*allowed, argparse.Namespace, signal.Signals]


def read_common(it: Path) -> dict[str, Any]:
    """common.pt of an iteration directory, through the weights-only unpickler: a pickle that
    names anything outside the allow-list (a payload calling os.system) is refused, unrun."""
    import pickle

    import torch

    f = it / COMMON_FILE
    if not f.is_file():
        raise ConfigError(f"{it}: no {COMMON_FILE} (written by megatron-core 0.19 or later, which "
                          "keeps the args inside the shards; not read yet): save with "
                          "megatron-core <= 0.18 or convert through Hugging Face")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            common = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (f"it names {found.group(1)}, which is not an allowed type (refused, not run)"
                if found else f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        raise ConfigError(f"{f}: {what}") from None
    if not isinstance(common, dict) or not isinstance(common.get("args"), argparse.Namespace):
        raise ConfigError(f"{f} holds no training args (not a Megatron-LM checkpoint)")
    return common


def _arg(args: dict, name: str, *old: str, default: Any = None) -> Any:
    """An args field under its name or a former one (0.16 renamed norm_epsilon ->
    layernorm_epsilon, apply_layernorm_1p -> layernorm_zero_centered_gamma)."""
    for n in (name, *old):
        if args.get(n) is not None:
            return args[n]
    return default


def _refuse(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"Megatron-LM arg {name}={value!r}: {why}")


def family_from_args(args: dict) -> str:
    """The family whose network the args describe; one line naming the arg that fits none."""
    if _arg(args, "position_embedding_type", default="learned_absolute") != "rope":
        raise _refuse("position_embedding_type", args.get("position_embedding_type"),
                      "only rotary position embeddings map to a family here")
    if args.get("add_bias_linear", True):
        raise _refuse("add_bias_linear", True, "biases on every linear layer (GPT-2 style) map "
                      "to no family here (train with --disable-bias-linear)")
    norm = _arg(args, "normalization", default="LayerNorm")
    zero_centered = bool(_arg(args, "layernorm_zero_centered_gamma", "apply_layernorm_1p",
                              default=False))
    qk_norm, qkv_bias = bool(args.get("qk_layernorm")), bool(args.get("add_qkv_bias"))
    experts = args.get("num_experts")
    if args.get("squared_relu"):
        if norm != "LayerNorm" or not zero_centered or qk_norm or qkv_bias or experts:
            raise _refuse("squared_relu", True, "only Nemotron-4's network (LayerNorm with "
                          "--apply-layernorm-1p, no q/k norm, no biases, dense) is mapped")
        return "nemotron"
    if not args.get("swiglu"):
        raise _refuse("swiglu", False, "the MLP must be SwiGLU (or squared ReLU, Nemotron)")
    if norm != "RMSNorm" or zero_centered:
        raise _refuse("normalization", norm, "SwiGLU families here use plain RMSNorm")
    if experts:
        if args.get("moe_grouped_gemm"):
            raise _refuse("moe_grouped_gemm", True, "grouped-GEMM experts store another "
                          "layout; save with --moe-grouped-gemm off (SequentialMLP)")
        if args.get("moe_shared_expert_intermediate_size"):
            return "qwen2_moe"
        return "qwen3_moe" if qk_norm else "mixtral"
    if qk_norm:
        return "qwen3"
    if qkv_bias:
        return "qwen2"
    return "mistral" if args.get("window_size") else "llama"


def model_config_from_args(args: dict) -> ModelConfig:
    """Megatron-LM's training args (vars of the Namespace) -> ModelConfig. The vocabulary is the
    padded one the embedding holds (`padded_vocab_size`)."""
    family = family_from_args(args)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
        if not isinstance(args.get(name), int):
            raise _refuse(name, args.get(name), "missing from the checkpoint's args")
    if args.get("hybrid_override_pattern"):
        raise _refuse("hybrid_override_pattern", args["hybrid_override_pattern"],
                      "hybrid Mamba models are not supported")
    heads, hidden = args["num_attention_heads"], args["hidden_size"]
    groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    window = args.get("window_size")
    experts = args.get("num_experts")
    scaling = args.get("use_rope_scaling") or args.get("rope_scaling")
    cfg = ModelConfig(
        family=family, num_layers=args["num_layers"], hidden_size=hidden,
        ffn_hidden_size=args.get("ffn_hidden_size") or 4 * hidden,
        num_attention_heads=heads, num_query_groups=groups or heads,
        kv_channels=args.get("kv_channels") or hidden // heads,
        vocab_size=args["padded_vocab_size"],
        max_position_embeddings=args.get("max_position_embeddings") or 4096,
        rotary_base=float(args.get("rotary_base") or 10000),
        rotary_percent=float(args.get("rotary_percent") or 1.0),
        rope_scaling_factor=float(args.get("rope_scaling_factor") or 8.0) if scaling else None,
        norm_epsilon=float(_arg(args, "layernorm_epsilon", "norm_epsilon", default=1e-5)),
        tie_embeddings=not args.get("untie_embeddings_and_output_weights", False),
        sliding_window=window[0] + 1 if window else None,
        num_moe_experts=experts or None,
        moe_ffn_hidden_size=(args.get("moe_ffn_hidden_size") or args.get("ffn_hidden_size"))
        if experts else None,
        moe_router_topk=args.get("moe_router_topk") or 2,
        moe_router_pre_softmax=bool(args.get("moe_router_pre_softmax")),
        moe_shared_ffn_hidden_size=args.get("moe_shared_expert_intermediate_size") or None,
        moe_aux_loss_coeff=float(args.get("moe_aux_loss_coeff") or 0.0))
    cfg.validate()
    return cfg


def check_describable(cfg: ModelConfig, heterogeneous: bool = False) -> None:
    """Refuse, before any work, a model that Megatron-LM's args cannot rebuild (`heterogeneous`:
    a model that prune --heterogeneous will make of `cfg`)."""
    t = cfg.traits
    if t.post_norms or t.scaled_embedding or t.activation == "geglu":
        raise ConfigError(f"a {cfg.family} model has no Megatron-LM args equivalent (post-norms, "
                          "scaled embeddings, GeGLU): export it to Hugging Face instead")
    if cfg.window_layers is not None:
        raise ConfigError("sliding window in some layers only has no Megatron-LM args "
                          "equivalent: export it to Hugging Face instead")
    if cfg.heterogeneous or heterogeneous:  # Megatron-LM's heterogeneous args: not written yet
        raise ConfigError("heterogeneous students (per-layer widths) are written in this "
                          "project's format or as Hugging Face Nemotron-NAS only (not yet "
                          "Megatron-LM's or Megatron-Bridge's)")
    if cfg.hybrid:  # Megatron-LM's pretrain_mamba.py args: not written yet
        raise ConfigError("hybrid Mamba models are written in this project's format or as "
                          "Hugging Face only (not yet Megatron-LM's or Megatron-Bridge's)")


def args_from_model_config(cfg: ModelConfig, params_dtype: str, tokenizer: Path | None,
                           iteration: int = 0) -> argparse.Namespace:
    """The args Megatron-LM needs to rebuild this model (`--use-checkpoint-args`) and to pass
    `check_checkpoint_args`; both spellings of the fields 0.16 renamed."""
    check_describable(cfg)
    t = cfg.traits
    divisible = next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if cfg.vocab_size % d == 0)
    tokenizer_args = ({"tokenizer_type": "NullTokenizer", "tokenizer_model": None,
                       "vocab_size": cfg.vocab_size} if tokenizer is None else
                      {"tokenizer_type": "HuggingFaceTokenizer" if tokenizer.suffix == ".json"
                       else "SentencePieceTokenizer",
                       "tokenizer_model": str(tokenizer.parent if tokenizer.suffix == ".json"
                                              else tokenizer), "vocab_size": None})
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=min(cfg.max_position_embeddings, 4096),
        position_embedding_type="rope", add_position_embedding=False,
        rotary_base=int(cfg.rotary_base), rotary_percent=cfg.rotary_percent,
        use_rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
        normalization=t.normalization, norm_epsilon=cfg.norm_epsilon,
        layernorm_epsilon=cfg.norm_epsilon, apply_layernorm_1p=t.zero_centered_gamma,
        layernorm_zero_centered_gamma=t.zero_centered_gamma,
        swiglu=t.activation == "swiglu", squared_relu=t.activation == "squared_relu",
        add_bias_linear=False, add_qkv_bias=t.qkv_bias, qk_layernorm=t.qk_norm,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        window_size=(cfg.sliding_window - 1, 0) if cfg.sliding_window else None,
        num_experts=cfg.num_moe_experts, moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk, moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_shared_expert_intermediate_size=cfg.moe_shared_ffn_hidden_size,
        moe_shared_expert_gate=bool(cfg.moe_shared_ffn_hidden_size),
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, moe_grouped_gemm=False,
        padded_vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=divisible,
        **tokenizer_args,
        bf16=params_dtype == "bfloat16", fp16=params_dtype == "float16",
        transformer_impl="local", tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, iteration=iteration, consumed_train_samples=0,
        consumed_valid_samples=0, no_save_optim=True, no_save_rng=True,
        ckpt_format="torch_dist")


def common_state(meta: CheckpointMeta, it: Path, tokenizer_files: dict) -> dict[str, Any]:
    """What Megatron-LM's `save_checkpoint` puts beside the model (common.pt), for converted
    weights: `release` (iteration 0, no optimizer or RNG to look for)."""
    tok = next((n for n in ("tokenizer.json", "tokenizer.model") if n in tokenizer_files), None)
    args = args_from_model_config(meta.model, meta.params_dtype,
                                  it / TOKENIZER_DIR / tok if tok else None)
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}


def fingerprint(it: Path) -> str:
    """Identity of the weights (scores files record it): the dist checkpoint's index."""
    index = it / ".metadata"
    return hashlib.sha256(index.read_bytes() if index.is_file() else str(it).encode()).hexdigest()


def tokenizer_dir(path: Path) -> Path | None:
    """The tokenizer's files: in the iteration directory (what we and newer Megatron-LM write),
    else where the args' `tokenizer_model` points, when that exists on this machine."""
    it = iteration_dir(path)
    if (it / TOKENIZER_DIR).is_dir():
        return it / TOKENIZER_DIR
    model = vars(read_common(it)["args"]).get("tokenizer_model")
    if model and Path(model).exists():
        return Path(model) if Path(model).is_dir() else Path(model).parent
    return None


def read_meta(path: Path) -> CheckpointMeta:
    """What a Megatron-LM checkpoint says about itself, in our terms."""
    from megatron_minitron.data.tokenizer import find_tokenizer_file

    it = iteration_dir(path)
    args = vars(read_common(it)["args"])
    try:
        cfg = model_config_from_args(args)
    except ConfigError as e:
        raise ConfigError(f"{it}: {e}") from None
    tok_dir = tokenizer_dir(path)
    tok = find_tokenizer_file(tok_dir) if tok_dir else None
    dtype = "bfloat16" if args.get("bf16") else "float16" if args.get("fp16") else "float32"
    return CheckpointMeta(model=cfg, tokenizer=tok.name if tok else None,
                          source=f"megatron-lm:{it.resolve()}", fingerprint=fingerprint(it),
                          params_dtype=dtype)
