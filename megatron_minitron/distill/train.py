"""Knowledge-distillation retraining on Megatron-Core's own machinery.

Student: Megatron DDP, `get_megatron_optimizer` (Adam; the distributed optimizer on GPU),
`OptimizerParamScheduler` (warmup + cosine), gradient clipping, per-token loss normalisation over
the global batch, pipeline schedules from `get_forward_backward_func()`. Teacher: frozen (no
gradients, no optimizer state), run forward-only through the same schedules for every microbatch
of a step first; its logits wait on the last pipeline stage, where the student's loss needs them.
That keeps both models on ordinary Megatron schedules at any TP/PP (at the cost of holding one
step's teacher logits on the last stage).

Checkpoints: SAVE/iter_NNNNNNN is an ordinary minitron checkpoint (loadable by every command) plus
`optimizer/` and `train_state.json`; SAVE/latest names the newest. A run resumes from it exactly:
same data order, optimizer and scheduler state.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint.atomic import write_text
from megatron_minitron.config import CheckpointMeta, ConfigError, ParallelConfig, TrainingError
from megatron_minitron.distill.hidden import FinalHidden, cosine_loss_sum, hidden_map
from megatron_minitron.distill.losses import kd_loss, top_k_logits
from megatron_minitron.options import option
from megatron_minitron.runtime.distributed import device, to_device
from megatron_minitron.runtime.interrupt import Preempted, preemption_requested
from megatron_minitron.runtime.progress import Progress

log = logging.getLogger("minitron")
LATEST = "latest"
TRAIN_STATE = "train_state.json"
OPTIMIZER_FORMAT = "optimizer_format"  # train_state's Megatron sharded_state_dict metadata
# The optimizer checkpoint's format, as Megatron-LM's default names it, kept in train_state so a
# resume reads what was written: Megatron's own default for the distributed optimizer is a
# deprecated format it can no longer write (`flattened_range`). dp_reshardable resumes at the same
# TP/PP (any DP); Megatron's fully_reshardable fails to load into torch's Adam (0.16.1).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable",
                      "chained_optim_avoid_prefix": True}


def iteration_dir(save: Path, iteration: int) -> Path:
    """SAVE/iter_0000100: Megatron's name for the checkpoint of an iteration."""
    return Path(save) / f"iter_{iteration:07d}"


