"""Megatron dist checkpoints: ours (self-describing) and Megatron-LM's, read and written alike.

Layout of our checkpoint directory:
  minitron.json   model shape, family, tokenizer file, provenance (CheckpointMeta)
  tokenizer/      tokenizer.json or tokenizer.model (+ tokenizer_config.json)
  weights/        Megatron-Core dist checkpoint (torch_dist), loadable at any TP/PP
A Megatron-LM save directory holds the same dist checkpoint under iter_*/ or release/, described
by its training args instead (checkpoint/megatron_lm.py), a Megatron-Bridge one by its model
provider (checkpoint/megatron_bridge.py). FORMATS names the three for --to.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import pickle
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint import megatron_bridge, megatron_lm
from megatron_minitron.checkpoint.atomic import atomic_directory
from megatron_minitron.checkpoint.layout import OUTPUT_LAYER
from megatron_minitron.config import CheckpointMeta, ConfigError
from megatron_minitron.runtime import interrupt

log = logging.getLogger("minitron")
META_FILE = "minitron.json"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_DIR = "weights"
FORMATS = ("minitron", "megatron-lm", "megatron-bridge")


def is_mcore_dir(path: Path) -> bool:
    """A Megatron-Core checkpoint this package loads: ours or Megatron-LM's."""
    return (Path(path) / META_FILE).is_file() or megatron_lm.is_megatron_lm_dir(path)


def weights_dir(path: Path) -> Path:
    path = Path(path)
    if megatron_lm.is_megatron_lm_dir(path):
        return megatron_lm.iteration_dir(path)
    return path / WEIGHTS_DIR


def tokenizer_dir(path: Path) -> Path | None:
    path = Path(path)
    if megatron_bridge.is_bridge_dir(path):
        it = megatron_lm.iteration_dir(path) / megatron_lm.TOKENIZER_DIR
        return it if it.is_dir() else None
    if megatron_lm.is_megatron_lm_dir(path):
        return megatron_lm.tokenizer_dir(path)
    return path / TOKENIZER_DIR if (path / TOKENIZER_DIR).is_dir() else None


def read_meta(path: Path) -> CheckpointMeta:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    if megatron_bridge.is_bridge_dir(path):
        return megatron_bridge.read_meta(path)
    if megatron_lm.is_megatron_lm_dir(path):
        return megatron_lm.read_meta(path)
    meta = CheckpointMeta.from_file(path / META_FILE)
    if not (path / WEIGHTS_DIR / "metadata.json").is_file():
        raise ConfigError(f"checkpoint {path} has no weights/ (incomplete or corrupt)")
    return meta


def sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _move_views_out(sharded: dict) -> None:
    """Megatron's dist-checkpoint writer clones, all together before it writes, every CPU tensor
    that is a view into a larger storage: SwiGLU's fc1 halves, which the sharded state dict cuts
    out of one parameter, half the weights of a Llama. For a model discarded after its save, each
    such parameter is copied into its parts and its storage freed, one at a time, so the save holds
    one extra fc1 instead of all. (A GPU writer stages every tensor to the host anyway.)"""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)
    by_storage: dict[int, list] = {}
    for t in nested_values(sharded):
        if isinstance(t, ShardedTensor) and t.data.device.type == "cpu":
            by_storage.setdefault(t.data.untyped_storage().data_ptr(), []).append(t)
    for parts in by_storage.values():
        storage = parts[0].data.untyped_storage()
        if any(storage.nbytes() == t.data.numel() * t.data.element_size() for t in parts):
            continue  # a whole tensor: written as it is
        for t in parts:
            t.data = t.data.clone()
        storage.resize_(0)


