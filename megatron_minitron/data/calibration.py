"""Calibration and evaluation samples: N windows of L+1 tokens from text, JSONL or Megatron
indexed datasets, tokenized with the checkpoint's tokenizer, chosen deterministically by seed.

Documents are joined with the tokenizer's EOS into one stream, cut into non-overlapping windows
(consecutive windows share one token, so every token but the first is a label exactly once), and N
of them are drawn without replacement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.data.jsonl import jsonl_objects
from megatron_minitron.data.tokenizer import Tokenizer


def indexed_prefix(path: Path) -> str | None:
    """The Megatron indexed-dataset prefix `path` names (PREFIX, PREFIX.bin or PREFIX.idx)."""
    s = str(path)
    prefix = s[:-4] if s.endswith((".bin", ".idx")) else s
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return prefix
    return None


def _jsonl_texts(path: Path, key: str) -> Iterator[str]:
    for where, doc in jsonl_objects(path):
        if not isinstance(doc.get(key), str):
            raise ConfigError(f"{where}: no string field {key!r}")
        yield doc[key]


def documents(path: Path, tok: Tokenizer, key: str, vocab_size: int) -> Iterator[list[int]]:
    prefix = indexed_prefix(path)
    if prefix is not None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(prefix)
        for i in range(len(ds)):
            ids = ds[i].tolist()
            if ids and max(ids) >= vocab_size:
                raise ConfigError(f"{prefix}: token id {max(ids)} >= the model's vocabulary "
                                  f"size {vocab_size}: tokenized with another tokenizer")
            yield ids
    elif not path.is_file():
        raise ConfigError(f"data {path} not found (a text file, .jsonl, or an indexed-dataset "
                          "prefix with .bin/.idx)")
    elif path.suffix in (".jsonl", ".json"):
        for text in _jsonl_texts(path, key):
            yield tok.encode(text)
    else:
        yield tok.encode(path.read_text(encoding="utf-8"))


def token_stream(paths: Sequence[Path], tok: Tokenizer, vocab_size: int,
                 json_key: str = "text") -> torch.Tensor:
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model has "
                          f"{vocab_size} embeddings: it is not this checkpoint's tokenizer")
    ids: list[int] = []
    for p in paths:
        for doc in documents(Path(p), tok, json_key, vocab_size):
            if doc:
                ids.extend(doc)
                if tok.eos_id is not None and doc[-1] != tok.eos_id:  # preprocessed: has EOS
                    ids.append(tok.eos_id)
    if not ids:
        raise ConfigError(f"data {', '.join(map(str, paths))} holds no text")
    return torch.tensor(ids, dtype=torch.long)


def window_count(n_tokens: int, seq_length: int, stride: int | None = None,
                 prefix: Sequence[int] = ()) -> int:
    """How many windows `windows` cuts from n_tokens of text."""
    stride = stride or seq_length
    return max((n_tokens - (seq_length + 1 - len(prefix)) + stride) // stride, 0)


def windows(ids: torch.Tensor, seq_length: int, starts: Sequence[int],
            stride: int | None = None, prefix: Sequence[int] = ()) -> torch.Tensor:
    """[len(starts), seq_length + 1]: window i is `prefix` (the tokenizer's BOS where it asks for
    one) then the text from token i * stride. Without a prefix consecutive windows share one token,
    with it none: either way every text token but a prefix-less first one is a label once."""
    stride = stride or seq_length
    n = seq_length + 1 - len(prefix)
    head = torch.tensor(list(prefix), dtype=ids.dtype)
    return torch.stack([torch.cat([head, ids[i * stride: i * stride + n]]) for i in starts])


def sample_windows(ids: torch.Tensor, n: int, seq_length: int, seed: int,
                   prefix: Sequence[int] = (), skip: int = 0) -> torch.Tensor:
    """n windows drawn without replacement (kept in stream order), the same for every seed
    holder on every rank; `skip` passes over the first draws (another n' windows of the same seed
    are then disjoint from these)."""
    have = window_count(len(ids), seq_length, prefix=prefix)
    if n < 1 or seq_length < 1:
        raise ConfigError(f"need at least one sample of at least one token (got {n} x "
                          f"{seq_length})")
    if have < n + skip:
        raise ConfigError(f"data has {len(ids)} tokens: fewer than {n + skip} samples x "
                          f"{seq_length} tokens (+1); pass more data or fewer/shorter samples")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(have, generator=g)[skip:skip + n].sort().values.tolist()
    return windows(ids, seq_length, starts, prefix=prefix)