@dataclass
class DistillConfig:
    train_iters: int = option(help="optimizer steps")
    global_batch_size: int = option(8, help="sequences per step, over all data-parallel ranks")
    micro_batch_size: int = option(1, help="sequences per forward pass")
    seq_length: int = option(512, help="tokens per sequence")
    lr: float = option(1e-4, help="peak learning rate (cosine decay to --min-lr)")
    min_lr: float = option(1e-5, help="final learning rate")
    warmup_iters: int = option(0, aliases=("--lr-warmup-iters",), help="linear warm-up steps")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    clip_grad: float = option(1.0, help="gradient-norm clip")
    temperature: float = option(1.0, help="softmax temperature of the KD loss")
    kd_weight: float = option(1.0, help="weight of the KL loss on logits")
    lm_weight: float = option(0.0, help="weight of the LM cross-entropy (--kd-weight 0 "
                                        "--lm-weight 1: plain CE, the baseline)")
    hidden_weight: float = option(0.0, help="weight of the cosine loss between final hidden "
                                            "states, the teacher's mapped onto the channels "
                                            "pruning kept")
    moe_aux_loss_coeff: float | None = option(
        None, help="MoE students: weight of the router's load-balancing loss, added to the "
                   "training loss and logged apart as `router` (default: the model's own, "
                   "Hugging Face's router_aux_loss_coef; 0: off)")
    top_k: int = option(0, help="KD over the teacher's k largest logits only (0: the whole "
                                "vocabulary); a step holds k logits per token")
    teacher_cache: str | None = option(None, metavar="DIR", help="keep the teacher's top-k "
                                       "logits of every sample in DIR and read them back in "
                                       "later runs on the same data (search candidates, "
                                       "reruns); needs --top-k")
    eval_interval: int = option(0, help="validate every N steps (0: at the end only)")
    eval_iters: int = option(2, help="validation global batches (0: no validation)")
    save_interval: int = option(0, help="checkpoint every N steps (0: at the end only)")
    keep_last: int = option(2, help="checkpoints kept")
    log_interval: int = option(1, help="log every N steps")
    seed: int = option(1234, help="data order and initialisation")
    split: str = option("98,2,0", help="train,valid,test split of --data when no --valid-data")
    distributed_optimizer: bool | None = option(
        None, flag="--use-distributed-optimizer",
        help="shard optimizer state over data-parallel ranks, Megatron's distributed optimizer "
             "(default: on with CUDA, off on CPU)")

    def validate(self, dp: int) -> None:
        if self.train_iters < 1:
            raise ConfigError("train iterations must be >= 1")
        if self.eval_iters < 0:
            raise ConfigError("eval iterations must be >= 0 (0: no validation)")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"global batch {self.global_batch_size} is not a multiple of "
                              f"micro batch {self.micro_batch_size} x data-parallel size {dp}")
        if self.warmup_iters >= self.train_iters:
            raise ConfigError("warmup iterations must be fewer than train iterations")
        if min(self.kd_weight, self.lm_weight, self.hidden_weight) < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.kd_weight == self.lm_weight == self.hidden_weight == 0:
            raise ConfigError("the KD, LM and hidden-state loss weights are all zero")
        if self.top_k < 0:
            raise ConfigError("top-k must be >= 0 (0: the whole vocabulary)")
        if (self.moe_aux_loss_coeff or 0) < 0:
            raise ConfigError("the load-balancing loss coefficient must be >= 0")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0")
        if self.teacher_cache and not self.top_k:
            raise ConfigError("the teacher cache holds top-k logits: pass --top-k K as well")
        if self.teacher_cache and self.hidden_weight > 0:
            raise ConfigError("the teacher cache holds logits only; --hidden-weight needs the "
                              "teacher's hidden states, computed live (drop --teacher-cache)")


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _token_losses(logits: torch.Tensor, mb: dict, cfg: DistillConfig, evaluating: bool
                  ) -> dict[str, torch.Tensor]:
    """Per-token KD and LM losses [b, s] from vocabulary-parallel logits. Training skips a loss
    whose weight is 0 (a vocabulary pass fewer); evaluation reports both."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    out = {}
    if "teacher" in mb and (evaluating or cfg.kd_weight > 0):
        out["kd"] = kd_loss(logits, mb["teacher"], cfg.temperature, _tp_group())
    if evaluating or cfg.lm_weight > 0:
        out["lm"] = vocab_parallel_cross_entropy(logits.float(), mb["labels"])
    return out


def _loss_func(mb: dict, cfg: DistillConfig, logits: torch.Tensor, evaluating: bool = False,
               hidden: torch.Tensor | None = None, sequence_parallel: bool = False):
    """Megatron's (loss sum, token count, report); `hidden`: the student's final hidden states."""
    parts = _token_losses(logits, mb, cfg, evaluating)
    mask = mb["loss_mask"].float()
    n = mask.sum()
    report = {k: torch.stack([(v * mask).sum().detach(), n]) for k, v in parts.items()}
    loss = sum((w * (parts[k] * mask).sum() for k, w in (("kd", cfg.kd_weight),
                                                         ("lm", cfg.lm_weight))
                if k in parts and w > 0), torch.zeros((), device=n.device))
    if hidden is not None and "teacher_hidden" in mb:
        h = cosine_loss_sum(hidden, mb["teacher_hidden"], mask, sequence_parallel)
        report["hidden"] = torch.stack([h.detach(), n])
        loss = loss + cfg.hidden_weight * h
    report["loss"] = torch.stack([loss.detach(), n])
    return loss, n.int(), report


def _reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Token-weighted means over microbatches and data-parallel ranks, on every rank."""
    from megatron.core import parallel_state

    from megatron_minitron.model.forward import broadcast_from_last_stage

    keys = ("loss", "kd", "lm", "hidden")
    sums = torch.zeros(len(keys), 2, dtype=torch.float64, device=device())
    for r in reports:
        for i, k in enumerate(keys):
            if k in r:
                sums[i] += r[k].double()
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    sums = broadcast_from_last_stage(sums if reports else None, (len(keys), 2)).tolist()
    return {k: total / n for k, (total, n) in zip(keys, sums, strict=True) if n > 0}