def save_checkpoint(chunks, meta: CheckpointMeta, dst: Path,
                    tokenizer_files: dict[str, bytes | Path], extra=None,
                    discard_model: bool = False, fmt: str = "minitron") -> None:
    """Every rank calls this; the directory appears at `dst` only when all shards are written.
    A meta without a fingerprint (new weights) gets a fresh one. `extra(stage)` runs on every rank
    inside the staging directory. `discard_model`: the caller drops the chunks after the save
    (an import), which lets the save free their memory as it goes. `fmt` megatron-lm: a
    Megatron-LM save directory (`release/`, its args in common.pt) instead of ours;
    megatron-bridge: Bridge's (`iter_0000000/`, its model provider in run_config.yaml)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _writer_errors() as logged, \
                atomic_directory(Path(dst), is_writer=_rank() == 0, barrier=_barrier) as stage:
            if fmt not in FORMATS:
                raise ConfigError(f"unknown checkpoint format {fmt!r} ({', '.join(FORMATS)})")
            lm, bridge = fmt == "megatron-lm", fmt == "megatron-bridge"
            weights = stage / {"megatron-lm": megatron_lm.RELEASE,
                               "megatron-bridge": "iter_0000000"}.get(fmt, WEIGHTS_DIR)
            if _rank() == 0:
                weights.mkdir()
            _barrier()
            meta.params_dtype = str(next(chunks[0].parameters()).dtype).removeprefix("torch.")
            sharded = sharded_state_dict(chunks)
            if lm:  # the rest goes to common.pt, as Megatron-LM's save puts it
                sharded.update(megatron_lm.common_state(meta, Path(dst).resolve() / (
                    megatron_lm.RELEASE), tokenizer_files))
            elif bridge:
                megatron_lm.check_describable(meta.model)
                sharded.update(checkpoint_version=megatron_lm.CHECKPOINT_VERSION, iteration=0)
            if discard_model:
                _move_views_out(sharded)
            with interrupt.deferred():  # the writer forks: see runtime/interrupt.py
                dist_checkpointing.save(sharded, str(weights))
                if extra is not None:  # more state in the same directory (training: optimizer)
                    extra(stage)
            if _rank() == 0:
                tok = weights / megatron_lm.TOKENIZER_DIR if lm or bridge else \
                    stage / TOKENIZER_DIR
                tok.mkdir()
                for name, content in tokenizer_files.items():
                    if isinstance(content, Path):
                        shutil.copy2(content, tok / name)
                    else:
                        (tok / name).write_bytes(content)
                if lm:
                    (stage / megatron_lm.TRACKER).write_text(megatron_lm.RELEASE)
                elif bridge:
                    megatron_bridge.write_description(stage, weights, meta.model,
                                                      meta.params_dtype)
                else:
                    meta.fingerprint = meta.fingerprint or uuid.uuid4().hex
                    (stage / META_FILE).write_text(meta.to_json())
    except (OSError, CheckpointException) as e:  # a full or failing disk: one line, dst untouched
        log.debug("writing %s failed", dst, exc_info=True)
        cause = _cause(e)
        if logged:  # 0.19's writer: the OSError's message is only in its log
            cause += f"; {logged[0].splitlines()[0][:300]}"
        raise ConfigError(f"writing checkpoint {dst} failed ({cause}); nothing was written "
                          "there") from None


@contextlib.contextmanager
def _writer_errors() -> Iterator[list[str]]:
    """The error messages Megatron's checkpoint writer logs meanwhile. From megatron-core 0.19 a
    writer thread's exception (the disk's OSError) reaches the caller only as its type, in a
    RuntimeError; the message, which says what failed, goes to the log alone."""
    logged: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("megatron.core.dist_checkpointing")
    logger.addHandler(handler)
    try:
        yield logged
    finally:
        logger.removeHandler(handler)


def tokenizer_files(ckpt: Path) -> dict[str, Path]:
    from megatron_minitron.checkpoint.hf_io import TOKENIZER_FILES

    d = tokenizer_dir(ckpt)  # a Megatron-LM arg may name a whole HF model dir: its tokenizer only
    return {p.name: p for p in sorted(d.iterdir()) if p.name in TOKENIZER_FILES} if d else {}


def load_checkpoint(chunks, ckpt: Path) -> CheckpointMeta:
    """Load weights into this rank's chunks, resharding from whatever TP/PP they were saved at."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    meta = read_meta(ckpt)
    sharded = sharded_state_dict(chunks)
    in_place = {name: _build_factories(d) for name, d in sharded.items()}
    _install_safe_metadata_reader()
    try:
        weights = weights_dir(ckpt)
        loaded, ckpt_only, model_only = dist_checkpointing.load(
            sharded, str(weights), strict=StrictHandling.RETURN_ALL,
            **common_file_optional(dist_checkpointing.load, weights))
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is no Exception
        log.debug("loading %s failed", ckpt, exc_info=True)  # the whole cause, with -v
        raise ConfigError(f"checkpoint {ckpt}: weights cannot be loaded ({_cause(e)})") from None
    # Transformer Engine modules carry `_extra_state` (FP8 metadata) that the local spec lacks,
    # and the reverse: either side may miss it (CPU-converted checkpoints train on TE GPUs).
    # 0.19 keeps the (empty) common state in the checkpoint as an object; Megatron-LM's hold the
    # optimizer and RNG too. Any other mismatch is an error.
    mismatched = sorted(k for k in (*ckpt_only, *model_only)
                        if "_extra_state" not in k and k != COMMON_OBJECT and (
                            k in model_only or k.startswith(megatron_lm.MODEL_KEY_PREFIXES)))
    if mismatched:
        raise ConfigError(f"checkpoint {ckpt}: weights do not match the model ({len(mismatched)} "
                          f"keys, e.g. {', '.join(mismatched[:3])})")
    for name, c in zip(sharded, chunks, strict=True):
        for key, parts in in_place[name].items():
            for part, got in zip(parts, nested_values(loaded[name].pop(key)), strict=True):
                if got.data_ptr() != part.data_ptr():  # read elsewhere: copy it in
                    part.copy_(got)
        c.load_state_dict(loaded[name], strict=False)
    return meta


