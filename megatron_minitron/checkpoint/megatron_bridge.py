"""Megatron-Bridge's checkpoints (NeMo 2 / `megatron.bridge` `save_megatron_model`,
`save_checkpoint`), read and written.

A Bridge save directory is Megatron-LM's (latest_checkpointed_iteration.txt, iter_0000000/ with the
same dist checkpoint of the model) but describes the model by its model provider, in
`iter_*/run_config.yaml`: `model:` holds the provider's class (`_target_`) and its fields, which
are TransformerConfig's (num_layers, gated_linear_unit, activation_func as `{_target_:
torch.nn.functional.silu}`, ...) plus the GPT provider's (vocab_size before padding,
should_pad_vocab, share_embeddings_and_output_weights, seq_length). The YAML is read with
`yaml.safe_load` and nothing in it is instantiated; the fields are mapped onto Megatron-LM's
args names and go through the same family rules (megatron_lm.py). The vocabulary is the rows
the stored embedding has. Checked against megatron-bridge 0.3.1 (PyPI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_minitron.checkpoint import megatron_lm
from megatron_minitron.config import CheckpointMeta, ConfigError, ModelConfig

RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.pt"
LATEST_TRAIN_STATE = "latest_train_state.pt"
PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
ACTIVATIONS = {"torch.nn.functional.silu": "silu",
               "megatron.core.activations.squared_relu": "squared_relu"}
# provider field -> Megatron-LM args name, where they differ (refusals name the field)
RENAMED = {"num_moe_experts": "num_experts", "rope_scaling": "use_rope_scaling",
           "seq_length": "max_position_embeddings"}


def is_bridge_dir(path: Path) -> bool:
    return megatron_lm.is_megatron_lm_dir(path) and (
        megatron_lm.iteration_dir(path) / RUN_CONFIG).is_file()


def stored_vocab_rows(it: Path) -> int:
    """Rows of the embedding as stored: the dist checkpoint's index says, no tensor is read."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_minitron.checkpoint.mcore import _install_safe_metadata_reader

    _install_safe_metadata_reader()
    meta = FileSystemReader(str(it)).read_metadata().state_dict_metadata
    return int(meta["embedding.word_embeddings.weight"].size[0])


def _target(value: Any) -> str | None:
    return value.get("_target_") if isinstance(value, dict) else None


