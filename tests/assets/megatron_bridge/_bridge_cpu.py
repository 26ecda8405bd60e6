"""Run Megatron-Bridge's own checkpoint code (megatron.bridge.training.model_load_save) on one CPU.

Shared by make_fixture.py and load_check.py, which are run by hand:

    PYTHONPATH=/tmp/mbridge:/path/to/repo .venv/bin/python tests/assets/megatron_bridge/<script>.py ...

where /tmp/mbridge holds `pip install --no-deps --target /tmp/mbridge megatron-bridge==0.3.1 einops`
(megatron-core, torch, transformers, omegaconf, PyYAML... come from the project's venv).

Everything that shapes the checkpoint (the GPTModelProvider and its provide_distributed_model,
temporary_distributed_context, save_megatron_model -> save_checkpoint -> dist_checkpointing.save,
ConfigContainer.to_yaml, load_model_config / build_and_load_model) is Megatron-Bridge's and
Megatron-Core's code. This module only adds what a CPU-only, Transformer-Engine-free, Triton-free,
TensorBoard-free machine lacks; each shim below says why it is needed.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # for megatron_minitron.runtime.cpu_compat

# Megatron-Core modules that probe for Transformer Engine at import time (`try: import
# transformer_engine ... HAVE_TE = True`) and that importing megatron.bridge would otherwise import
# for the first time while the stand-in of shim 3 is registered. They are imported before it, so
# they see the truth (no TE). modelopt's Megatron plugin does the same (HAS_TE).
_TE_PROBING_MODULES = [
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.models.gpt.experimental_attention_variant_module_specs",
    "megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs",
    "megatron.core.models.multimodal.llava_model",
    "megatron.core.models.vision.clip_vit_model",
    "megatron.core.transformer.heterogeneous.linear_replacements",
    "megatron.core.ssm.mamba_context_parallel",
    "modelopt.torch.nas.plugins.megatron",
]


class _TEPlaceholder:
    """Stands for any Transformer Engine class in a class statement or annotation."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("Transformer Engine is not installed (CPU shim placeholder)")


class _TEPlaceholderMeta(type):
    def __getattr__(cls, name):  # te.ops.Sequential, te.pytorch.Linear, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return _TEPlaceholderMeta(name, (_TEPlaceholder,), {})


