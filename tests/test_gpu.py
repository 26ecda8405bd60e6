"""GPU parity (TE spec where Transformer Engine is installed, bf16). Skipped without CUDA.
`scripts/gpu_check.sh` runs this module on a lent GPU."""

import pytest
import torch

from tests.conftest import hf_logits, run_cli, tiny_hf_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpu_logits(ckpt, tokens, dtype):
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import build_model, te_available
    from megatron_minitron.model.forward import logits
    from megatron_minitron.runtime import init_runtime

    meta = mcore.read_meta(ckpt)
    rt = init_runtime(ParallelConfig())
    chunks = build_model(meta.model, rt.parallel)
    mcore.load_checkpoint(chunks, ckpt)
    chunks = [c.to(dtype) for c in chunks]
    print(f"spec: {'transformer_engine' if te_available() else 'local'}, dtype {dtype}")
    return logits(chunks, tokens.cuda(), micro_batch_size=tokens.shape[0]).float().cpu()


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_gpu_logits_match_transformers(family, tmp_path):
    hf = tiny_hf_dir(tmp_path / "hf", family, seed=3)
    ckpt = tmp_path / "mcore"
    run_cli("convert", str(hf), str(ckpt))
    tokens = torch.randint(0, 128, (2, 64))
    ref = hf_logits(hf, tokens)
    fp32 = _gpu_logits(ckpt, tokens, torch.float32)
    assert (fp32 - ref).abs().max() <= 1e-3  # TF32 matmuls allowed
    bf16 = _gpu_logits(ckpt, tokens, torch.bfloat16)
    rel = (bf16 - ref).abs().mean() / ref.abs().mean()
    print(f"{family}: fp32 max diff {(fp32 - ref).abs().max():.2e}, bf16 mean rel {rel:.2e}")
    assert rel < 0.03


def test_gpu_smollm2_parity(smol_ckpt, smol_hf_model, shakespeare_tokens):
    ref = hf_logits(smol_hf_model, shakespeare_tokens)
    ours = _gpu_logits(smol_ckpt, shakespeare_tokens, torch.float32)
    diff = (ours - ref).abs().max().item()
    print(f"SmolLM2 on GPU vs transformers (CPU fp32): max |dlogit| = {diff:.2e}")
    assert diff <= 5e-2
    bf16 = _gpu_logits(smol_ckpt, shakespeare_tokens, torch.bfloat16)
    agree = (bf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"SmolLM2 bf16 top-1 agreement with fp32 reference: {agree:.3f}")
    assert agree > 0.9


def test_gpu_importance_matches_cpu(tiny_llama_ckpt, tmp_path):
    """TE fuses the norms into linear_qkv / linear_fc1: the recomputed norm outputs must give the
    scores the local spec gives on CPU."""
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.importance import load_scores

    args = ["importance", "--load", str(tiny_llama_ckpt), "--data", str(train_plays()[1]),
            "--samples", "8", "--seq-length", "64", "--depth-samples", "4"]
    run_cli(*args, "--out", str(tmp_path / "gpu.safetensors"), env={"NVIDIA_TF32_OVERRIDE": "0"})
    run_cli(*args, "--out", str(tmp_path / "cpu.safetensors"), env={"CUDA_VISIBLE_DEVICES": ""})
    gpu, cpu = (load_scores(tmp_path / f"{n}.safetensors") for n in ("gpu", "cpu"))
    for k, v in cpu.tensors.items():
        rel = ((gpu.tensors[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
        print(f"importance {k}: GPU vs CPU max rel diff {rel:.2e}")
        assert rel < 1e-3, k
