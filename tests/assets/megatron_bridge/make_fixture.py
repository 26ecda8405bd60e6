"""Write a real Megatron-Bridge checkpoint of a tiny Llama-like GPT with Megatron-Bridge's own code.

    PYTHONPATH=/tmp/mbridge:/work/main /work/main/.venv/bin/python \
        tests/assets/megatron_bridge/make_fixture.py --out tests/assets/megatron_bridge/llama_tiny

(/tmp/mbridge: `pip install --no-deps --target /tmp/mbridge megatron-bridge==0.3.1 einops`.)

Builds a GPTModelProvider (the provider class Bridge 0.3.1's LlamaBridge produces for HF Llama
models) with the local (non-TE) layer spec, builds the model with provide_distributed_model inside
Bridge's temporary_distributed_context (gloo, world size 1), perturbs the RMSNorm weights, saves it
with Bridge's save_megatron_model (model only: no optimizer, no RNG), and writes
<out>/reference.safetensors (tokens [2,16] int64, logits [2,16,V_padded] float32, batch-first) and
<out>/SOURCE.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bridge_cpu  # noqa: E402

VOCAB = 250
BATCH, SEQ = 2, 16


def build_provider():
    import torch
    from megatron.bridge.models.gpt_provider import GPTModelProvider, local_layer_spec
    from megatron.core.transformer.enums import AttnBackend

    return GPTModelProvider(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        share_embeddings_and_output_weights=False,
        vocab_size=VOCAB,
        should_pad_vocab=True,  # pad with Bridge's calculate_padded_vocab_size: 250 -> 256
        make_vocab_size_divisible_by=128,
        seq_length=32,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        # Local (non-TE) layer spec: Bridge's own wrapper around MCore get_gpt_layer_local_spec.
        transformer_layer_spec=local_layer_spec,
        attention_backend=AttnBackend.local,
        transformer_impl="local",
        # Fused kernels need CUDA/TE/apex (or torch.compile); plain PyTorch paths on CPU.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )


def describe_checkpoint(root: Path) -> str:
    """Tracker files, common.pt keys and DCP keys/shapes of what save_megatron_model wrote."""
    import torch
    import torch.distributed.checkpoint as dcp

    lines = [f"- `latest_checkpointed_iteration.txt`: `{(root / 'latest_checkpointed_iteration.txt').read_text()}`"]
    ts = torch.load(root / "latest_train_state.pt", weights_only=True)
    lines.append("- `latest_train_state.pt` (= `iter_0000000/train_state.pt`): "
                 + ", ".join(f"{k} {str(v.dtype).replace('torch.', '')} {v.item()}" for k, v in ts.items()))
    it = root / "iter_0000000"
    lines.append(f"- `iter_0000000/metadata.json`: `{(it / 'metadata.json').read_text().strip()}`")
    if (it / "common.pt").exists():
        common = torch.load(it / "common.pt", weights_only=True)
        lines.append(f"- `iter_0000000/common.pt`: {common!r}")
    md = dcp.FileSystemReader(str(it)).read_metadata().state_dict_metadata
    lines.append("- DCP keys (`.metadata`):")
    for k, v in md.items():
        shape = f" {list(v.size)} {str(v.properties.dtype).replace('torch.', '')}" if hasattr(v, "size") else " (bytes)"
        lines.append(f"  - `{k}`{shape}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()

    mb = _bridge_cpu.setup()
    import torch
    from safetensors.torch import save_file

    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    mls = mb.model_load_save
    with mls.temporary_distributed_context(backend="gloo"):  # Bridge's own: gloo, world 1, MPU
        _bridge_cpu.seed_megatron_rng(0)
        provider = build_provider()
        provider.finalize()  # Bridge providers defer MCore TransformerConfig.__post_init__
        torch.manual_seed(0)
        model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
        assert len(model) == 1
        gpt = model[0]

        # Make the RMSNorm weights matter: 1 + 0.1 * randn (seeded).
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                if name.endswith("layer_norm_weight") or name.endswith("layernorm.weight") \
                        or name.endswith("final_layernorm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        norm_names = [n for n, _ in gpt.named_parameters() if "norm" in n]

        # save_megatron_model's `path` is the checkpoint root (tracker files + iter_0000000/); it is
        # recorded verbatim as checkpoint.save in run_config.yaml, so pass it as given (relative).
        mls.save_megatron_model(model, str(args.out), ckpt_format="torch_dist")

        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        logits = _bridge_cpu.forward_logits(gpt, tokens)
        param_names = [n for n, _ in gpt.named_parameters()]
        padded = gpt.embedding.word_embeddings.weight.shape[0]

    save_file({"tokens": tokens.to(torch.int64).contiguous(), "logits": logits},
              str(out / "reference.safetensors"))

    contents = describe_checkpoint(out)

    cmd = ("PYTHONPATH=/tmp/mbridge:/work/main /work/main/.venv/bin/python "
           "tests/assets/megatron_bridge/make_fixture.py --out tests/assets/megatron_bridge/llama_tiny")
    import megatron.core

    (out / "SOURCE.md").write_text(f"""# Megatron-Bridge checkpoint fixture: tiny Llama-like GPT

