"""Weights to import, in HF layout, read one tensor (or one tensor-parallel rank's slice of one)
at a time, so that an import under torchrun never holds more than its own shards plus one tensor.

A HF directory's safetensors are memory-mapped and sliced on read: a rank touches only the bytes
of its slice. A GGUF file's quantized blocks span whole rows, so a tensor is dequantized whole
and then sliced. The model is built in the dtype the source stores (bf16 stays bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_minitron.checkpoint import hf_io
from megatron_minitron.checkpoint.layout import model_config_from_hf
from megatron_minitron.config import ConfigError, ModelConfig

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def chunk_range(length: int, parts: int, index: int, name: str) -> slice:
    """Part `index` of `parts` equal parts of `length` (torch.chunk's split when it divides)."""
    if length % parts:
        raise ConfigError(f"tensor {name}: dimension {length} does not split into {parts} "
                          "tensor-parallel parts")
    n = length // parts
    return slice(index * n, (index + 1) * n)


class Source:
    """A model to import: its config, the dtype it stores, every tensor's full shape by HF name,
    its tokenizer files, and `read` for a tensor or a part of it."""

    config: ModelConfig
    dtype: str
    shapes: dict[str, tuple[int, ...]]

    def tokenizer_files(self) -> dict[str, Path | bytes]:
        raise NotImplementedError

    def read(self, name: str, dim: int | None = None, parts: int = 1, index: int = 0
             ) -> torch.Tensor:
        """Tensor `name`, or its part `index` of `parts` along `dim`, as stored."""
        raise NotImplementedError


class SafetensorsSource(Source):
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path = Path(path)
        try:
            hf = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path / 'config.json'}: invalid JSON ({e})") from None
        self.config = model_config_from_hf(hf, str(path))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{path}: no *.safetensors weights found (pickled .bin weights are "
                              "not loaded: they can execute code)")
        self._file_of, self.shapes, dtypes = {}, {}, {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")  # memory-mapped; reads headers only
                for k in h.keys():
                    s = h.get_slice(k)
                    self.shapes[k], dtypes[k] = tuple(s.get_shape()), s.get_dtype()
                    self._file_of[k] = h
            except Exception as e:
                raise ConfigError(f"{f}: unreadable safetensors file ({e})") from None
        if self.config.tie_embeddings:
            self.shapes.pop("lm_head.weight", None)  # some exporters write the tied copy too
        stored = dtypes.get("model.embed_tokens.weight", "F32")
        self.dtype = _SAFETENSORS_DTYPES.get(stored, "float32")

    def tokenizer_files(self):
        return {n: self.path / n for n in hf_io.TOKENIZER_FILES if (self.path / n).is_file()}

    def read(self, name, dim=None, parts=1, index=0):
        s = self._file_of[name].get_slice(name)
        if dim is None or parts == 1:
            return s[:]
        r = chunk_range(self.shapes[name][dim], parts, index, name)
        return s[r] if dim == 0 else s[:, r]


class GGUFSource(Source):
    def __init__(self, path: Path):
        from megatron_minitron.checkpoint.gguf_io import GGUFModel

        self._gguf = GGUFModel(Path(path))
        self.config, self.dtype, self.shapes = self._gguf.config, "float32", self._gguf.shapes()

    def tokenizer_files(self):
        return self._gguf.tokenizer_files()

    def read(self, name, dim=None, parts=1, index=0):
        t = self._gguf.tensor(name)  # quantized blocks span rows: dequantize whole, then slice
        if dim is None or parts == 1:
            return t
        return t[(slice(None),) * dim + (chunk_range(t.shape[dim], parts, index, name),)].clone()


def detect_format(src: Path) -> str:
    from megatron_minitron.checkpoint import mcore

    if not src.exists():
        raise ConfigError(f"source {src} does not exist")
    if src.is_file():
        if src.suffix == ".gguf":
            return "gguf"
        raise ConfigError(f"source {src} is a file but not a .gguf file")
    if mcore.is_mcore_dir(src):
        return "mcore"
    if hf_io.is_hf_dir(src):
        return "hf"
    raise ConfigError(f"source {src}: neither a HF model dir (config.json), a GGUF file, "
                      f"a megatron-minitron checkpoint ({mcore.META_FILE}) nor a Megatron-LM or "
                      "Megatron-Bridge save directory (latest_checkpointed_iteration.txt)")


def open_source(src: Path, fmt: str) -> Source:
    """A HF directory or GGUF file, opened lazily: headers only until `read`."""
    return GGUFSource(src) if fmt == "gguf" else SafetensorsSource(src)