def provider_fields(it: Path) -> dict[str, Any]:
    try:
        run = yaml.safe_load((it / RUN_CONFIG).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{it / RUN_CONFIG}: not valid YAML ({str(e).splitlines()[0]})") from None
    model = run.get("model") if isinstance(run, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{it / RUN_CONFIG} has no model: section (the model provider)")
    return model


def model_config_from_provider(model: dict[str, Any], vocab_rows: int) -> ModelConfig:
    """A provider's fields -> Megatron-LM's args names -> ModelConfig (one set of rules)."""
    activation = ACTIVATIONS.get(_target(model.get("activation_func")))
    if activation is None:
        raise ConfigError(f"Megatron-Bridge model field activation_func="
                          f"{_target(model.get('activation_func'))!r}: only SwiGLU (silu, gated) "
                          "and squared ReLU are mapped")
    gated = bool(model.get("gated_linear_unit"))
    args = {RENAMED.get(k, k): v for k, v in model.items() if not isinstance(v, dict)}
    heads, groups = model.get("num_attention_heads"), model.get("num_query_groups")
    args.update(swiglu=gated and activation == "silu", squared_relu=activation == "squared_relu"
                and not gated, padded_vocab_size=vocab_rows,
                group_query_attention=bool(groups) and groups != heads,
                untie_embeddings_and_output_weights=not model.get(
                    "share_embeddings_and_output_weights", True))
    try:
        return megatron_lm.model_config_from_args(args)
    except ConfigError as e:
        name = {v: k for k, v in RENAMED.items()}
        text = str(e).replace("Megatron-LM arg ", "Megatron-Bridge model field ")
        for lm_name, field in name.items():
            text = text.replace(f"field {lm_name}=", f"field {field}=")
        raise ConfigError(text) from None


def read_meta(path: Path) -> CheckpointMeta:
    from megatron_minitron.data.tokenizer import find_tokenizer_file

    it = megatron_lm.iteration_dir(path)
    model = provider_fields(it)
    try:
        cfg = model_config_from_provider(model, stored_vocab_rows(it))
    except ConfigError as e:
        raise ConfigError(f"{it}: {e}") from None
    tok_dir = it / megatron_lm.TOKENIZER_DIR
    tok = find_tokenizer_file(tok_dir) if tok_dir.is_dir() else None
    dtype = "bfloat16" if model.get("bf16") else "float16" if model.get("fp16") else "float32"
    return CheckpointMeta(model=cfg, tokenizer=tok.name if tok else None,
                          source=f"megatron-bridge:{it.resolve()}",
                          fingerprint=megatron_lm.fingerprint(it), params_dtype=dtype)


def _function(name: str) -> dict:
    return {"_target_": name, "_call_": False}


def run_config(cfg: ModelConfig, params_dtype: str) -> dict[str, Any]:
    """`run_config.yaml` with the model provider Bridge's `load_model_config` instantiates (the
    provider's defaults fill every field not given; the layer spec is Bridge's default: TE's
    when installed)."""
    megatron_lm.check_describable(cfg)
    t = cfg.traits
    model = {
        "_target_": PROVIDER, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups, "kv_channels": cfg.kv_channels,
        "normalization": t.normalization, "layernorm_epsilon": cfg.norm_epsilon,
        "layernorm_zero_centered_gamma": t.zero_centered_gamma,
        "gated_linear_unit": t.gated,
        "activation_func": _function(next(k for k, v in ACTIVATIONS.items() if v == (
            "silu" if t.activation == "swiglu" else t.activation))),
        "add_bias_linear": False, "add_qkv_bias": t.qkv_bias, "qk_layernorm": t.qk_norm,
        "position_embedding_type": "rope", "rotary_base": int(cfg.rotary_base),
        "rotary_percent": cfg.rotary_percent, "rope_scaling": cfg.rope_scaling_factor is not None,
        "rope_scaling_factor": cfg.rope_scaling_factor or 8.0,
        "share_embeddings_and_output_weights": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size, "should_pad_vocab": False,
        "seq_length": cfg.max_position_embeddings,
        "window_size": [cfg.sliding_window - 1, 0] if cfg.sliding_window else None,
        "params_dtype": _function(f"torch.{params_dtype}"),
        "bf16": params_dtype == "bfloat16", "fp16": params_dtype == "float16"}
    if cfg.moe:
        model.update(num_moe_experts=cfg.num_moe_experts,
                     moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
                     moe_router_topk=cfg.moe_router_topk,
                     moe_router_pre_softmax=cfg.moe_router_pre_softmax,
                     moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, moe_grouped_gemm=False,
                     moe_shared_expert_intermediate_size=cfg.moe_shared_ffn_hidden_size)
        if cfg.moe_shared_ffn_hidden_size:
            model["moe_shared_expert_gate"] = True
    return {"model": model}


def write_description(stage: Path, it: Path, cfg: ModelConfig, params_dtype: str) -> None:
    """Beside the dist checkpoint: run_config.yaml, the train state at step 0 (Bridge reads it
    on resume) and the tracker."""
    (it / RUN_CONFIG).write_text(yaml.safe_dump(run_config(cfg, params_dtype), sort_keys=False))
    zero = torch.tensor(0, dtype=torch.int32)
    state = {"step": zero, "consumed_train_samples": zero, "skipped_train_samples": zero,
             "consumed_valid_samples": zero,
             "floating_point_operations_so_far": torch.tensor(0.0),
             "do_train": torch.tensor(False), "do_valid": torch.tensor(False),
             "do_test": torch.tensor(False)}
    torch.save(state, it / TRAIN_STATE)
    torch.save(state, stage / LATEST_TRAIN_STATE)
    (stage / megatron_lm.TRACKER).write_text("0")