Written by Megatron-Bridge's own code (`megatron.bridge.training.model_load_save.save_megatron_model`,
i.e. `checkpointing.save_checkpoint` at step 0 with `save_optim=False, save_rng=False`,
`ckpt_format=torch_dist`) on CPU (gloo, world size 1), not by this project.

- megatron-bridge: {mb.version} (PyPI wheel, installed with `pip install --no-deps --target /tmp/mbridge megatron-bridge=={mb.version} einops`)
- megatron-core: {megatron.core.__version__}; torch: {torch.__version__}
- command (from the repository root):

      {cmd}

- CPU shims (see `_bridge_cpu.py`): Triton-free stand-in for MCore's Mamba tensor_ops, a TensorBoard-free
  `torch.utils.tensorboard.writer` stand-in, a transformer_engine stand-in present only while `megatron.bridge`
  is imported (its LoRA modules import TE unconditionally), the project's `cpu_compat.apply()`, and
  `torch.cuda.get_rng_state` answered from the CPU generator (RNG state is not saved).

## Model
`megatron.bridge.models.gpt_provider.GPTModelProvider` (what Bridge 0.3.1's LlamaBridge builds for HF Llama):
num_layers 2, hidden_size 64, ffn_hidden_size 128, num_attention_heads 4, num_query_groups 2, kv_channels 16,
RMSNorm (layernorm_epsilon 1e-5), SwiGLU (gated_linear_unit, activation_func torch.nn.functional.silu),
add_bias_linear False, rope (rotary_base 10000), untied embeddings, vocab_size {VOCAB} with should_pad_vocab True and
make_vocab_size_divisible_by 128 (padded {padded}), seq_length 32, params_dtype float32,
transformer_layer_spec `megatron.bridge.models.gpt_provider.local_layer_spec` (MCore local spec, no TE),
attention_backend local, fusions off. Weights: MCore init after `torch.manual_seed(0)`; every RMSNorm weight
then set to `1 + 0.1 * randn` (generator seeded 1): {", ".join(norm_names)}.

## Files
- `latest_checkpointed_iteration.txt`, `latest_train_state.pt`, `iter_0000000/` (`run_config.yaml`,
  `train_state.pt`, `metadata.json`, `.metadata`, `__0_*.distcp`, `common.pt` with megatron-core <= 0.18).
- `reference.safetensors`: `tokens` [{BATCH},{SEQ}] int64 (`torch.randint(0, {VOCAB}, ({BATCH}, {SEQ}), generator seeded 0)`) and
  `logits` [{BATCH},{SEQ},{padded}] float32 (batch-first) of the saved model, eval, no grad, position_ids = arange,
  attention_mask None (causal mask built by the local DotProductAttention).

Check: `PYTHONPATH=/tmp/mbridge:/work/main /work/main/.venv/bin/python tests/assets/megatron_bridge/load_check.py
tests/assets/megatron_bridge/llama_tiny` loads it with Bridge's `load_megatron_model` and compares logits.

## Checkpoint contents (read back after the save)
{contents}

In-memory parameter names: {json.dumps(param_names)}
""")
    print(f"wrote {out}; logits {tuple(logits.shape)}; padded vocab {padded}")


if __name__ == "__main__":
    main()
