"""On a GPU (TE spec where Transformer Engine is installed): parity with transformers in fp32 and
bf16, importance equal to the CPU's, and every verb end to end in bf16 (the GPU default). Skipped
without CUDA; `scripts/gpu_check.sh` runs this module on a lent GPU."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT, child_env, hf_logits, run_cli, tiny_hf_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpu_logits(ckpt, tokens, precision):
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import load_model, te_available
    from megatron_minitron.model.forward import logits

    _, _, chunks = load_model(ckpt, ParallelConfig(precision=precision))
    print(f"spec: {'transformer_engine' if te_available() else 'local'}, {precision}")
    return logits(chunks, tokens, micro_batch_size=tokens.shape[0]).float().cpu()


@pytest.mark.parametrize("family", ["llama", "nemotron", "mistral", "qwen2", "qwen3", "gemma3",
                                    "mixtral", "qwen3_moe", "qwen2_moe"])
def test_gpu_logits_match_transformers(family, tmp_path):
    """Every family through the TE spec (Qwen3's q/k norms, Gemma's post-norms and sliding
    window in TE's attention; the MoE families' routers, experts and shared expert) against
    transformers."""
    hf = tiny_hf_dir(tmp_path / "hf", family, seed=3)
    ckpt = tmp_path / "mcore"
    run_cli("convert", str(hf), str(ckpt))
    tokens = torch.randint(0, 128, (2, 64))
    ref = hf_logits(hf, tokens)
    fp32 = _gpu_logits(ckpt, tokens, "fp32")
    assert (fp32 - ref).abs().max() <= 1e-3  # TF32 matmuls allowed
    bf16 = _gpu_logits(ckpt, tokens, "bf16")
    rel = (bf16 - ref).abs().mean() / ref.abs().mean()
    print(f"{family}: fp32 max diff {(fp32 - ref).abs().max():.2e}, bf16 mean rel {rel:.2e}")
    assert rel < 0.03


def test_gpu_nemotron_h_logits_match_transformers(tmp_path):
    """A hybrid model on the GPU: Megatron's MambaMixer with mamba_ssm's kernels where they are
    installed, else the PyTorch scan of runtime/mamba_cpu.py on CUDA tensors (printed)."""
    from tests.test_mamba import tiny_nemotron_h

    hf = tiny_nemotron_h(tmp_path / "hf")
    ckpt = tmp_path / "mcore"
    run_cli("convert", str(hf), str(ckpt))
    tokens = torch.randint(0, 128, (2, 64))
    ref = hf_logits(hf, tokens)
    fp32 = _gpu_logits(ckpt, tokens, "fp32")
    from megatron.core.ssm import mamba_mixer  # imported by the build, after runtime.mamba_cpu

    kernels = "PyTorch scan" if getattr(mamba_mixer, "_minitron_cpu", False) else "mamba_ssm"
    print(f"nemotron_h ({kernels}): fp32 max diff {(fp32 - ref).abs().max():.2e}")
    assert (fp32 - ref).abs().max() <= 1e-3  # TF32 matmuls allowed
    bf16 = _gpu_logits(ckpt, tokens, "bf16")
    assert (bf16 - ref).abs().mean() / ref.abs().mean() < 0.03


def test_gpu_smollm2_parity(smol_ckpt, smol_hf_model, shakespeare_tokens):
    ref = hf_logits(smol_hf_model, shakespeare_tokens)
    ours = _gpu_logits(smol_ckpt, shakespeare_tokens, "fp32")
    diff = (ours - ref).abs().max().item()
    print(f"SmolLM2 on GPU vs transformers (CPU fp32): max |dlogit| = {diff:.2e}")
    assert diff <= 5e-2
    bf16 = _gpu_logits(smol_ckpt, shakespeare_tokens, "bf16")
    agree = (bf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"SmolLM2 bf16 top-1 agreement with fp32 reference: {agree:.3f}")
    assert agree > 0.9


def test_gpu_importance_matches_cpu(tiny_llama_ckpt, tmp_path):
    """TE fuses the norms into linear_qkv / linear_fc1: the recomputed norm outputs must give the
    scores the local spec gives on CPU (head masking on TE's linear_proj too)."""
    from megatron_minitron.data.demo import train_plays
    from megatron_minitron.importance import load_scores

    args = ["importance", "--load", str(tiny_llama_ckpt), "--data", str(train_plays()[1]),
            "--samples", "8", "--seq-length", "64", "--depth-samples", "4", "--head-samples", "2",
            "--fp32"]
    run_cli(*args, "--out", str(tmp_path / "gpu.safetensors"), env={"NVIDIA_TF32_OVERRIDE": "0"})
    run_cli(*args, "--out", str(tmp_path / "cpu.safetensors"), env={"CUDA_VISIBLE_DEVICES": ""})
    gpu, cpu = (load_scores(tmp_path / f"{n}.safetensors") for n in ("gpu", "cpu"))
    for k, v in cpu.tensors.items():
        rel = ((gpu.tensors[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
        print(f"importance {k}: GPU vs CPU max rel diff {rel:.2e}")
        assert rel < 1e-3, k


def test_every_verb_end_to_end_in_bf16(tiny_llama_hf, tmp_path):
    """convert, importance, prune, preprocess, distill (5 steps), eval, search (2 candidates) and
    `run`, each a real process on the GPU at its default precision (bf16)."""
    from megatron_minitron.checkpoint import mcore
    from megatron_minitron.data.demo import held_out_plays, train_plays

    ckpt, scores, student = tmp_path / "teacher", tmp_path / "s.safetensors", tmp_path / "student"
    run_cli("convert", str(tiny_llama_hf), str(ckpt))
    run_cli("importance", "--load", str(ckpt), "--data", str(train_plays()[1]), "--samples", "8",
            "--seq-length", "64", "--depth-samples", "2", "--out", str(scores))
    run_cli("prune", "--load", str(ckpt), "--scores", str(scores), "--out", str(student),
            "--target-ffn", "64", "--strategy", "auto")
    for name, play in (("train", train_plays()[1]), ("valid", held_out_plays()[0])):
        run_cli("preprocess", "--input", str(play), "--tokenizer", str(ckpt), "--output-prefix",
                str(tmp_path / name))
    data = ["--data", str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid")]
    run_cli("distill", "--teacher", str(ckpt), "--student", str(student), *data, "--save",
            str(tmp_path / "kd"), "--train-iters", "5", "--global-batch-size", "4",
            "--seq-length", "64", "--lr", "1e-3", "--eval-iters", "1")
    out = tmp_path / "kd" / (tmp_path / "kd" / "latest").read_text().strip()
    assert mcore.read_meta(out).params_dtype == "bfloat16"
    rows = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").open()]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5], rows
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r), rows
    ppl = run_cli("eval", "--load", str(out), "--seq-length", "64", "--max-windows", "8").stdout
    assert "perplexity" in ppl
    run_cli("search", "--load", str(ckpt), "--scores", str(scores), "--target-params", "100000",
            "--tolerance", "0.1", "--candidates", "2", "--kd-tokens", "1024", *data,
            "--seq-length", "64", "--global-batch-size", "4", "--step", "16", "--out",
            str(tmp_path / "search"))
    assert (tmp_path / "search" / "results.json").is_file()
    cfg = {"name": "gpu", "run_dir": str(tmp_path / "run"), "teacher": {"source": str(ckpt)},
           "data": {"train": [str(train_plays()[1])], "valid": [str(held_out_plays()[0])]},
           "importance": {"samples": 8, "seq_length": 64, "depth_samples": 0},
           "prune": {"ffn": 64},
           "distill": {"train_iters": 5, "global_batch_size": 4, "seq_length": 64,
                       "eval_iters": 1},
           "eval": {"seq_length": 64, "max_windows": 4, "tasks": ["perplexity"]},
           "export": {"hf": True}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("run", str(tmp_path / "run.yaml"))
    assert (tmp_path / "run" / "report.json").is_file()


def test_gpu_moe_prune_and_distill_in_bf16(tmp_path):
    """Qwen2-MoE on the GPU: importance, experts, expert and shared-expert width pruned, then KD
    steps in bf16 with the load-balancing loss logged."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    ckpt, scores, student = tmp_path / "teacher", tmp_path / "s.safetensors", tmp_path / "student"
    run_cli("convert", str(tiny_hf_dir(tmp_path / "hf", "qwen2_moe", seed=3)), str(ckpt))
    run_cli("importance", "--load", str(ckpt), "--data", str(train_plays()[1]), "--samples", "8",
            "--seq-length", "64", "--depth-samples", "0", "--out", str(scores))
    run_cli("prune", "--load", str(ckpt), "--scores", str(scores), "--out", str(student),
            "--target-experts", "3", "--target-moe-ffn", "32", "--target-shared-ffn", "32")
    for name, play in (("train", train_plays()[1]), ("valid", held_out_plays()[0])):
        run_cli("preprocess", "--input", str(play), "--tokenizer", str(ckpt), "--output-prefix",
                str(tmp_path / name))
    run_cli("distill", "--teacher", str(ckpt), "--student", str(student), "--data",
            str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid"), "--save",
            str(tmp_path / "kd"), "--train-iters", "3", "--global-batch-size", "4",
            "--seq-length", "64", "--lr", "1e-3", "--eval-iters", "1", "--moe-aux-loss-coeff",
            "0.01")
    rows = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(r["router"] > 0 for r in steps), rows
    assert all(torch.isfinite(torch.tensor([r["loss"], r["router"]])).all() for r in steps)


def test_gpu_te_and_cpu_moe_checkpoints_interchange_and_the_distributed_optimizer_resumes(
        tmp_path):
    """A Mixtral converted on the CPU (local spec) evaluates on the GPU (TE spec: its pre-MLP norm
    is a TENorm of its own) as on the CPU; KD with Megatron's distributed optimizer saves, resumes
    for one more step, and its GPU-written checkpoint evaluates on the CPU."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    ckpt, valid = tmp_path / "teacher", held_out_plays()[0]
    run_cli("convert", str(tiny_hf_dir(tmp_path / "hf", "mixtral", seed=3)), str(ckpt), env=cpu)

    def loss(path, env=None):
        out = run_cli("eval", "--load", str(path), "--data", str(valid), "--seq-length", "64",
                      "--max-windows", "4", "--fp32", env={"NVIDIA_TF32_OVERRIDE": "0",
                                                           **(env or {})}).stdout
        return float(out.split("loss ")[1].split()[0])

    on_cpu, on_gpu = loss(ckpt, cpu), loss(ckpt)
    print(f"CPU-written Mixtral: loss {on_cpu:.6f} on the CPU, {on_gpu:.6f} on the GPU")
    assert abs(on_cpu - on_gpu) < 1e-3
    for name, play in (("train", train_plays()[1]), ("valid", valid)):
        run_cli("preprocess", "--input", str(play), "--tokenizer", str(ckpt), "--output-prefix",
                str(tmp_path / name))
    kd = ["distill", "--teacher", str(ckpt), "--student", str(ckpt), "--data",
          str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid"), "--save",
          str(tmp_path / "kd"), "--global-batch-size", "4", "--seq-length", "64", "--lr", "1e-3",
          "--eval-iters", "1", "--save-interval", "1", "--use-distributed-optimizer",
          "--train-iters", "3"]
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_worker.py"), *kd],
                            env=child_env(KILL_AT="renamed:kd/latest:2"),
                            start_new_session=True, capture_output=True, timeout=600)
    assert killed.returncode != 0 and (tmp_path / "kd" / "latest").read_text() == "iter_0000002"
    run_cli(*kd)  # resumes from iteration 2
    rows = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").open()]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3], rows
    out = tmp_path / "kd" / "iter_0000003"
    print(f"GPU-written student: loss {loss(out, cpu):.6f} on the CPU")


def test_gpu_heterogeneous_student_with_a_latency_budget(tiny_llama_hf, tmp_path):
    """prune --heterogeneous on the GPU (TE spec, bf16): the latency table is timed with CUDA
    synchronised around every block, the budgets hold, and the student's bf16 GPU logits are its
    fp32 CPU-equal ones within bf16's error; then 3 KD steps run on it."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    ckpt, scores, student = tmp_path / "teacher", tmp_path / "s.safetensors", tmp_path / "het"
    run_cli("convert", str(tiny_llama_hf), str(ckpt))
    run_cli("importance", "--load", str(ckpt), "--data", str(train_plays()[1]), "--samples", "8",
            "--seq-length", "64", "--depth-samples", "0", "--out", str(scores))
    run_cli("prune", "--load", str(ckpt), "--scores", str(scores), "--out", str(student),
            "--heterogeneous", "--target-params", "0.8", "--target-latency", "1e6",
            "--json", str(tmp_path / "het.json"))
    het = json.loads((tmp_path / "het.json").read_text())["heterogeneous"]
    print("latency table (ms):", het["latency_ms"], "choice:", het["choice"])
    assert all(v > 0 for v in het["latency_ms"].values())
    assert all(het["totals"][k] <= het["budgets"][k] for k in het["budgets"])
    tokens = torch.randint(0, 128, (2, 64))
    fp32, bf16 = _gpu_logits(student, tokens, "fp32"), _gpu_logits(student, tokens, "bf16")
    assert (bf16 - fp32).abs().mean() / fp32.abs().mean() < 0.03
    run_cli("preprocess", "--input", str(held_out_plays()[0]), "--tokenizer", str(ckpt),
            "--output-prefix", str(tmp_path / "train"))
    run_cli("distill", "--teacher", str(ckpt), "--student", str(student), "--data",
            str(tmp_path / "train"), "--save", str(tmp_path / "kd"), "--train-iters", "3",
            "--global-batch-size", "4", "--seq-length", "64", "--eval-iters", "0")
