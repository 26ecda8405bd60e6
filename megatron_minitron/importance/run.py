"""One importance pass: stream calibration samples forward-only through the sharded model with
the hooks attached, reduce the sums over all ranks, add the depth metrics, return `Scores`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_minitron.config import ConfigError, ModelConfig
from megatron_minitron.importance import stats
from megatron_minitron.importance.depth import skip_losses
from megatron_minitron.importance.head_loss import head_mask_losses
from megatron_minitron.importance.hooks import ImportanceHooks
from megatron_minitron.importance.scores import FORMAT, Scores
from megatron_minitron.model.forward import data_parallel_share, forward_with_progress
from megatron_minitron.options import option
from megatron_minitron.runtime.progress import Progress


@dataclass
class ImportanceConfig:
    samples: int = option(1024, help="calibration samples (the paper: 1024)")
    seq_length: int = option(4096, help="tokens per calibration sample")
    # The default aggregations are recorded in the file; any can be read later.
    seq_agg: str = option("mean", choices=stats.AGGREGATIONS,
                          help="default aggregation over the sequence (all are stored)")
    sample_agg: str = option("l2", choices=stats.AGGREGATIONS,
                             help="default aggregation over samples (all are stored)")
    block_sizes: tuple[int, ...] = option((1,), help="measure the LM-loss rise of skipping "
                                                     "every contiguous block of K layers")
    depth_samples: int = option(128, help="samples for the layer-skip losses (0: block "
                                          "influence only)")
    head_samples: int = option(0, help="samples for the head-masking LM loss (--head-metric "
                                       "loss): one pass per layer over heads + 1 copies of "
                                       "each; 0: not measured")
    micro_batch_size: int = option(1, help="samples per forward pass")
    seed: int = option(1234, help="which windows of the data are sampled")

    def validate(self, model: ModelConfig) -> None:
        num_layers = model.num_layers
        if model.heterogeneous:  # the scores file's axes are one width for every layer
            raise ConfigError("importance of a heterogeneous model (per-layer widths) is not "
                              "supported: score the homogeneous model it was pruned from")
        if self.seq_length > model.max_position_embeddings:
            raise ConfigError(f"sequence length {self.seq_length} exceeds the model's "
                              f"{model.max_position_embeddings} positions")
        stats.check_aggregation(self.seq_agg, "sequence")
        stats.check_aggregation(self.sample_agg, "sample")
        for k in self.block_sizes:
            if not 1 <= k < num_layers:
                raise ConfigError(f"block size {k} must be between 1 and {num_layers - 1} "
                                  f"(the model has {num_layers} layers)")
        if min(self.depth_samples, self.head_samples) < 0 or self.micro_batch_size < 1:
            raise ConfigError("depth and head samples must be >= 0 and micro batch size >= 1")


def discard_output(_output, _mb) -> None:
    """A `collect` for forward passes run only for their hooks."""
    return None


def activation_pass(chunks, samples: torch.Tensor, micro_batch_size: int,
                    model: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole-model activation sums over `samples` [N, L+1]; data-parallel ranks split them."""
    mine = data_parallel_share(samples, "calibration samples (--samples)")[:, :-1]
    mbs = [{"tokens": t.contiguous()} for t in torch.split(mine, micro_batch_size)]
    progress = Progress("importance", samples.shape[0] * mine.shape[1],
                        hint="pass --samples / --seq-length for a shorter calibration")
    widths = {"ln_attn": model.hidden_size, "ln_mlp": model.hidden_size,
              "heads": model.num_attention_heads, "heads_out": model.num_attention_heads,
              "ffn": model.ffn_hidden_size,
              **({"shared_ffn": model.moe_shared_ffn_hidden_size}
                 if model.moe_shared_ffn_hidden_size else {}),
              **({"mamba": model.mamba_inner} if model.hybrid else {})}
    with ImportanceHooks(chunks) as hooks:
        forward_with_progress(chunks, mbs, discard_output, progress)
        return hooks.reduce(model.num_layers, widths)


def compute_importance(chunks, model: ModelConfig, samples: torch.Tensor, cfg: ImportanceConfig,
                       meta: dict | None = None) -> Scores:
    cfg.validate(model)
    start = time.time()
    sums = activation_pass(chunks, samples, cfg.micro_batch_size, model)
    tensors = {f"sums.{k}": v for k, v in sums.items() if k != "influence"}
    tensors["depth.block_influence"] = sums["influence"][:, 0] / sums["influence"][:, 1]
    seconds = {"activations": time.time() - start}
    if cfg.depth_samples:
        t = time.time()
        tensors.update(skip_losses(chunks, model.num_layers, samples[:cfg.depth_samples],
                                   cfg.block_sizes, cfg.micro_batch_size))
        seconds["depth"] = time.time() - t
    if cfg.head_samples:
        t = time.time()
        tensors["heads.mask_loss"] = head_mask_losses(
            chunks, model.num_layers, model.num_attention_heads, model.kv_channels,
            samples[:cfg.head_samples], model.attention_layers)
        seconds["heads"] = time.time() - t
    info = {"format": FORMAT, "model": model.to_dict(), "samples": int(samples.shape[0]),
            "seq_length": int(samples.shape[1] - 1), "seq_agg": cfg.seq_agg,
            "sample_agg": cfg.sample_agg, "block_sizes": list(cfg.block_sizes),
            "depth_samples": min(cfg.depth_samples, int(samples.shape[0])),
            "head_samples": min(cfg.head_samples, int(samples.shape[0])), "seed": cfg.seed,
            "micro_batch_size": cfg.micro_batch_size,
            "seconds": seconds, **(meta or {})}
    return Scores(tensors, info)
