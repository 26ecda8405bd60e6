"""`minitron convert`: HF dir / GGUF file / Megatron checkpoint -> Megatron checkpoint or HF dir."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint import hf_io, mcore, megatron_lm
from megatron_minitron.checkpoint.atomic import atomic_directory, check_destination
from megatron_minitron.checkpoint.layout import (
    EMBEDDING,
    LOCAL_EXPERTS,
    OUTPUT_LAYER,
    Rule,
    block_shard,
    mamba_segments,
    rules,
)
from megatron_minitron.checkpoint.sources import Source, detect_format, open_source
from megatron_minitron.config import CheckpointMeta, ConfigError, ModelConfig, ParallelConfig
from megatron_minitron.runtime.host_memory import tensors_freed_to_the_os

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
            blocks = mamba_segments(name, cfg) if dim is not None else None
            if blocks:  # a rank's part of each block: read whole (a Mamba mixer's small tensors)
                parts = [block_shard(source.read(rule.hf[0]), blocks, rank, tp)]
            else:
                parts = [source.read(hf, dim, tp, rank) for hf in rule.hf]
            for hf, t in zip(rule.hf, parts, strict=True):
                if t.is_floating_point() and not _all_finite(t):
                    raise ConfigError(f"{source.path}: tensor {hf} contains NaN or Inf")
            p.copy_(rule.fuse(parts))
            progress.update(1)


def _all_finite(t: torch.Tensor) -> bool:
    """`isfinite` of a whole tensor allocates it again (its `abs`) and a byte per element: an
    embedding read from a memory-mapped file costs nothing, but checking it did, 1.75x its size.
    In slices of 4M elements the check costs 20 MiB at most."""
    return all(torch.isfinite(c).all() for c in t.reshape(-1).split(1 << 22))


def _gathered(obj) -> list:
    """`obj` of every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _hf_entries(params, by_mcore: dict[str, Rule], tp: int) -> list[hf_io.Entry]:
    """Name, full shape and dtype of every HF tensor these parameters export to, in order."""
    from megatron_minitron.checkpoint.sharding import split_dim

    entries = []
    for name, p in params:
        dim = split_dim(p)
        full = tuple(s * (tp if d == dim else 1) for d, s in enumerate(p.shape))
        parts = by_mcore[name].split(torch.empty(full, dtype=p.dtype, device="meta"))
        entries += [hf_io.Entry(n, tuple(t.shape), p.dtype)
                    for n, t in zip(by_mcore[name].hf, parts, strict=True)]
    return entries


def export_hf(chunks, cfg: ModelConfig, ckpt: Path, dst: Path,
              max_shard_bytes: int = hf_io.SHARD_BYTES) -> None:
    """Write the model as a HF directory (tokenizer from checkpoint `ckpt`), from any TP/PP.
    Each tensor is gathered over TP when its turn comes and streamed into a file written by the
    first TP rank of its pipeline stage (in the first data-parallel replica), so no rank holds
    more than its shards plus one full tensor. Every rank knows every header before the first
    tensor: file names and the index come from one exchange of the writers' file lists."""
    from megatron.core import parallel_state

    from megatron_minitron.checkpoint.sharding import full_tensor, global_parameters
    from megatron_minitron.model import te_available
    from megatron_minitron.runtime.distributed import barrier, is_main_rank
    from megatron_minitron.runtime.progress import Progress

    by_mcore = {r.mcore: r for r in rules(cfg, te_available())}
    first_tp = parallel_state.get_tensor_model_parallel_rank() == 0

    def writes(name: str) -> bool:
        """In the first replica: experts are replicated over their own (expert) data-parallel
        group, which expert parallelism makes smaller than the dense parameters'."""
        replica = (parallel_state.get_expert_data_parallel_rank() if LOCAL_EXPERTS in name
                   else parallel_state.get_data_parallel_rank())
        return first_tp and replica == 0

    # A later stage's copy of a tied embedding is no weight of its own.
    params = [(n, p) for n, p in global_parameters(chunks)
              if not (n == OUTPUT_LAYER and cfg.tie_embeddings)]
    entries = _hf_entries([(n, p) for n, p in params if writes(n)], by_mcore,
                          parallel_state.get_tensor_model_parallel_world_size())
    mine = hf_io.group_into_files(entries, max_shard_bytes)
    every = [f for files in _gathered(mine) for f in files]  # all ranks' files, in rank order
    names = hf_io.file_names(len(every))
    file_of = {e.name: (names[i], group) for i, group in enumerate(every) for e in group}
    progress = Progress("export", len(params), unit="tensors")
    with tensors_freed_to_the_os(), \
            atomic_directory(dst, is_writer=is_main_rank(), barrier=barrier) as stage:
        out = None
        for name, p in params:
            full = full_tensor(name, p, cfg)  # a TP collective: every rank takes part
            rule = by_mcore[name]
            parts = zip(rule.hf, rule.split(full), strict=True) if writes(name) else ()
            for hf, t in parts:
                if out is None:
                    file, group = file_of[hf]
                    out, left = hf_io.SafetensorsWriter(stage / file, group), len(group)
                out.write(hf, t)
                left -= 1
                if not left:
                    out.close()
                    out = None
            progress.update(1)
        if is_main_rank():
            hf_io.write_config(stage, cfg, next(chunks[0].parameters()).dtype,
                               mcore.tokenizer_dir(ckpt))
            if len(names) > 1:
                hf_io.write_index(stage, {n: f for n, (f, _) in file_of.items()},
                                  sum(e.nbytes for group in every for e in group))


