"""`minitron convert`: HF dir / GGUF file / Megatron checkpoint -> Megatron checkpoint or HF dir."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from megatron_minitron.checkpoint import hf_io, mcore
from megatron_minitron.checkpoint.atomic import atomic_directory, check_destination
from megatron_minitron.checkpoint.layout import EMBEDDING, OUTPUT_LAYER, Rule, mcore_to_hf, rules
from megatron_minitron.checkpoint.sources import Source, detect_format, open_source
from megatron_minitron.config import CheckpointMeta, ConfigError, ModelConfig, ParallelConfig

log = logging.getLogger(__name__)


def _local_rules(cfg: ModelConfig, tp: int, te: bool) -> dict[str, Rule]:
    """The rules of one TP rank: q/k/v of a rank's query groups are contiguous row ranges of
    each HF tensor and SwiGLU's [gate_r; up_r] are ranges of gate and up, so fusing the HF
    tensors' rank-r parts with a config of heads/tp and groups/tp gives the rank's shard."""
    local = dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                                num_query_groups=cfg.num_query_groups // tp)
    out = {r.mcore: r for r in rules(local, te)}
    if cfg.tie_embeddings:  # a later pipeline stage holds a copy of the embedding as output layer
        out[OUTPUT_LAYER] = out[EMBEDDING]
    return out


def _check_names(source: Source, cfg: ModelConfig, te: bool) -> None:
    expected = {n for r in rules(cfg, te) for n in r.hf}
    missing, extra = sorted(expected - set(source.shapes)), sorted(set(source.shapes) - expected)
    if missing or extra:
        raise ConfigError(f"{source.path}: weights do not match the model config "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")


def import_weights(chunks, source: Source, te: bool) -> None:
    """Fill this rank's chunks from `source`, reading only this rank's slice of each tensor.
    Every name and shape is checked (in the source's own names, which the user can find) before
    the first read."""
    from megatron_minitron.checkpoint.sharding import (
        global_parameters,
        split_dim,
        tp_rank_world_group,
    )
    from megatron_minitron.runtime.progress import Progress

    cfg = source.config
    rank, tp, _ = tp_rank_world_group()
    _check_names(source, cfg, te)
    local = _local_rules(cfg, tp, te)
    params = list(global_parameters(chunks))
    for name, p in params:
        dim = split_dim(p)
        rule = local[name]
        for hf, part in zip(rule.hf, rule.split(torch.empty(p.shape, device="meta")), strict=True):
            want = tuple(s * (tp if d == dim else 1) for d, s in enumerate(part.shape))
            if source.shapes[hf] != want:
                raise ConfigError(f"{source.path}: tensor {hf} has shape {source.shapes[hf]}, "
                                  f"the config implies {want}")
    progress = Progress("import", len(params), unit="tensors")
    with torch.no_grad():
        for name, p in params:
            rule, dim = local[name], split_dim(p)
            parts = [source.read(hf, dim, tp, rank) for hf in rule.hf]
            for hf, t in zip(rule.hf, parts, strict=True):
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ConfigError(f"{source.path}: tensor {hf} contains NaN or Inf")
            p.copy_(rule.fuse(parts))
            progress.update(1)


def export_hf(chunks, cfg: ModelConfig, ckpt: Path, dst: Path) -> None:
    """Write a single-process model as a HF directory, with the tokenizer of checkpoint `ckpt`."""
    from megatron_minitron.model import te_available

    hf_sd = mcore_to_hf(mcore.model_state_dict(chunks), cfg, te=te_available())
    with atomic_directory(dst) as stage:
        hf_io.write_hf(stage, cfg, hf_sd, ckpt / mcore.TOKENIZER_DIR)


def convert(src: Path, dst: Path, to: str = "mcore", parallel: ParallelConfig | None = None
            ) -> Path:
    from megatron_minitron.model import build_model, load_model, te_available
    from megatron_minitron.runtime import init_runtime

    src, dst = Path(src), Path(dst)
    parallel = parallel or ParallelConfig()
    check_destination(dst)
    fmt = detect_format(src)
    if to not in ("mcore", "hf"):
        raise ConfigError(f"unknown target format {to!r} (mcore or hf)")

    if fmt == "mcore":
        rt, meta, chunks = load_model(src, parallel if to == "mcore" else
                                      ParallelConfig(precision=parallel.precision),
                                      keep_dtype=True)
        if to == "mcore":  # reshard: save at this run's TP/PP
            meta.history.append(f"resharded at tp={parallel.tp} pp={parallel.pp}")
            mcore.save_checkpoint(chunks, meta, dst, mcore.tokenizer_files(src))
        else:
            export_hf(chunks, meta.model, src, dst)
        return dst

    if to == "hf":
        if fmt == "gguf":
            raise ConfigError("GGUF -> HF: convert to mcore first, then mcore -> hf")
        raise ConfigError(f"{src} is already a HF directory")
    source = open_source(src, fmt)
    cfg = source.config
    cfg.check_parallel(parallel.tp, parallel.pp)
    rt = init_runtime(parallel)
    # Built in the source's dtype (a bf16 model stays bf16) unless a precision was asked for.
    chunks = build_model(cfg, rt.parallel, parallel.dtype(stored=source.dtype))
    import_weights(chunks, source, te_available())
    tokens = source.tokenizer_files()
    tok_name = next((n for n in ("tokenizer.json", "tokenizer.model") if n in tokens), None)
    meta = CheckpointMeta(model=cfg, tokenizer=tok_name, source=f"{fmt}:{src.resolve()}",
                          history=[f"converted from {fmt}"
                                   + (f" at tp={parallel.tp} pp={parallel.pp}"
                                      if rt.world_size > 1 else "")])
    mcore.save_checkpoint(chunks, meta, dst, tokens)
    log.info("wrote %s (%d parameters)", dst, cfg.num_parameters())
    return dst