COMMON_FILE = megatron_lm.COMMON_FILE  # written up to megatron-core 0.18
COMMON_OBJECT = "common_state"  # from 0.19


def common_file_optional(load, weights: Path) -> dict:
    """Keyword arguments for Megatron's `dist_checkpointing.load` that read a checkpoint written
    by megatron-core 0.19, which no longer writes `common.pt` (the non-sharded state, empty in a
    model's checkpoint), with releases up to 0.18, which require the file: a common strategy that
    reads a missing file as empty. 0.19's `load` takes no common strategy (nor needs one).
    Megatron-LM's common.pt (training args: read apart, through the allow-list) is skipped too."""
    import inspect

    if "common_strategy" not in inspect.signature(load).parameters or (
            (weights / COMMON_FILE).exists() and not megatron_lm.is_megatron_lm_dir(weights)):
        return {}
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class NoCommonFile(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return {}

    return {"common_strategy": NoCommonFile()}


def _build_factories(sharded: dict) -> dict[str, list[torch.Tensor]]:
    """Replace the sharded tensor factories at the top of one chunk's sharded state dict by the
    tensors they build (SwiGLU's fc1 halves: views of the parameter), so the checkpoint is read
    into the parameters themselves. Megatron's own load would read the parts, then concatenate
    every fc1 at once into new tensors to copy in: half a Llama's weights more at the peak."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    built = {}
    for key, value in sharded.items():
        if isinstance(value, ShardedTensorFactory):
            sharded[key] = value.build()
            built[key] = [t.data for t in nested_values(sharded[key])]
    return built


def _cause(e: BaseException) -> str:
    """One line for a load failure; torch's CheckpointException wraps each rank's real one."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    if isinstance(e, EOFError):
        return "a weights file ends early (truncated?)"
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:300]}"


# --- the dist checkpoint's .metadata is a pickle: read it without running arbitrary code -------

_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
    ("torch", "float64"), ("torch", "int64"), ("torch", "int32"), ("torch", "int8"),
    ("torch", "uint8"), ("torch", "bool"), ("torch", "strided"), ("torch", "contiguous_format"),
    ("torch", "preserve_format"), ("torch", "channels_last"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("torch.serialization", "_get_layout"),
    # megatron-core 0.15 writes its own Metadata / SavePlan subclasses (data only); later
    # releases keep empty stand-ins under these names so that such checkpoints still load.
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
}


def _enum_member(cls, name: str):
    """What `getattr` may do in checkpoint metadata: some Python versions (3.11.2) pickle an enum
    member (DCP's write-item types) as `getattr(EnumClass, name)`. Nothing else is reachable."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
        raise pickle.UnpicklingError(f"refusing getattr on {cls!r} in checkpoint metadata")
    return cls[name]


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if module.startswith(_SAFE_MODULE_PREFIXES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from checkpoint metadata (not an allowed type)")


def _install_safe_metadata_reader() -> None:
    from torch.distributed.checkpoint import filesystem

    if getattr(filesystem.FileSystemReader.read_metadata, "_minitron_safe", False):
        return
    original = filesystem.FileSystemReader.read_metadata

    def read_metadata(self, *args, **kwargs):
        real_load = pickle.load
        pickle.load = lambda f, *a, **k: _SafeUnpickler(f).load()
        try:
            return original(self, *args, **kwargs)
        finally:
            pickle.load = real_load

    read_metadata._minitron_safe = True
    filesystem.FileSystemReader.read_metadata = read_metadata


def model_state_dict(chunks) -> dict[str, torch.Tensor]:
    """Full-size tensors of a single-process (TP=1, PP=1) model, tied output weight excluded."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError("exporting full weights runs in one process (TP=1, PP=1); "
                          "the dist checkpoint reshards on load, so launch without torchrun")
    sd = chunks[0].state_dict()
    return {k: v.cpu() for k, v in sd.items() if "_extra_state" not in k and not (
        k == OUTPUT_LAYER and chunks[0].share_embeddings_and_output_weights)}
