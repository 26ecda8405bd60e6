"""Import (HF -> Megatron) and export (Megatron -> HF) in 1 process vs 2: wall time, peak
memory per rank, and whether the 2-rank output equals the 1-rank one tensor for tensor.

    python benchmarks/convert.py [--models smollm2 llama1b] [--work DIR]

`smollm2` is SmolLM2-135M (from the shipped GGUF, exported to HF first, fp32; 2 ranks at PP=2);
`llama1b` is a random TinyLlama-shaped Llama (1.1B parameters, bf16, 2 ranks at TP=2) written by
transformers. Each rank records
its own peak resident memory above what it held after its imports (the libraries' share), as
anonymous memory (sampled every 2 ms) and as the kernel's total peak (VmHWM, which also counts
pages of the memory-mapped source file that the rank read). The goal per rank:
(model bytes / ranks) x 1.3 + the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(out: Path, argv: list[str]) -> int:
    """One rank: run `minitron ARGV`, then write this rank's memory record to OUT/rank{N}.json."""
    import megatron.core.dist_checkpointing  # noqa: F401  (the libraries' share: before the base)
    import megatron.core.models.gpt  # noqa: F401
    import safetensors.torch  # noqa: F401

    from megatron_minitron.cli import main

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base_total, base_anon = _status("VmRSS"), _status("RssAnon")
    peak_anon, stop = [base_anon], threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = main(argv)
    stop.set()
    t.join()
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "anon": peak_anon[0] - base_anon, "total": _status("VmHWM") - base_total}))
    return rc


def launch(nproc: int, records: Path, *argv: str) -> tuple[float, list[dict]]:
    shutil.rmtree(records, ignore_errors=True)
    records.mkdir(parents=True)
    me = [str(Path(__file__).resolve()), "--worker", str(records), "--"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *me]
           if nproc > 1 else [sys.executable, *me])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    t = time.perf_counter()
    r = subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stderr[-3000:]}")
    return wall, [json.loads(p.read_text()) for p in sorted(records.glob("rank*.json"))]


def hf_sizes(hf: Path) -> tuple[int, int]:
    """(total bytes, largest tensor bytes) of a HF directory's weights, from the headers."""
    from safetensors import safe_open

    sizes = []
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                n = 1
                for d in s.get_shape():
                    n *= d
                sizes.append(n * {"F32": 4, "BF16": 2, "F16": 2}[s.get_dtype()])
    return sum(sizes), max(sizes)


def same_checkpoints(a: Path, b: Path) -> bool:
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import load_model

    def weights(ckpt):
        _, _, chunks = load_model(ckpt, ParallelConfig(), keep_dtype=True)
        return {k: v for k, v in chunks[0].state_dict().items() if "_extra_state" not in k}

    first = weights(a)
    second = weights(b)
    return first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)


def same_hf(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            st = safe_open(str(f), framework="pt")
            out.update({k: (st, k) for k in st.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(
        ta[k][0].get_tensor(k).equal(tb[k][0].get_tensor(k)) for k in ta)


def smollm2_hf(work: Path) -> Path:
    from benchmarks.common import teacher_checkpoint
    from megatron_minitron.cli import main

    ckpt = teacher_checkpoint(None)
    assert main(["convert", str(ckpt), str(work / "smollm2_hf"), "--to", "hf"]) == 0
    return work / "smollm2_hf"


def llama1b_hf(work: Path) -> Path:
    import torch
    import transformers

    from tests.conftest import tiny_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=22, num_attention_heads=32,
                                   num_key_value_heads=4, max_position_embeddings=2048,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(work / "llama1b_hf", safe_serialization=True)
    tiny_tokenizer(work / "llama1b_hf")
    return work / "llama1b_hf"


# SmolLM2's 9 heads in 3 groups do not split over 2 TP ranks.
LAYOUT = {"smollm2": ["--pp", "2"], "llama1b": ["--tp", "2"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["smollm2", "llama1b"],
                   choices=["smollm2", "llama1b"])
    p.add_argument("--work", type=Path)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.worker:
        sys.exit(worker(a.worker, rest[1:] if rest[:1] == ["--"] else rest))
    from megatron_minitron.cli import _quiet_third_party

    _quiet_third_party()
    work = a.work or Path(tempfile.mkdtemp())
    rows = []
    for name in a.models:
        hf = {"smollm2": smollm2_hf, "llama1b": llama1b_hf}[name](work)
        split = LAYOUT[name]
        model, largest = hf_sizes(hf)
        print(f"{name}: {model / 2**20:.0f} MiB of weights, largest tensor "
              f"{largest / 2**20:.0f} MiB", flush=True)
        ckpt = {}
        for n in (1, 2):
            ckpt[n] = work / f"{name}_ckpt{n}"
            wall, rec = launch(n, work / "records", "convert", str(hf), str(ckpt[n]),
                               *(split if n > 1 else []))
            rows.append((name, "import", n, wall, rec, model, largest))
        same_import = same_checkpoints(ckpt[1], ckpt[2])
        out = {}
        for n in (1, 2):
            out[n] = work / f"{name}_hf{n}"
            wall, rec = launch(n, work / "records", "convert", str(ckpt[1]), str(out[n]),
                               "--to", "hf", *(split if n > 1 else []))
            rows.append((name, "export", n, wall, rec, model, largest))
        same_export = same_hf(out[1], out[2])
        print(f"{name}: 2-rank import == 1-rank: {same_import}; 2-rank export == 1-rank: "
              f"{same_export}", flush=True)
        for d in (*ckpt.values(), *out.values(), hf):
            shutil.rmtree(d, ignore_errors=True)
    print(f"{'model':8} {'step':6} {'ranks':>5} {'wall s':>7} {'anon MiB':>9} {'total MiB':>9} "
          f"{'goal MiB':>8}  ok")
    for name, step, n, wall, rec, model, largest in rows:
        anon, total = (max(r[k] for r in rec) for k in ("anon", "total"))
        goal = model / n * 1.3 + largest
        print(f"{name:8} {step:6} {n:5d} {wall:7.1f} {anon / 2**20:9.0f} {total / 2**20:9.0f} "
              f"{goal / 2**20:8.0f}  {'yes' if anon <= goal else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
