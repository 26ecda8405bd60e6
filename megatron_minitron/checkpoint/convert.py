"""`minitron convert`: HF dir / GGUF file / Megatron checkpoint -> Megatron checkpoint or HF dir."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_minitron.checkpoint import hf_io, mcore
from megatron_minitron.checkpoint.atomic import atomic_directory, check_destination
from megatron_minitron.checkpoint.layout import hf_to_mcore, mcore_to_hf
from megatron_minitron.config import CheckpointMeta, ConfigError, ModelConfig, ParallelConfig

log = logging.getLogger(__name__)


def detect_format(src: Path) -> str:
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
                      f"nor a megatron-minitron checkpoint ({mcore.META_FILE})")


def read_source(src: Path, fmt: str) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, HF-layout state dict, tokenizer files) for a GGUF file or HF dir."""
    if fmt == "gguf":
        from megatron_minitron.checkpoint.gguf_io import read_gguf

        return read_gguf(src)
    cfg, sd = hf_io.read_hf(src)
    toks = {n: src / n for n in hf_io.TOKENIZER_FILES if (src / n).is_file()}
    return cfg, sd, toks


def _check_state_dict(sd: dict[str, torch.Tensor], model_sd: dict, src: Path) -> None:
    missing = sorted(set(model_sd) - set(sd))
    extra = sorted(set(sd) - set(model_sd))
    if missing or extra:
        raise ConfigError(f"{src}: weights do not match the model config "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(model_sd[k].shape):
            raise ConfigError(f"{src}: tensor {k} has shape {tuple(v.shape)}, the config implies "
                              f"{tuple(model_sd[k].shape)}")
        if not torch.isfinite(v).all():
            raise ConfigError(f"{src}: tensor {k} contains NaN or Inf")


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

    cfg, hf_sd, toks = read_source(src, fmt)
    cfg.check_parallel(parallel.tp, parallel.pp)
    if to == "hf":
        if fmt == "gguf":
            raise ConfigError("GGUF -> HF: convert to mcore first, then mcore -> hf")
        raise ConfigError(f"{src} is already a HF directory")
    rt = init_runtime(ParallelConfig(precision=parallel.precision))
    if rt.world_size > 1:
        raise ConfigError("importing HF/GGUF weights runs in one process; reshard the result "
                          "with `torchrun ... minitron convert CKPT NEW --tp N --pp M`")
    chunks = build_model(cfg, rt.parallel, parallel.dtype(stored="float32"))  # read as fp32
    # Check in the source's own names, so the message names the tensor the user can find.
    _check_state_dict(hf_sd, mcore_to_hf(mcore.model_state_dict(chunks), cfg, te_available()), src)
    chunks[0].load_state_dict(hf_to_mcore(hf_sd, cfg, te=te_available()), strict=False)
    tok_name = next((n for n in ("tokenizer.json", "tokenizer.model") if n in toks), None)
    meta = CheckpointMeta(model=cfg, tokenizer=tok_name, source=f"{fmt}:{src.resolve()}",
                          history=[f"converted from {fmt}"])
    mcore.save_checkpoint(chunks, meta, dst, toks)
    log.info("wrote %s (%d parameters)", dst, cfg.num_parameters())
    return dst
