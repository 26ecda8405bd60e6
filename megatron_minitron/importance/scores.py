"""The scores file: one safetensors file of accumulated sums plus JSON metadata in its header.

Tensors (L = layers):
  sums.{ln_attn,ln_mlp}  [L, 3, 2, hidden]   see `stats`: any sequence x sample aggregation
  sums.heads             [L, 3, 2, heads]    is derived from these when the file is read,
  sums.heads_out         [L, 3, 2, heads]    (what each head writes through W_O)
  sums.ffn               [L, 3, 2, ffn]      so one calibration serves every choice and target
  sums.shared_ffn        [L, 3, 2, shared]   MoE: the shared expert's neurons (Qwen2-MoE)
  sums.mamba             [L, 3, 2, heads x head_dim]  hybrid: a Mamba mixer's channels at its
                                             output projection's input (after the gated norm)
  depth.block_influence  [L]                 mean over tokens of 1 - cos(layer in, layer out)
  depth.base_loss        [1]                 LM loss on the depth samples
  depth.skip_loss.k{K}   [L - K + 1]         LM-loss increase when layers i..i+K-1 are skipped
  heads.mask_loss        [L, heads]          LM-loss increase when one head is masked (optional)
  sums.experts           [L, 3, experts]     MoE: routed-output L2 sums, tokens, router mass
  sums.moe_ffn           [L, 3, experts, w]  MoE: each expert's neurons, token sums as `stats`
Metadata: model shape, checkpoint path and fingerprint, data, samples, seq length, default
aggregations, timings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.importance import stats

FORMAT = "minitron-importance-v1"
WIDTH_AXES = ("ln_attn", "ln_mlp", "heads", "ffn")  # in every scores file
MOE_AXES = ("shared_ffn",)
HYBRID_AXES = ("mamba",)
# How heads are ranked: the paper's activation norm, what the head writes through W_O, or the
# LM-loss rise when it alone is masked.
HEAD_METRICS = {"activation": "heads", "output": "heads_out", "loss": "mask_loss"}
# How experts are ranked: the L2 norm of their routed output summed over tokens (the peer's), the
# tokens the router sent them, or the routing probability they received.
EXPERT_METRICS = {"output": 0, "tokens": 1, "probs": 2}


@dataclass
class Scores:
    tensors: dict[str, torch.Tensor]
    meta: dict

    def _aggs(self, seq: str | None, samples: str | None) -> tuple[str, str]:
        return seq or self.meta["seq_agg"], samples or self.meta["sample_agg"]

    def axis(self, name: str, seq: str | None = None, samples: str | None = None
             ) -> torch.Tensor:
        """Per-layer scores [L, width] of one width axis (ln_attn, ln_mlp, heads, heads_out,
        ffn, shared_ffn, mamba); zero in layers without that site (a hybrid's)."""
        if name not in (*WIDTH_AXES, *HEAD_METRICS.values(), *MOE_AXES, *HYBRID_AXES):
            raise ConfigError(f"unknown importance axis {name!r} ({', '.join(WIDTH_AXES)})")
        if f"sums.{name}" not in self.tensors:
            raise ConfigError(f"the scores have no {name} sums (made by an older version); "
                              "rerun `minitron importance`")
        return stats.finalize(self.tensors[f"sums.{name}"], self.meta["samples"],
                              *self._aggs(seq, samples))

    def hidden(self, seq: str | None = None, samples: str | None = None) -> torch.Tensor:
        """Embedding-channel scores [hidden], combined over the norms of every layer (a hybrid's
        Mamba and attention layers' in `ln_attn`, its MLP layers' in `ln_mlp`): L2 of the
        per-site scores for L2 aggregation (the same as one L2 over all samples and sites), their
        sum otherwise."""
        seq, samples = self._aggs(seq, samples)
        per_site = torch.cat([self.axis("ln_attn", seq, samples),
                              self.axis("ln_mlp", seq, samples)])
        return per_site.pow(2).sum(0).sqrt() if samples == "l2" else per_site.sum(0)

    def heads(self, metric: str = "activation") -> torch.Tensor:
        """Head scores [L, heads] by one of HEAD_METRICS; a group scores the sum of its heads."""
        if metric not in HEAD_METRICS:
            raise ConfigError(f"unknown head metric {metric!r} ({', '.join(HEAD_METRICS)})")
        if metric != "loss":
            return self.axis(HEAD_METRICS[metric])
        if "heads.mask_loss" not in self.tensors:
            raise ConfigError("the scores have no head-masking losses; rerun importance with "
                              "--head-samples N (e.g. 8)")
        return self.tensors["heads.mask_loss"]

    def experts(self, metric: str = "output") -> torch.Tensor:
        """Expert scores [L, experts] by one of EXPERT_METRICS."""
        if metric not in EXPERT_METRICS:
            raise ConfigError(f"unknown expert metric {metric!r} ({', '.join(EXPERT_METRICS)})")
        if "sums.experts" not in self.tensors:
            raise ConfigError("the scores have no expert sums (a dense model's, or made by an "
                              "older version); rerun `minitron importance`")
        return self.tensors["sums.experts"][:, EXPERT_METRICS[metric]]

    def moe_ffn(self, seq: str | None = None) -> torch.Tensor:
        """Expert-neuron scores [L, experts, width]: the sequence aggregation (mean |x|, l2, var)
        over all the tokens routed to each expert, which have no sample structure."""
        if "sums.moe_ffn" not in self.tensors:
            raise ConfigError("the scores have no expert-neuron sums (a dense model's, or made by "
                              "an older version); rerun `minitron importance`")
        seq = stats.check_aggregation(self._aggs(seq, None)[0], "sequence")
        tokens = self.tensors["sums.experts"][:, 1, :, None].clamp_min(1)
        values = stats.per_sample(self.tensors["sums.moe_ffn"].movedim(1, 0), tokens)
        return values[stats.AGGREGATIONS.index(seq)]

    def layers(self, metric: str = "skip_loss", block: int = 1) -> torch.Tensor:
        """Depth scores, higher = more important: `block_influence` [L] or `skip_loss` (LM-loss
        increase when `block` contiguous layers starting at each index are skipped)."""
        key = "depth.block_influence" if metric == "block_influence" else \
            f"depth.skip_loss.k{block}" if metric == "skip_loss" else None
        if key is None:
            raise ConfigError(f"unknown depth metric {metric!r} (block_influence, skip_loss)")
        if key not in self.tensors:
            have = sorted(k.split(".k")[-1] for k in self.tensors if "skip_loss" in k)
            raise ConfigError(f"scores have no {metric} for blocks of {block} layers (computed "
                              f"for {', '.join(have) or 'none'}); rerun importance with "
                              f"--block-sizes {block}")
        return self.tensors[key]

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        from megatron_minitron.checkpoint.atomic import atomic_file

        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp),
                      metadata={"format": FORMAT, "minitron": json.dumps(self.meta)})


def load_scores(path: Path) -> Scores:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scores file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ConfigError(f"scores file {path} is not readable safetensors: {e}") from None
    if header.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a megatron-minitron scores file")
    missing = [f"sums.{a}" for a in WIDTH_AXES if f"sums.{a}" not in tensors]
    if missing:
        raise ConfigError(f"scores file {path} lacks {', '.join(missing)}")
    return Scores(tensors, json.loads(header["minitron"]))
