"""Read a llama.cpp GGUF file (Llama architecture) into HF-layout fp32 tensors and a tokenizer.

Quantized tensors are dequantized with the `gguf` package. llama.cpp stores q/k projections
permuted for its interleaved RoPE; `unpermute_qk` undoes that so the weights match HF/Megatron's
half-split RoPE. The embedded byte-level BPE vocabulary becomes a `tokenizers` tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_minitron.config import ConfigError, ModelConfig

_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert permutation (interleaved -> half-split rotary pairs)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/IndexError on truncation
        raise ConfigError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, bytes]]:
    """(config, HF-layout state dict in fp32, tokenizer files by name)."""
    from gguf.quants import dequantize

    path = Path(path)
    r = _open(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    a = "llama."
    heads = int(_field(r, a + "attention.head_count"))
    hidden = int(_field(r, a + "embedding_length"))
    tokens = _field(r, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in r.tensors)
    cfg = ModelConfig(
        family="llama",
        num_layers=int(_field(r, a + "block_count")),
        hidden_size=hidden,
        ffn_hidden_size=int(_field(r, a + "feed_forward_length")),
        num_attention_heads=heads,
        num_query_groups=int(_field(r, a + "attention.head_count_kv", heads)),
        kv_channels=int(_field(r, a + "attention.key_length", hidden // heads)),
        vocab_size=int(_field(r, a + "vocab_size", len(tokens))),
        max_position_embeddings=int(_field(r, a + "context_length", 4096)),
        rotary_base=float(_field(r, a + "rope.freq_base", 10000.0)),
        norm_epsilon=float(_field(r, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output,
    )
    cfg.validate()
    sd = {}
    for t in r.tensors:
        name = _TENSOR_NAMES.get(t.name)
        if name is None and t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if rest in _LAYER_NAMES:
                name = f"model.layers.{int(i)}.{_LAYER_NAMES[rest]}"
        if name is None:
            continue  # e.g. rope_freqs: recomputed from rope.freq_base
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ConfigError(f"{path}: tensor {t.name} cannot be read ({e})") from None
        shape = tuple(int(x) for x in reversed(t.shape))
        w = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.num_query_groups)
        sd[name] = w
    return cfg, sd, gguf_tokenizer_files(r, path)


def gguf_tokenizer_json(r, path: Path) -> str:
    """Byte-level BPE tokenizer.json built from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(r, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"{path}: tokenizer model {model!r} not supported "
                          "(byte-level BPE 'gpt2' only)")
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    control = 3
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == control])
    return tok.to_str()


def gguf_tokenizer_files(r, path: Path) -> dict[str, bytes]:
    """tokenizer.json plus a tokenizer_config.json naming the special tokens, for transformers."""
    tok_json = gguf_tokenizer_json(r, path)
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": int(_field(r, "llama.context_length", 4096))}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        i = _field(r, f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            cfg[f"{name}_token"], cfg[f"{name}_token_id"] = tokens[int(i)], int(i)
    return {"tokenizer.json": tok_json.encode(),
            "tokenizer_config.json": json.dumps(cfg, indent=2).encode()}
