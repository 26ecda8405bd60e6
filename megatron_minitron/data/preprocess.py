"""`minitron preprocess`: text / JSONL -> a Megatron indexed dataset (.bin/.idx), one document per
input document with EOS appended, written by megatron-core's own IndexedDatasetBuilder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.data.calibration import documents
from megatron_minitron.data.tokenizer import Tokenizer, find_tokenizer_file

log = logging.getLogger("minitron")


def resolve_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer file, a directory holding one, or a checkpoint (its tokenizer/)."""
    from megatron_minitron.checkpoint.mcore import is_mcore_dir, tokenizer_dir

    path = Path(path)
    if path.is_file():
        return Tokenizer(path)
    for d in (path, tokenizer_dir(path) if is_mcore_dir(path) else None):
        f = find_tokenizer_file(d) if d and d.is_dir() else None
        if f is not None:
            return Tokenizer(f)
    raise ConfigError(f"no tokenizer.json or tokenizer.model at {path}")


def preprocess(inputs: Sequence[Path], tok: Tokenizer, prefix: str, json_key: str = "text"
               ) -> int:
    """Write PREFIX.bin / PREFIX.idx; returns the number of documents. Written to temporary
    names and renamed at the end, so a failure leaves nothing behind."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    out = Path(prefix)
    if Path(f"{prefix}.idx").exists():  # renamed last: a .bin alone is a killed run's
        raise ConfigError(f"{prefix}.bin/.idx exist; choose a new prefix")
    if not out.parent.is_dir():
        raise ConfigError(f"output directory {out.parent} does not exist")
    if tok.eos_id is None:
        raise ConfigError(f"tokenizer {tok.path} has no EOS id to separate documents")
    tmp = str(out.parent / f".{out.name}.partial")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    n = tokens = 0
    try:
        for path in inputs:
            for doc in documents(Path(path), tok, json_key, tok.vocab_size):
                if doc:
                    builder.add_document(torch.tensor(doc + [tok.eos_id]), [len(doc) + 1])
                    n, tokens = n + 1, tokens + len(doc) + 1
        if n == 0:
            raise ConfigError(f"inputs {', '.join(map(str, inputs))} hold no text")
        builder.finalize(f"{tmp}.idx")
    except BaseException:
        for suffix in (".bin", ".idx"):
            Path(tmp + suffix).unlink(missing_ok=True)
        raise
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    log.info("wrote %s.bin/.idx: %d documents, %d tokens", prefix, n, tokens)
    return n
