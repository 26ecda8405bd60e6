"""Shared fixtures. Megatron runs in this pytest process for single-rank checks (one import, many
tests) and under real `torchrun` (gloo) for the distributed ones."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_minitron.runtime import cpu_compat

ROOT = Path(__file__).resolve().parents[1]

# Each pytest-xdist worker computes in its own process: at torch's default (a thread per core)
# two workers oversubscribe the cores and every in-process forward runs at half speed. One share
# of the cores each, as the commands the tests start get (OMP_NUM_THREADS=1).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# Megatron imported here as every command imports it (its torch.compile fusions off on a host
# without CUDA), so an in-process run and a subprocess run compute alike.
cpu_compat.import_megatron()


def run_cli(*args: str, nproc: int = 1, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`minitron ARGS` in a fresh process (under torchrun when nproc > 1), with extra `env`."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "megatron_minitron.cli", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_minitron.cli", *args]
    return _run(cmd, check, env)


def fails(capsys, args: list[str], *needles: str) -> str:
    """`minitron ARGS` in this process exits 2 with one stderr line holding every needle."""
    from megatron_minitron.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minitron "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def converted(src: Path, dst: Path) -> Path:
    """`minitron convert SRC DST` in this process (no import to pay again); returns DST."""
    from megatron_minitron.cli import main

    assert main(["convert", str(src), str(dst)]) == 0
    return dst


def torchrun_logits(ckpt: Path, tokens: torch.Tensor, tmp: Path, nproc: int,
                    *flags: str) -> torch.Tensor:
    """Logits from `tests/dist_worker.py` launched with torchrun at the given parallel flags."""
    return torchrun_logits_of([ckpt], tokens, tmp, nproc, *flags)[0]


def torchrun_logits_of(ckpts: list[Path], tokens: torch.Tensor, tmp: Path, nproc: int,
                       *flags: str) -> list[torch.Tensor]:
    """The logits of each checkpoint, all from one torchrun launch at the given parallel flags."""
    tok_file = tmp / "tokens.safetensors"
    outs = [tmp / f"logits{i}{'_'.join(flags)}.safetensors" for i in range(len(ckpts))]
    save_file({"tokens": tokens.contiguous()}, str(tok_file))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(ROOT / "tests" / "dist_worker.py"),
           "--load", *map(str, ckpts), "--tokens", str(tok_file), "--out", *map(str, outs),
           *flags]
    _run(cmd, True)
    return [load_file(str(out))["logits"] for out in outs]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every command a test starts: this checkout first on PYTHONPATH (kept
    after it: gpu_check.sh carries wheels there), the venv's tools first on PATH, one thread,
    and strict device mode, so on CPU a command fails where CUDA or NCCL would."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MINITRON_STRICT_DEVICE": "1", **extra}


def _run(cmd: list[str], check: bool, env: dict | None = None) -> subprocess.CompletedProcess:
    env = child_env(**(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


_PORTS_PER_WORKER = 3000
_used_ports: set[int] = set()


def _free_port() -> int:
    """A free port for a torchrun master. Chosen below the ephemeral range (32768+, which the
    ranks' own gloo connections draw from while torchrun is still starting) and from a range of
    its own per pytest-xdist worker, so two workers never hand out the same port."""
    import socket

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    # From 25000: the launcher tests' fake SLURM job owns 24242.
    base = 25000 + int(worker.removeprefix("gw") or 0) * _PORTS_PER_WORKER
    for port in range(base, base + _PORTS_PER_WORKER):
        if port in _used_ports:
            continue
        _used_ports.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {base}..{base + _PORTS_PER_WORKER}")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup` xdist renames a grouped test NAME@GROUP so that its group runs on
    one worker; a pytest xdist cannot rename in would silently undo the grouping."""
    if os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup"):
        lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and
                "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(f"xdist_group ignored ({lost[0]}): this pytest-xdist cannot "
                                    "group tests under this pytest; pip install 'pytest<9'")


