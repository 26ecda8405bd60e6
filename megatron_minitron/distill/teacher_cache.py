"""The frozen teacher's top-k logits on disk, so that it runs once per training sample, not once
per run: search candidates, reruns and resumed runs read them back.

GPTDataset's sample i is deterministic (its description hash names the blend, split, seed, length
and sample count), so the cache is keyed by split and sample index: one safetensors file per sample
holding the tokens it was made from (checked on every read), the k largest logits in the dtype the
teacher computed them (bf16 in a bf16 run: compact and exact) and their int32 token ids. Files are
written atomically; `cache.json` says what the cache is valid for, and a cache made for another
teacher, k, sequence length or data is refused with one line. The top k are the same on every
tensor-parallel rank and per sample, so a cache is shared by any parallel layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint.atomic import atomic_file, write_text
from megatron_minitron.config import ConfigError
from megatron_minitron.distill.losses import TopK

FORMAT = 1
MANIFEST = "cache.json"


def cache_key(teacher_fingerprint: str, dtype: torch.dtype, top_k: int, seq_length: int,
              data: dict[str, str]) -> dict:
    """What the cached logits depend on; `data`: split name -> GPTDataset description hash."""
    return {"format": FORMAT, "teacher": teacher_fingerprint,
            "dtype": str(dtype).removeprefix("torch."), "top_k": top_k,
            "seq_length": seq_length, "data": data}


class TeacherCache:
    def __init__(self, root: Path, key: dict, writer: bool):
        """Every rank constructs it; the global rank 0 creates the manifest of a new cache.
        `writer`: this rank writes the samples it computes (one rank per data-parallel rank)."""
        self.root, self.writer = Path(root), writer
        manifest = self.root / MANIFEST
        if dist.get_rank() == 0 and not manifest.exists():
            if self.root.exists() and not self.root.is_dir():
                raise ConfigError(f"teacher cache {self.root} is not a directory")
            self.root.mkdir(parents=True, exist_ok=True)
            write_text(manifest, json.dumps(key, indent=2))
        dist.barrier()
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"teacher cache {self.root}: unreadable {MANIFEST} ({e}); remove "
                              "the directory or name another") from None
        differs = [name for name in key if found.get(name) != key[name]]
        if differs:
            was = ", ".join(f"{n}={found.get(n)}" for n in differs)
            raise ConfigError(f"teacher cache {self.root} was made for another "
                              f"{', '.join(differs)} ({was}); use another --teacher-cache "
                              "directory")

    def _file(self, split: str, index: int) -> Path:
        return self.root / split / f"{index // 1000:06d}" / f"{index % 1000:03d}.safetensors"

    def has(self, split: str, indices: Sequence[int]) -> bool:
        return all(self._file(split, i).is_file() for i in indices)

    def read(self, split: str, indices: Sequence[int], tokens: torch.Tensor) -> TopK:
        """The cached top k of these samples [b, s, k]; `tokens` [b, s] must be theirs."""
        from safetensors.torch import load_file

        values, ids = [], []
        for row, i in enumerate(indices):
            path = self._file(split, i)
            try:
                entry = load_file(path)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConfigError(f"teacher cache file {path} is unreadable ({e}); remove it "
                                  "to recompute it") from None
            if not torch.equal(entry["tokens"].long(), tokens[row].cpu()):
                raise ConfigError(f"teacher cache {self.root}: {split} sample {i} holds other "
                                  "tokens than this run's data; use another --teacher-cache "
                                  "directory")
            values.append(entry["values"])
            ids.append(entry["ids"].long())
        return TopK(torch.stack(values), torch.stack(ids))

    def write(self, split: str, indices: Sequence[int], tokens: torch.Tensor, top: TopK) -> None:
        from safetensors.torch import save_file

        if not self.writer:
            return
        values, ids = top.values.detach().cpu(), top.ids.cpu().to(torch.int32)
        for row, i in enumerate(indices):
            path = self._file(split, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                save_file({"tokens": tokens[row].cpu().to(torch.int32).contiguous(),
                           "values": values[row].contiguous(), "ids": ids[row].contiguous()},
                          str(tmp))