def _te_stub(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _TEPlaceholderMeta(attr, (_TEPlaceholder,), {})

    mod.__getattr__ = __getattr__
    return mod


def setup() -> types.SimpleNamespace:
    """Install the CPU shims, import Megatron-Bridge, and return the Bridge modules used."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    os.environ.pop("MINITRON_STRICT_DEVICE", None)  # the project's strict mode is for its tests

    import torch

    # Shim 1: megatron.bridge.models imports the Mamba provider, which imports Megatron-Core's
    # megatron/core/ssm/mamba_mixer.py, which imports
    # megatron.core.inference.contexts.attention_context.triton.tensor_ops, which does
    # `import triton` at module level (Triton kernels for Mamba dynamic-batching inference).
    # Triton is not installed here; register a stand-in exposing the three names mamba_mixer
    # imports, failing loudly if ever called (no Mamba model is built).
    name = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    try:
        import triton  # noqa: F401
    except ImportError:
        stub = types.ModuleType(name)

        def _needs_triton(*args, **kwargs):
            raise RuntimeError(f"{name} needs Triton, which is not installed")

        stub.tensor_get_slice_after = stub.tensor_masked_update = stub.tensor_merge = _needs_triton
        sys.modules[name] = stub

    # Shim 2: megatron/bridge/training/state.py does
    # `from torch.utils.tensorboard.writer import SummaryWriter` at module level (only used as a type
    # and, lazily, when logger.tensorboard_dir is set; it is not). torch.utils.tensorboard imports
    # the `tensorboard` package, not installed here. Stand-in modules with a SummaryWriter that
    # fails loudly if instantiated.
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        tb = types.ModuleType("torch.utils.tensorboard")
        tb.__path__ = []
        tbw = types.ModuleType("torch.utils.tensorboard.writer")

        class SummaryWriter:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("tensorboard is not installed (CPU shim)")

        tbw.SummaryWriter = tb.SummaryWriter = SummaryWriter
        tb.writer = tbw
        sys.modules["torch.utils.tensorboard"] = tb
        sys.modules["torch.utils.tensorboard.writer"] = tbw

    # Shim 3: `import megatron.bridge` (its __init__ imports AutoBridge -> model_bridge ->
    # peft_bridge -> peft.canonical_lora -> peft.lora_layers / peft.lora) runs
    # `import transformer_engine.pytorch as te` unconditionally and defines classes such as
    # `class TELinearAdapter(te.Linear)` and annotations `te.ops.Sequential` at module level (LoRA
    # support; unused here). Transformer Engine cannot be installed on a CPU-only machine. A
    # stand-in `transformer_engine` package whose attributes are placeholder classes is registered
    # only while megatron.bridge is imported, then removed from sys.modules so that any later
    # `import transformer_engine` fails as it should. To keep the stand-in from being mistaken for
    # TE: (a) the Megatron-Core/modelopt modules that probe for TE are imported before it; (b) the
    # Bridge modules that probed during the window get their HAVE_TE flags put back to False; (c)
    # any other non-Bridge module that grabbed the stand-in is reported as an error.
    have_te = True
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        have_te = False
    if not have_te:
        for mod in _TE_PROBING_MODULES:
            try:
                importlib.import_module(mod)
            except ImportError:
                pass  # e.g. modelopt not installed: then it cannot probe either
        before = set(sys.modules)
        stubs = {n: _te_stub(n) for n in ("transformer_engine", "transformer_engine.pytorch")}
        stubs["transformer_engine"].pytorch = stubs["transformer_engine.pytorch"]
        sys.modules.update(stubs)
        try:
            import megatron.bridge  # noqa: F401
            import megatron.bridge.training.model_load_save  # noqa: F401
        finally:
            for n in stubs:
                sys.modules.pop(n, None)
        stub_ids = {id(s) for s in stubs.values()}
        for n in sorted(set(sys.modules) - before):
            m = sys.modules[n]
            if m is None:
                continue
            for k, v in list(vars(m).items()):
                if k in ("HAVE_TE", "HAS_TE") and v is True:
                    if not n.startswith("megatron.bridge."):
                        raise RuntimeError(f"{n}.{k} was set by the TE stand-in")
                    setattr(m, k, False)
                if id(v) in stub_ids and not n.startswith("megatron.bridge."):
                    raise RuntimeError(f"{n}.{k} refers to the TE stand-in")

    import megatron.bridge
    from megatron.bridge.training import checkpointing, model_load_save

    if not torch.cuda.is_available():
        # Shim 4: the project's CPU shim for Megatron-Core (megatron_minitron/runtime/cpu_compat.py):
        # routes device="cuda" tensor factories and .cuda() to the CPU, makes torch.cuda.synchronize /
        # current_device / current_stream answer on CPU, and installs a CPU-forking RNG tracker as
        # Megatron's CUDA RNG tracker (needed by model_parallel_cuda_manual_seed and by
        # save_checkpoint's get_rng_state, which reads tracker states).
        from megatron_minitron.runtime import cpu_compat

        cpu_compat.apply()

        # Shim 5: Bridge's checkpointing.get_rng_state (called by save_checkpoint even with
        # save_rng=False; generate_state_dict then drops it) calls torch.cuda.get_rng_state(), which
        # raises on a CPU build of torch. Answer with the CPU generator's state (never written).
        torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()

    return types.SimpleNamespace(
        version=_bridge_version(),
        model_load_save=model_load_save,
        checkpointing=checkpointing,
        bridge=megatron.bridge,
    )


def _bridge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-bridge")
    except PackageNotFoundError:
        from megatron.bridge import package_info

        return package_info.__version__


def seed_megatron_rng(seed: int = 0) -> None:
    """Seed Megatron's model-parallel RNG tracker (cpu_compat's CPU tracker on a CPU machine).
    Bridge's temporary_distributed_context only does this when CUDA is available."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)


def forward_logits(model, tokens):
    """Logits [B, S, V_padded] float32 of an MCore GPTModel (eval, no grad) on tokens [B, S]:
    position_ids = arange, attention_mask None (the local DotProductAttention builds the causal
    mask itself)."""
    import torch

    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=position_ids, attention_mask=None)
    return logits.float().contiguous()
