"""Read a llama.cpp GGUF file (Llama or Gemma 3) as HF-layout fp32 tensors and a tokenizer.

Quantized tensors (Q4_K, Q6_K, Q8_0, ...) are dequantized with the `gguf` package. What llama.cpp
changed on the way in is undone here: Llama's q/k projections are permuted for its interleaved
RoPE (`unpermute_qk` restores HF/Megatron's half-split order); Gemma's norm weights are stored as
(1 + w). The embedded vocabulary (byte-level BPE, or sentencepiece BPE for Gemma) becomes a
`tokenizers` tokenizer.json, with `add_bos_token` from the file.
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
# Gemma 3: llama.cpp's ffn_norm is the pre-MLP norm, and four more norms per layer.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# What llama.cpp hard-codes for Gemma 3 instead of storing it: every 6th layer is global, the
# sliding layers' RoPE base is 10k.
GEMMA3_GLOBAL_EVERY, GEMMA3_LOCAL_ROPE_BASE = 6, 10000.0
ARCHITECTURES = ("llama", "gemma3")


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


def _model_config(r, arch: str) -> ModelConfig:
    a = arch + "."
    heads = int(_field(r, a + "attention.head_count"))
    hidden = int(_field(r, a + "embedding_length"))
    layers = int(_field(r, a + "block_count"))
    cfg = ModelConfig(
        family=arch,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=int(_field(r, a + "feed_forward_length")),
        num_attention_heads=heads,
        num_query_groups=int(_field(r, a + "attention.head_count_kv", heads)),
        kv_channels=int(_field(r, a + "attention.key_length", hidden // heads)),
        vocab_size=int(_field(r, a + "vocab_size", len(_field(r, "tokenizer.ggml.tokens")))),
        max_position_embeddings=int(_field(r, a + "context_length", 4096)),
        rotary_base=float(_field(r, a + "rope.freq_base", 10000.0)),
        norm_epsilon=float(_field(r, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not any(t.name == "output.weight" for t in r.tensors),
    )
    if arch == "gemma3":
        cfg.sliding_window = int(_field(r, a + "attention.sliding_window"))
        cfg.window_layers = [int((i + 1) % GEMMA3_GLOBAL_EVERY != 0) for i in range(layers)]
        cfg.local_rotary_base = GEMMA3_LOCAL_ROPE_BASE
    cfg.validate()
    return cfg


class GGUFModel:
    """A GGUF file's config, HF tensor names and shapes, read from its header; `tensor`
    dequantizes one tensor (to fp32, HF layout) when asked."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._r = _open(self.path)
        self.arch = _field(self._r, "general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"{path}: unsupported GGUF architecture {self.arch!r} "
                              f"(supported: {', '.join(ARCHITECTURES)})")
        self.config = _model_config(self._r, self.arch)
        layer_names = _GEMMA3_LAYER_NAMES if self.arch == "gemma3" else _LAYER_NAMES
        self._tensors = {}
        for t in self._r.tensors:
            name = _TENSOR_NAMES.get(t.name)
            if name is None and t.name.startswith("blk."):
                _, i, rest = t.name.split(".", 2)
                if rest in layer_names:
                    name = f"model.layers.{int(i)}.{layer_names[rest]}"
            if name is not None:  # others (rope_freqs) are recomputed from the config
                self._tensors[name] = t

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(int(x) for x in reversed(t.shape)) for n, t in self._tensors.items()}

    def tensor(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ConfigError(f"{self.path}: tensor {t.name} cannot be read ({e})") from None
        shape = tuple(int(x) for x in reversed(t.shape))
        w = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
        if self.arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's (1 + w) gamma
        elif self.arch == "llama" and t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, self.config.num_attention_heads)
        elif self.arch == "llama" and t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, self.config.num_query_groups)
        return w

    def tokenizer_files(self) -> dict[str, bytes]:
        return gguf_tokenizer_files(self._r, self.path)


def _sentencepiece_bpe(r):
    """A sentencepiece BPE (Gemma) rebuilt for `tokenizers`: the file has no merges, so they are
    derived from the vocabulary, ranked by the merged token's position in the file (its scores
    do not follow the merge order). Tokens of several spaces are stored as spaces; sentencepiece
    spells them with U+2581."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t
              for t in _field(r, "tokenizer.ggml.tokens")]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = sorted(((i, -k, left, tok[k:]) for tok, i in vocab.items()
                     for k in range(1, len(tok)) if (left := tok[:k]) in vocab
                     and tok[k:] in vocab), key=lambda m: m[:2])
    unk = _field(r, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges],
                               unk_token=tokens[int(unk)] if unk is not None else None,
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return tok, tokens


def _byte_level_bpe(r):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok, tokens


def gguf_tokenizer_json(r, path: Path) -> str:
    """tokenizer.json from the GGUF vocabulary: byte-level BPE ("gpt2") or sentencepiece BPE
    ("llama"), with the file's control tokens special and its user-defined tokens whole."""
    from tokenizers import AddedToken

    model = _field(r, "tokenizer.ggml.model")
    if model == "gpt2":
        tok, tokens = _byte_level_bpe(r)
    elif model == "llama":
        tok, tokens = _sentencepiece_bpe(r)
    else:
        raise ConfigError(f"{path}: tokenizer model {model!r} not supported "
                          "(byte-level BPE 'gpt2' or sentencepiece BPE 'llama')")
    types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
    control, user_defined = 3, 4
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == user_defined])
    return tok.to_str()


def gguf_tokenizer_files(r, path: Path) -> dict[str, bytes]:
    """tokenizer.json plus a tokenizer_config.json naming the special tokens, for transformers."""
    tok_json = gguf_tokenizer_json(r, path)
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    arch = _field(r, "general.architecture")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": int(_field(r, f"{arch}.context_length", 4096)),
           "add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
           "add_eos_token": False}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        i = _field(r, f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            cfg[f"{name}_token"], cfg[f"{name}_token_id"] = tokens[int(i)], int(i)
    return {"tokenizer.json": tok_json.encode(),
            "tokenizer_config.json": json.dumps(cfg, indent=2).encode()}