@pytest.fixture(scope="session", autouse=True)
def nothing_outlives_the_suite():
    """Fails the suite if any process a test started is still alive at its end. The pytest
    process becomes a child subreaper, so even orphans of a SIGKILLed command (reparented to it
    instead of init) are seen."""
    import ctypes
    import time

    import psutil

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    yield
    deadline = time.time() + 15
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap exited orphans
                pass
        alive = [p for p in psutil.Process().children(recursive=True)
                 if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.time() > deadline:
            break
        time.sleep(0.5)
    described = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            described.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
            p.kill()
    assert not described, "processes outlived the tests: " + "; ".join(described)


def _asset(find) -> Path:
    """A model shipped as a PyPI package. `make setup` installs it, so its absence fails the
    suite, except on a lent GPU box, which gets only the wheels that fit the carry limit: there
    it skips."""
    from megatron_minitron.config import ConfigError

    try:
        return find()
    except ConfigError as e:
        if torch.cuda.is_available():
            pytest.skip(str(e))
        raise


def _scores(ckpt: Path, tmp_path_factory, *flags: str) -> Path:
    """A scores file of `ckpt` from the training plays, 128-token samples (`flags` add more)."""
    from megatron_minitron.cli import main

    out = tmp_path_factory.mktemp("scores") / "scores.safetensors"
    assert main(["importance", "--load", str(ckpt), "--seq-length", "128", "--micro-batch-size",
                 "4", *flags, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from megatron_minitron.data.demo import smollm2_gguf

    return _asset(smollm2_gguf)


@pytest.fixture(scope="session")
def smol_ckpt(smol_gguf, tmp_path_factory) -> Path:
    return converted(smol_gguf, tmp_path_factory.mktemp("smol") / "teacher")


@pytest.fixture(scope="session")
def smol_scores(smol_ckpt, tmp_path_factory) -> Path:
    """Importance of SmolLM2 on 32 x 128 training-play tokens; depth from 2 samples, blocks of 1
    and 6 layers; head-masking losses from 1 sample."""
    return _scores(smol_ckpt, tmp_path_factory, "--samples", "32", "--depth-samples", "2",
                   "--block-sizes", "1", "6", "--head-samples", "1")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M, joined from its PyPI chunk packages."""
    from megatron_minitron.data.demo import gemma3_gguf

    return _asset(gemma3_gguf)


@pytest.fixture(scope="session")
def gemma_ckpt(gemma_gguf, tmp_path_factory) -> Path:
    return converted(gemma_gguf, tmp_path_factory.mktemp("gemma") / "teacher")


@pytest.fixture(scope="session")
def gemma_scores(gemma_ckpt, tmp_path_factory) -> Path:
    """Importance of Gemma 3 270M on 16 x 128 training-play tokens (BOS first); depth from 1."""
    return _scores(gemma_ckpt, tmp_path_factory, "--samples", "16", "--depth-samples", "1")


@pytest.fixture(scope="session")
def smol_hf_model(smol_gguf):
    """Independent reference: transformers' own GGUF loader (dequantize + un-permute)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name,
                                             dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="session")
def shakespeare_tokens(smol_ckpt) -> torch.Tensor:
    """A real text batch [2, 96] from a held-out play (96 divisible by TP 2 and 3)."""
    from megatron_minitron.data.demo import held_out_plays
    from megatron_minitron.data.tokenizer import load_tokenizer

    ids = load_tokenizer(smol_ckpt).encode(held_out_plays()[0].read_text()[:6000])
    return torch.tensor(ids[: 2 * 96]).reshape(2, 96)


def tiny_hf_dir(path: Path, family: str = "llama", tie: bool = False, seed: int = 0,
                rope_scaling: float | None = None, **extra) -> Path:
    """A small random-weight HF model written by `transformers` itself (heads 4, groups 2).
    Mistral, Qwen3 and Gemma 3 get a head_dim that is not hidden / heads; Gemma 3 alternates
    sliding (8 tokens) and global layers; the MoE families route to 2 of 4 experts (Qwen2-MoE
    with a shared expert, unnormalised weights). `extra` overrides config fields."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:  # Llama-3.1 style
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": rope_scaling,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    rms = dict(rms_norm_eps=1e-5, rope_parameters=rope)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**common, **rms),
        "mistral": lambda: transformers.MistralConfig(**common, **rms, head_dim=24,
                                                      sliding_window=None),
        "qwen2": lambda: transformers.Qwen2Config(**common, **rms),
        "qwen3": lambda: transformers.Qwen3Config(**common, **rms, head_dim=24),
        "gemma3": lambda: transformers.Gemma3TextConfig(
            **common, rms_norm_eps=1e-6, head_dim=24, query_pre_attn_scalar=20, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2),
        "mixtral": lambda: transformers.MixtralConfig(**common, **rms, num_local_experts=4,
                                                      num_experts_per_tok=2),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **common, **rms, head_dim=24, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=48, norm_topk_prob=True),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
            **common, **rms, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
            shared_expert_intermediate_size=64, norm_topk_prob=False),
        "nemotron": lambda: transformers.NemotronConfig(**common, norm_eps=1e-5,
                                                        partial_rotary_factor=0.5,
                                                        hidden_act="relu2"),
    }[family]()
    for k, v in extra.items():
        setattr(cfg, k, v)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms so a mis-mapped norm cannot hide
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(path)
    return path


def tiny_tokenizer(path: Path) -> None:
    """A 128-token BPE trained on a Shakespeare play, so the tiny models read real text too."""
    from tokenizers import Tokenizer, models, trainers

    from megatron_minitron.data.demo import train_plays

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator([train_plays()[0].read_text()], trainers.BpeTrainer(
        vocab_size=128, special_tokens=["<unk>", "<eos>"], limit_alphabet=90,
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"eos_token_id": 1}')


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "llama_hf")


@pytest.fixture(scope="session")
def tiny_llama_ckpt(tiny_llama_hf, tmp_path_factory) -> Path:
    return converted(tiny_llama_hf, tmp_path_factory.mktemp("tiny") / "llama_mcore")


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (2, 32), generator=g)


def hf_logits(hf_dir_or_model, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = hf_dir_or_model
    if isinstance(m, Path):
        m = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(tokens).logits.float()


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_run_config(tmp: Path, source: Path, **override) -> dict:
    """A `minitron run` config for the tiny model: every stage, each at a test's budget."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    cfg = {"name": "tiny", "run_dir": str(tmp / "run"),
           "teacher": {"source": str(source)},
           "data": {"train": [str(train_plays()[1])], "valid": [str(held_out_plays()[0])]},
           "importance": {"samples": 8, "seq_length": 32, "depth_samples": 2},
           "prune": {"ffn": 64, "hidden": 48},
           "distill": {"train_iters": 6, "global_batch_size": 4, "seq_length": 32, "lr": 1e-3,
                       "eval_iters": 1, "save_interval": 2},
           "eval": {"seq_length": 64, "max_windows": 4, "limit": 4,
                    "tasks": ["perplexity", "shakespeare-next"]}}
    for section, values in override.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def load_in_process(ckpt: Path):
    """(ModelConfig, chunks) at TP=1 in this pytest process (Megatron imported once)."""
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import load_model

    _, meta, chunks = load_model(ckpt, ParallelConfig())
    return meta.model, chunks


def in_process_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_minitron.model.forward import logits

    return logits(load_in_process(ckpt)[1], tokens, micro_batch_size=tokens.shape[0])