def load_optimizer(optimizer, model_sharded: dict, directory: Path, metadata: dict | None
                   ) -> None:
    """Load Megatron's optimizer state saved in `metadata`'s format. Megatron's distributed
    optimizer on torch's Adam (no TE or apex, as on CPU) trips in three places: building the state
    dict to load into reads the step from per-parameter state that exists only after a first
    step; the load itself then refuses that per-parameter step (it restores the group's);
    and dp_reshardable copies into fp32 main params, views of the weights, outside no_grad. So
    Adam's initial state is put in first, its per-parameter step taken out before the load and
    set from the loaded group's after it."""
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import distrib_optimizer as do

    torch_adam = [] if getattr(do, "HAVE_APEX_OR_TE", True) else [
        o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(o, do.DistributedOptimizer)]
    for opt in torch_adam:
        for p in (p for g in opt.param_groups for p in g["params"]):
            if "step" not in opt.state[p]:
                opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                    exp_avg_sq=torch.zeros_like(p))
    loaded = dist_checkpointing.load({"optimizer": optimizer.sharded_state_dict(
        model_sharded, is_loading=True, metadata=metadata)}, str(directory))
    for opt in torch_adam:
        for state in opt.state.values():
            state.pop("step", None)
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    for opt in torch_adam:
        for g in opt.param_groups:
            for p in g["params"]:
                opt.state[p]["step"] = torch.tensor(float(g["step"]))