def convert(src: Path, dst: Path, to: str = "mcore", parallel: ParallelConfig | None = None,
            max_shard_bytes: int | None = None, tokenizer: Path | None = None) -> Path:
    with tensors_freed_to_the_os():
        return _convert(src, dst, to, parallel, max_shard_bytes, tokenizer)


def _given_tokenizer(path: Path) -> dict[str, Path]:
    """--tokenizer: a tokenizer file (with the config beside it), or a directory's files."""
    d = path if path.is_dir() else path.parent
    files = {n: d / n for n in hf_io.TOKENIZER_FILES if (d / n).is_file()}
    if path.is_file():
        files = {n: f for n, f in files.items() if n == path.name or n.endswith("config.json")}
        files[path.name] = path
    if not {"tokenizer.json", "tokenizer.model"} & set(files):
        raise ConfigError(f"--tokenizer {path}: no tokenizer.json or tokenizer.model there")
    return files


def _convert(src: Path, dst: Path, to: str, parallel: ParallelConfig | None,
             max_shard_bytes: int | None, tokenizer: Path | None) -> Path:
    from megatron_minitron.model import build_model, load_model, te_available
    from megatron_minitron.runtime import init_runtime

    src, dst = Path(src), Path(dst)
    parallel = parallel or ParallelConfig()
    check_destination(dst)
    fmt = detect_format(src)
    if to not in ("mcore", "megatron-lm", "megatron-bridge", "hf"):
        raise ConfigError(f"unknown target format {to!r} (mcore, megatron-lm, megatron-bridge "
                          "or hf)")
    save_as = "minitron" if to == "mcore" else to
    if save_as in ("megatron-lm", "megatron-bridge"):
        megatron_lm.check_describable(mcore.read_meta(src).model if fmt == "mcore" else
                                      open_source(src, fmt).config)

    if fmt == "mcore":
        tokens = _given_tokenizer(Path(tokenizer)) if tokenizer else mcore.tokenizer_files(src)
        rt, meta, chunks = load_model(src, parallel, keep_dtype=True)
        meta.tokenizer = next((n for n in ("tokenizer.json", "tokenizer.model") if n in tokens),
                              None)
        if to != "hf":  # reshard: save at this run's TP/PP
            meta.history.append(f"resharded at tp={parallel.tp} pp={parallel.pp}")
            mcore.save_checkpoint(chunks, meta, dst, tokens, fmt=save_as)
        else:
            export_hf(chunks, meta.model, src, dst, max_shard_bytes or hf_io.SHARD_BYTES)
        return dst

    if to == "hf":
        if fmt == "gguf":
            raise ConfigError("GGUF -> HF: convert to mcore first, then mcore -> hf")
        raise ConfigError(f"{src} is already a HF directory")
    source = open_source(src, fmt)
    cfg = source.config
    cfg.check_parallel(parallel.tp, parallel.pp, parallel.ep)
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
    mcore.save_checkpoint(chunks, meta, dst, tokens, discard_model=True, fmt=save_as)
    log.info("wrote %s (%d parameters)", dst, cfg.num_parameters())
    return dst
