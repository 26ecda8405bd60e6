"""Hugging Face model directories: config.json + safetensors (+ tokenizer files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_minitron.checkpoint.layout import hf_config
from megatron_minitron.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def write_hf(path: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor],
             tokenizer_dir: Path | None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg)
    config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")  # as stored
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, path / name)
