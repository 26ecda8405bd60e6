"""The one way every command loads a checkpoint: read its meta, start the runtime, build this
rank's chunks in the run's precision on the device, load the weights (resharded as needed)."""

from __future__ import annotations

from pathlib import Path

from megatron_minitron.config import CheckpointMeta, ParallelConfig


def load_model(ckpt: Path, parallel: ParallelConfig, keep_dtype: bool = False, seed: int = 1234):
    """(runtime, meta, chunks). `keep_dtype`: build in the checkpoint's stored dtype unless a
    precision was asked for (commands that rewrite weights must not round them)."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.runtime import init_runtime

    meta: CheckpointMeta = mcore.read_meta(Path(ckpt))
    meta.model.check_parallel(parallel.tp, parallel.pp, parallel.ep)
    rt = init_runtime(parallel, seed)
    dtype = parallel.dtype(meta.params_dtype if keep_dtype else None)
    return rt, meta, load_chunks(ckpt, meta, rt.parallel, dtype)


def load_chunks(ckpt: Path, meta: CheckpointMeta, parallel: ParallelConfig, dtype=None):
    """This rank's chunks of a checkpoint, built under the runtime already started (distill
    loads its teacher and its student this way, under one runtime)."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.model.build import build_model

    chunks = build_model(meta.model, parallel, dtype)
    mcore.load_checkpoint(chunks, Path(ckpt))
    return chunks
