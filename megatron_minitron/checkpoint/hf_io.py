"""Hugging Face model directories: config.json, safetensors shards (+ index), tokenizer files.

Weights are written one tensor at a time: every tensor's name, shape and dtype is known before
the first one is computed, so each file's header is written first and the tensors stream after
it. (safetensors' own `save_file` takes a whole dict; its format is a little-endian u64 header
length, a JSON header with byte offsets, then the raw data.) Files are cut at `max_bytes`, with
`model.safetensors.index.json` as transformers writes it; a model that fits one file gets
`model.safetensors` and no index.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_minitron.checkpoint.layout import hf_config
from megatron_minitron.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def group_into_files(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive entries, cut before a tensor that would take a file past `max_bytes` (a
    larger tensor gets a file of its own)."""
    files: list[list[Entry]] = []
    size = 0
    for e in entries:
        if not files or size + e.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += e.nbytes
    return files


def file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsWriter:
    """One safetensors file, its header written up front, then `write` for each entry in
    order; `close` checks that every entry came."""

    def __init__(self, path: Path, entries: list[Entry]):
        header, offset = {}, 0
        for e in entries:
            header[e.name] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self._pending = list(reversed(entries))
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        e = self._pending.pop()
        if (name, tuple(t.shape), t.dtype) != (e.name, e.shape, e.dtype):
            raise RuntimeError(f"{name} {tuple(t.shape)} {t.dtype} written where the header "
                               f"has {e.name} {e.shape} {e.dtype}")
        self._file.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors were never written "
                               f"({self._pending[-1].name} first)")


def write_index(path: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    (path / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2))


def write_config(path: Path, cfg: ModelConfig, dtype: torch.dtype,
                 tokenizer_dir: Path | None) -> None:
    config = hf_config(cfg)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")  # as stored
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, path / name)
