"""Training data for distillation: Megatron indexed datasets read through megatron-core's
GPTDataset / BlendedMegatronDatasetBuilder (blends with weights, train/valid split)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.data.calibration import indexed_prefix
from megatron_minitron.data.tokenizer import Tokenizer


@dataclass
class _DatasetTokenizer:
    """What GPTDataset reads from a tokenizer."""

    vocab_size: int
    eod: int
    unique_identifiers: dict


def parse_blend(args: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's `--data-path` form: `PREFIX ...` or `W1 PREFIX1 W2 PREFIX2 ...`."""
    try:
        float(args[0])
        weighted = True
    except ValueError:
        weighted = False
    if weighted:
        if len(args) % 2:
            raise ConfigError(f"weighted data needs WEIGHT PREFIX pairs, got {args}")
        pairs = [(float(args[i]), args[i + 1]) for i in range(0, len(args), 2)]
        weights, paths = [w for w, _ in pairs], [p for _, p in pairs]
    else:
        weights, paths = None, list(args)
    prefixes = []
    for p in paths:
        prefix = indexed_prefix(Path(p))
        if prefix is None:
            raise ConfigError(f"training data {p}: no indexed dataset (.bin/.idx); run "
                              "`minitron preprocess` first")
        prefixes.append(prefix)
    return prefixes, weights


def _check_split(prefixes: list[str], split: str) -> None:
    """Megatron gives split i the documents [round(b_i N), round(e_i N)); an empty split would
    make GPTDataset loop forever looking for samples, so refuse it here."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    fractions = parse_and_normalize_split(split)
    bounds = [sum(fractions[:i]) for i in range(len(fractions) + 1)]
    for prefix in prefixes:
        n = len(IndexedDataset(prefix).document_indices) - 1
        for i, name in ((0, "training"), (1, "validation")):
            if round(bounds[i + 1] * n) - round(bounds[i] * n) < 1:
                raise ConfigError(f"split {split!r} leaves no {name} document of the {n} in "
                                  f"{prefix}; pass --valid-data or more documents")


def build_datasets(prefixes: list[str], weights: list[float] | None, tok: Tokenizer,
                   seq_length: int, seed: int, split: str, train_samples: int,
                   valid_samples: int, cache_dir: Path, valid_prefixes: list[str] | None = None):
    """Train and validation datasets: a split of the training blend, or `valid_prefixes`."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if tok.eos_id is None:
        raise ConfigError(f"tokenizer {tok.path} has no EOS id")
    if valid_prefixes:
        blend = {"blend_per_split": [(prefixes, weights), (valid_prefixes, None), None]}
    else:
        _check_split(prefixes, split)
        blend = {"blend": (prefixes, weights), "split": split}
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, **blend,
        path_to_cache=str(cache_dir), mmap_bin_files=True, create_attention_mask=False,
        # Named by content, not path: the student checkpoints of search candidates, each with
        # its own copy of one tokenizer, then share the dataset (and its teacher cache).
        tokenizer=_DatasetTokenizer(tok.vocab_size, tok.eos_id, {
            "class": "minitron", "sha256": hashlib.sha256(tok.path.read_bytes()).hexdigest()}),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    from megatron_minitron.runtime.distributed import main_rank_first

    train, valid, _ = main_rank_first(BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, cfg).build)
    if train is None or (valid_samples and valid is None):
        raise ConfigError(f"split {split!r} leaves no training or validation data")
    return train, valid


def with_prefix(sample: dict, prefix: list[int]) -> dict:
    """GPTDataset's sample (s tokens, s labels) opened by the tokenizer's BOS: shifted right by one
    so that it still holds s tokens and every text token it holds is a label."""
    if not prefix:
        return sample
    tokens = torch.as_tensor(sample["tokens"])
    head = torch.tensor(prefix, dtype=tokens.dtype)
    return {**sample, "tokens": torch.cat([head, tokens[:-1]]), "labels": tokens,
            "loss_mask": torch.cat([torch.ones(1), torch.as_tensor(sample["loss_mask"])[:-1]])}


def microbatches(dataset, start: int, count: int, micro_batch_size: int,
                 prefix: list[int] | None = None) -> list[dict]:
    """Samples [start, start + count) as microbatches of stacked tensors, each sample opened by
    `prefix` (the BOS of tokenizers that add one)."""
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    items = [with_prefix(dataset[i % len(dataset)], prefix or [])
             for i in range(start, start + count)]
    return [{k: torch.stack([torch.as_tensor(it[k]) for it in items[j:j + micro_batch_size]])
             for k in keys} for j in range(0, count, micro_batch_size)]