class Distiller:
    """Holds teacher, student, optimizer, scheduler and data; `run()` trains."""

    def __init__(self, teacher: Path, student: Path, data: list[str], save: Path,
                 cfg: DistillConfig, parallel: ParallelConfig,
                 valid_data: list[str] | None = None):
        from megatron.core import parallel_state

        from megatron_minitron.checkpoint import mcore
        from megatron_minitron.data.tokenizer import load_tokenizer
        from megatron_minitron.distill.data import build_datasets, parse_blend
        from megatron_minitron.runtime import init_runtime

        self.cfg, self.save, self.teacher_path = cfg, Path(save), Path(teacher)
        t_meta, self.s_meta = mcore.read_meta(teacher), mcore.read_meta(student)
        if cfg.moe_aux_loss_coeff is not None:  # the student trains (and is saved) with it
            if not self.s_meta.model.moe:
                raise ConfigError("--moe-aux-loss-coeff: the student has no experts")
            self.s_meta.model.moe_aux_loss_coeff = cfg.moe_aux_loss_coeff
        if t_meta.model.vocab_size != self.s_meta.model.vocab_size:
            raise ConfigError(f"teacher vocabulary {t_meta.model.vocab_size} != student "
                              f"{self.s_meta.model.vocab_size}")
        t_tok, s_tok = mcore.tokenizer_files(teacher), mcore.tokenizer_files(student)
        if {k: v.read_bytes() for k, v in t_tok.items()} != \
                {k: v.read_bytes() for k, v in s_tok.items()}:
            raise ConfigError("teacher and student checkpoints carry different tokenizers")
        prefixes, weights = parse_blend(data)
        valid = parse_blend(valid_data)[0] if valid_data else None
        t_meta.model.check_parallel(parallel.tp, parallel.pp)
        parallel.check_sequence(cfg.seq_length)
        self.s_meta.model.check_parallel(parallel.tp, parallel.pp)
        self.tokenizer_files = s_tok
        self.rt = init_runtime(parallel, cfg.seed)
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        cfg.validate(self.dp)
        self.save.mkdir(parents=True, exist_ok=True)
        gbs = cfg.global_batch_size
        tok = load_tokenizer(student)
        self.prefix = tok.prefix
        self.train_data, self.valid_data = build_datasets(
            prefixes, weights, tok, cfg.seq_length, cfg.seed, cfg.split,
            cfg.train_iters * gbs, cfg.eval_iters * gbs, self.save / "data_cache", valid)
        self.cache = self._teacher_cache(t_meta) if cfg.teacher_cache else None
        # A cache holding every sample of the run: the teacher is never loaded.
        self.teacher = None if self._all_cached() else self._frozen_teacher(t_meta, teacher)
        self._build_student(student)
        self.hidden = None  # (teacher hook, student hook, teacher channels) with a hidden loss
        if cfg.hidden_weight > 0:
            self.hidden = (FinalHidden(self.teacher[-1]), FinalHidden(self.modules[-1]),
                           hidden_map(t_meta, self.s_meta))

    def _teacher_cache(self, meta: CheckpointMeta):
        from megatron.core import parallel_state

        from megatron_minitron.distill.teacher_cache import TeacherCache, cache_key

        data = {"train": self.train_data.unique_description_hash,
                "valid": self.valid_data.unique_description_hash if self.valid_data else ""}
        key = cache_key(meta.fingerprint, self.rt.parallel.dtype(), self.cfg.top_k,
                        self.cfg.seq_length, data)
        writer = (parallel_state.get_tensor_model_parallel_rank() == 0
                  and parallel_state.is_pipeline_last_stage(ignore_virtual=True))
        return TeacherCache(Path(self.cfg.teacher_cache), key, writer)

    def _all_cached(self) -> bool:
        """Every sample this run will read is in the cache, on every rank."""
        if self.cache is None:
            return False
        cfg = self.cfg
        here = all(self.cache.has(split, [i for ix in self._sample_indices(step) for i in ix])
                   for split, steps in (("train", cfg.train_iters), ("valid", cfg.eval_iters))
                   for step in range(steps))
        flag = torch.tensor([int(here)], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _frozen_teacher(self, meta: CheckpointMeta, path: Path):
        from megatron_minitron.model import load_chunks

        chunks = load_chunks(path, meta, self.rt.parallel)
        for c in chunks:
            c.eval()
            c.requires_grad_(False)
        return chunks

    def _build_student(self, path: Path) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_minitron.model import load_chunks

        cfg = self.cfg
        dist_opt = torch.cuda.is_available() if cfg.distributed_optimizer is None \
            else cfg.distributed_optimizer
        chunks = load_chunks(path, self.s_meta, self.rt.parallel)
        config = chunks[0].config
        config.calculate_per_token_loss = True  # normalise by the global batch's token count
        for m in (m for c in chunks for m in c.modules() if hasattr(m, "calculate_per_token_loss")):
            m.calculate_per_token_loss = True  # MoE routers copy it when built
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=dist_opt, average_in_collective=False)
        self.student = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
                        for i, c in enumerate(chunks)]
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [m.no_sync for m in self.student] if len(self.student) > 1 \
            else self.student[0].no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=0.9, adam_beta2=0.95, clip_grad=cfg.clip_grad,
            use_distributed_optimizer=dist_opt, bf16=config.bf16, fp16=config.fp16,
            params_dtype=config.params_dtype), self.student)
        # bf16/fp16 weights: the optimizer keeps fp32 main weights; fp16 scales the loss.
        config.grad_scale_func = self.optimizer.scale_loss
        gbs, iters = cfg.global_batch_size, cfg.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.warmup_iters else cfg.lr, max_lr=cfg.lr,
            min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_iters * gbs,
            lr_decay_steps=iters * gbs, lr_decay_style="cosine", start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay, wd_incr_steps=iters * gbs, wd_incr_style="constant")
        self.iteration = 0

    @property
    def modules(self) -> list:
        return [m.module for m in self.student]

    # --- one step ------------------------------------------------------------------------------

    def _first_sample(self, step: int) -> int:
        per_dp = self.cfg.global_batch_size // self.dp
        return step * self.cfg.global_batch_size + self.dp_rank * per_dp

    def _sample_indices(self, step: int) -> list[list[int]]:
        """The dataset indices of each of this rank's microbatches of global batch `step`."""
        start, mbs = self._first_sample(step), self.cfg.micro_batch_size
        return [list(range(start + j, start + j + mbs))
                for j in range(0, self.cfg.global_batch_size // self.dp, mbs)]

    def _microbatches(self, dataset, step: int) -> list[dict]:
        from megatron_minitron.distill.data import microbatches

        return microbatches(dataset, self._first_sample(step), self.cfg.global_batch_size //
                            self.dp, self.cfg.micro_batch_size, self.prefix)

    def _cached_teacher(self, mbs: list[dict], split: str, step: int) -> bool:
        """Attach the cached top k when the whole batch is cached; the model-parallel ranks
        agree, since they run the teacher forward together or not at all."""
        from megatron.core import parallel_state

        from megatron_minitron.model.forward import is_last_stage

        indices = self._sample_indices(step)
        flag = torch.tensor([int(all(self.cache.has(split, ix) for ix in indices))],
                            device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN,
                        group=parallel_state.get_model_parallel_group())
        if not flag.item():
            if self.teacher is None:
                raise ConfigError(f"teacher cache {self.cache.root} lost {split} samples of "
                                  f"batch {step} during the run; rerun to recompute them")
            return False
        if is_last_stage():
            for mb, ix in zip(mbs, indices, strict=True):
                top = self.cache.read(split, ix, mb["tokens"])
                mb["teacher"] = type(top)(top.values.to(device()), top.ids.to(device()))
        return True

    def _attach_teacher(self, mbs: list[dict], split: str, step: int,
                        always: bool = False) -> None:
        """Teacher logits (or their top k) and mapped hidden states per microbatch; skipped in
        training when only the LM loss counts (plain CE)."""
        from megatron_minitron.model.forward import forward_microbatches

        cfg = self.cfg
        if cfg.kd_weight <= 0 and cfg.hidden_weight <= 0 and not always:
            return
        if self.cache is not None and self._cached_teacher(mbs, split, step):
            return

        def collect(logits: torch.Tensor, _mb) -> dict:
            out = {"teacher": top_k_logits(logits, cfg.top_k, _tp_group()) if cfg.top_k
                   else logits.detach()}
            if self.hidden is not None:
                teacher_hook, _, channels = self.hidden
                out["teacher_hidden"] = teacher_hook.pop()[..., channels]
            return out

        out = forward_microbatches(self.teacher, mbs, collect, loss_in_model=False)
        for mb, teacher in zip(mbs, out, strict=False):  # last stage only; others get []
            mb.update(teacher)
        if self.cache is not None:
            for mb, ix, teacher in zip(mbs, self._sample_indices(step), out, strict=False):
                self.cache.write(split, ix, mb["tokens"], teacher["teacher"])

    def _student_hidden(self) -> torch.Tensor | None:
        return self.hidden[1].pop() if self.hidden is not None else None

    def train_step(self) -> dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg, sp = self.cfg, self.rt.parallel.sequence_parallel
        mbs = self._microbatches(self.train_data, self.iteration)
        self._attach_teacher(mbs, "train", self.iteration)
        for m in self.student:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

        def step(data_iterator, model):
            mb = to_device(next(data_iterator))
            logits = model(mb["tokens"], mb["position_ids"], None)
            return logits, partial(_loss_func, mb, cfg, hidden=self._student_hidden(),
                                   sequence_parallel=sp)

        iters = [iter(mbs) for _ in self.student] if len(self.student) > 1 else iter(mbs)
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters,
            model=self.student if len(self.student) > 1 else self.student[0],
            num_microbatches=len(mbs), seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        out = _reduce_reports(reports)
        if self.s_meta.model.moe_aux_loss_coeff:
            out["router"] = self._router_loss(len(mbs))
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        if not ok or not all(math.isfinite(v) for v in out.values()):
            raise TrainingError(
                f"loss or gradient became NaN/Inf at iteration {self.iteration + 1} "
                f"({out}); stopping, the last good checkpoint in {self.save} is kept")
        self.scheduler.step(increment=cfg.global_batch_size)
        self.iteration += 1
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def _router_loss(self, microbatches: int) -> float:
        """The load-balancing loss before its coefficient, mean over MoE layers, microbatches and
        replicas, from Megatron's tracker (which this resets). Summed over the world here:
        Megatron's own reduction averages over data-parallel ranks, which gloo cannot do."""
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        total = (entry["values"].sum() if entry else torch.zeros((), device=device())).double()
        clear_aux_losses_tracker()
        p, world = self.rt.parallel, dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(total)
        replicas = world // p.pp  # TP ranks times data-parallel ranks
        return float(total) / (replicas * self.s_meta.model.num_layers * microbatches)

    def evaluate(self) -> dict[str, float]:
        from megatron_minitron.model.forward import forward_microbatches

        if not self.cfg.eval_iters:  # --eval-iters 0: no validation
            return {}
        reports = []
        for b in range(self.cfg.eval_iters):
            mbs = self._microbatches(self.valid_data, b)
            self._attach_teacher(mbs, "valid", b, always=True)  # val KD reported either way
            reports += forward_microbatches(
                self.modules, mbs,
                lambda logits, mb: _loss_func(mb, self.cfg, logits, True, self._student_hidden(),
                                              self.rt.parallel.sequence_parallel)[2],
                loss_in_model=False)
        out = _reduce_reports(reports)
        out["ppl"] = math.exp(min(out["lm"], 50.0))
        return {f"val_{k}": v for k, v in out.items()}

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        from megatron.core import dist_checkpointing

        from megatron_minitron.checkpoint import mcore

        dst = iteration_dir(self.save, self.iteration)
        meta = CheckpointMeta(model=self.s_meta.model, tokenizer=self.s_meta.tokenizer,
                              source=f"distilled from {self.teacher_path.resolve()}",
                              history=[*self.s_meta.history,
                                       f"distilled for {self.iteration} iterations"],
                              hidden_map=self.s_meta.hidden_map)
        state = {"iteration": self.iteration, "scheduler": self.scheduler.state_dict(),
                 "config": asdict(self.cfg), OPTIMIZER_FORMAT: OPTIMIZER_METADATA}

        def optimizer_state(stage: Path) -> None:
            if self.rt.is_main:
                (stage / "optimizer").mkdir()
            dist.barrier()
            sharded = mcore.sharded_state_dict(self.modules)
            dist_checkpointing.save({"optimizer": self.optimizer.sharded_state_dict(
                sharded, metadata=state[OPTIMIZER_FORMAT])}, str(stage / "optimizer"))
            if self.rt.is_main:
                (stage / TRAIN_STATE).write_text(json.dumps(state, indent=2))

        if self.rt.is_main and dst.exists():  # a re-run of the same iteration replaces it
            shutil.rmtree(dst)
        mcore.save_checkpoint(self.modules, meta, dst, self.tokenizer_files, extra=optimizer_state)
        if self.rt.is_main:
            write_text(self.save / LATEST, dst.name)
            kept = sorted(self.save.glob("iter_*"))
            for old in kept[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return dst

    def resume(self) -> bool:
        """Continue from SAVE/latest if there is one."""
        from megatron_minitron.checkpoint import mcore

        latest = self.save / LATEST
        if not latest.is_file():
            return False
        ckpt = self.save / latest.read_text().strip()
        state = json.loads((ckpt / TRAIN_STATE).read_text())
        mcore.load_checkpoint(self.modules, ckpt)
        load_optimizer(self.optimizer, mcore.sharded_state_dict(self.modules), ckpt / "optimizer",
                       state.get(OPTIMIZER_FORMAT))
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = state["iteration"]
        log.info("resumed from %s at iteration %d", ckpt, self.iteration)
        return True

    # --- the loop ------------------------------------------------------------------------------

    def _preempted(self) -> bool:
        """Whether any rank got SLURM's preemption warning: all stop after the same step."""
        flag = torch.tensor([float(preemption_requested())], device=device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> Path:
        from megatron_minitron.distill.report import MetricsLog

        cfg = self.cfg
        self.resume()
        metrics = MetricsLog(self.save, self.rt.is_main, after=self.iteration)
        tokens = cfg.global_batch_size * cfg.seq_length
        progress = Progress("distill", cfg.train_iters - self.iteration, unit="iterations",
                            every_s=0)
        pending = 0
        if self.iteration == 0:
            metrics.write({"iteration": 0, **self.evaluate()})
        while self.iteration < cfg.train_iters:
            t = time.time()
            row = self.train_step()
            row.update(iteration=self.iteration, tokens_per_s=tokens / (time.time() - t))
            last = self.iteration == cfg.train_iters
            if last or (cfg.eval_interval and self.iteration % cfg.eval_interval == 0):
                row.update(self.evaluate())
            metrics.write(row)
            pending += 1
            if self.iteration % cfg.log_interval == 0 or last:
                parts = ", ".join(f"{k} {row[k]:.4f}" for k in ("kd", "lm", "hidden", "router")
                                  if k in row)
                progress.what = (f"distill: loss {row['loss']:.4f} ({parts}) lr {row['lr']:.2e} "
                                 f"{row['tokens_per_s']:.0f} tok/s")
                progress.update(pending)
                pending = 0
            saved = last or (cfg.save_interval and self.iteration % cfg.save_interval == 0)
            if saved:
                self.save_checkpoint()
            if not last and self._preempted():
                dst = iteration_dir(self.save, self.iteration) if saved else self.save_checkpoint()
                raise Preempted(f"stopped after iteration {self.iteration}, saved as {dst}; "
                                "the same command resumes from it")
        metrics.close(plot=True)
        return iteration_dir(self.save, self.iteration)
