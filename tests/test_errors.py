"""Bad input: one clear line naming the problem, exit code 2, nothing left at the destination."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_minitron.cli import main
from tests.conftest import fails, load_in_process, run_cli


def _nothing_at(dst):
    assert not dst.exists()
    assert not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())


def test_missing_source(capsys, tmp_path):
    fails(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "dst")], "does not exist")
    _nothing_at(tmp_path / "dst")


def test_truncated_safetensors(capsys, tiny_llama_hf, tmp_path):
    bad = tmp_path / "bad_hf"
    shutil.copytree(tiny_llama_hf, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails(capsys, ["convert", str(bad), str(tmp_path / "dst")], "model.safetensors")
    _nothing_at(tmp_path / "dst")


def test_truncated_gguf(capsys, smol_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smol_gguf, "rb") as src:
        bad.write_bytes(src.read(smol_gguf.stat().st_size // 3))
    fails(capsys, ["convert", str(bad), str(tmp_path / "dst")], "cut.gguf")
    _nothing_at(tmp_path / "dst")


def test_unsupported_architecture(capsys, tiny_llama_hf, tmp_path):
    bad = tmp_path / "mistral"
    shutil.copytree(tiny_llama_hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    fails(capsys, ["convert", str(bad), str(tmp_path / "dst")], "DeepseekV3ForCausalLM",
           "Qwen3ForCausalLM")  # the supported list
    _nothing_at(tmp_path / "dst")
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["MixtralForCausalLM"]}))
    fails(capsys, ["convert", str(bad), str(tmp_path / "dst")], "num_local_experts",
          "num_experts_per_tok")  # a dense config under an MoE architecture
    _nothing_at(tmp_path / "dst")
    # fields that would change the network are refused, not dropped
    for field, value in (("attention_bias", True), ("mlp_bias", True),
                         ("final_logit_softcapping", 30.0), ("use_sliding_window", True),
                         ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}),
                         ("hidden_act", "gelu")):
        (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"],
                                                     field: value}))
        fails(capsys, ["convert", str(bad), str(tmp_path / "dst")], field.split("_")[0])
        _nothing_at(tmp_path / "dst")


@pytest.mark.parametrize("tp,what", [("3", "num_attention_heads=4"), ("4", "num_query_groups=2")])
def test_tp_must_divide_heads_and_groups(capsys, tiny_llama_hf, tmp_path, tp, what):
    fails(capsys, ["convert", str(tiny_llama_hf), str(tmp_path / "dst"), "--tp", tp], what)
    _nothing_at(tmp_path / "dst")


def test_non_empty_destination_is_left_alone(capsys, tiny_llama_hf, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    fails(capsys, ["convert", str(tiny_llama_hf), str(dst)], "not empty")
    assert [p.name for p in dst.iterdir()] == ["precious.txt"]


def test_nan_weights_are_refused(capsys, tiny_llama_hf, tmp_path):
    bad = tmp_path / "nan_hf"
    shutil.copytree(tiny_llama_hf, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"))
    fails(capsys, ["convert", str(bad), str(tmp_path / "dst")], "NaN", "down_proj")
    _nothing_at(tmp_path / "dst")


def test_shape_mismatch_is_named(capsys, tiny_llama_hf, tmp_path):
    bad = tmp_path / "shape_hf"
    shutil.copytree(tiny_llama_hf, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(sd, str(bad / "model.safetensors"))
    fails(capsys, ["convert", str(bad), str(tmp_path / "dst")], "up_proj", "shape")


def test_eval_of_missing_checkpoint(capsys, tmp_path):
    fails(capsys, ["eval", "--load", str(tmp_path / "none")], "does not exist")


def test_real_process_exit_code(tmp_path):
    r = run_cli("convert", str(tmp_path / "missing.gguf"), str(tmp_path / "dst"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr


# --- importance ---------------------------------------------------------------------------------

def _importance(ckpt, data, out, *extra):
    return ["importance", "--load", str(ckpt), "--data", *map(str, data), "--samples", "4",
            "--seq-length", "16", "--depth-samples", "0", "--out", str(out), *extra]


def _indexed(prefix, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(f"{prefix}.bin")
    for d in docs:
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(f"{prefix}.idx")
    return prefix


def test_importance_bad_data(capsys, tiny_llama_ckpt, tmp_path):
    out = tmp_path / "s.safetensors"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails(capsys, _importance(tiny_llama_ckpt, [empty], out), "holds no text")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.")
    fails(capsys, _importance(tiny_llama_ckpt, [short], out), "fewer than 4 samples x 16")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    fails(capsys, _importance(tiny_llama_ckpt, [bad], out), f"{bad}:2", "malformed JSON")
    foreign = _indexed(tmp_path / "foreign", [[1, 2, 3, 500] * 40])
    fails(capsys, _importance(tiny_llama_ckpt, [foreign], out), "token id 500",
           "another tokenizer")
    fails(capsys, _importance(tiny_llama_ckpt, [tmp_path / "nope.txt"], out), "not found")
    fails(capsys, _importance(tiny_llama_ckpt, [short], out, "--block-sizes", "4"),
           "block size 4")
    assert not out.exists() and not any(p.name.startswith(".s.") for p in tmp_path.iterdir())


def test_importance_foreign_tokenizer_and_existing_output(capsys, tiny_llama_ckpt, smol_ckpt,
                                                          tmp_path):
    from megatron_minitron.data.demo import held_out_plays

    wrong = tmp_path / "wrong_tokenizer"
    shutil.copytree(tiny_llama_ckpt, wrong)
    shutil.rmtree(wrong / "tokenizer")
    shutil.copytree(smol_ckpt / "tokenizer", wrong / "tokenizer")
    out = tmp_path / "s.safetensors"
    fails(capsys, _importance(wrong, held_out_plays(), out), "49152 tokens",
           "not this checkpoint's tokenizer")
    out.write_text("keep me")
    fails(capsys, _importance(tiny_llama_ckpt, held_out_plays(), out), "exists")
    assert out.read_text() == "keep me"


def test_importance_unknown_aggregation(capsys, tiny_llama_ckpt, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(_importance(tiny_llama_ckpt, [tmp_path], tmp_path / "s", "--seq-agg", "median"))
    assert e.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err


def test_corrupt_scores_file(tmp_path):
    from megatron_minitron.config import ConfigError
    from megatron_minitron.importance import load_scores

    bad = tmp_path / "s.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ConfigError, match="not readable safetensors"):
        load_scores(bad)
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ConfigError, match="not a megatron-minitron scores file"):
        load_scores(bad)


# --- prune --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--target-ffn", "200"], "target ffn 200 must be between 1 and the original 96"),
    (["--target-heads", "3"], "not a multiple of the query groups 2"),
    (["--target-groups", "1", "--tp", "2"], "does not divide num_query_groups=1"),
    (["--drop-layers", "0,1,2,3"], "cannot drop all 4 layers"),
    (["--drop-layers", "1,7"], "indices must be distinct and in 0..3"),
    (["--target-layers", "2", "--drop-layers", "1"], "not both"),
    (["--target-experts", "2"], "--target-experts: this llama model has no experts"),
    (["--target-moe-ffn", "8"], "--target-moe-ffn: this llama model has no experts"),
])
def test_prune_impossible_targets(capsys, tiny_llama_ckpt, tmp_path, flags, needle):
    out = tmp_path / "out"
    fails(capsys, ["prune", "--load", str(tiny_llama_ckpt), "--out", str(out), *flags], needle)
    _nothing_at(out)


@pytest.mark.xdist_group("smollm2_scores")  # one worker computes smol_scores
def test_prune_needs_matching_scores(capsys, tiny_llama_ckpt, smol_scores, tmp_path):
    out = tmp_path / "out"
    args = ["prune", "--load", str(tiny_llama_ckpt), "--out", str(out), "--target-ffn", "64"]
    fails(capsys, args, "need a scores file")
    fails(capsys, [*args, "--scores", str(smol_scores)], "another shape")
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_ckpt, other)
    meta = json.loads((other / "minitron.json").read_text())
    meta["fingerprint"] = "0" * 32
    (other / "minitron.json").write_text(json.dumps(meta))
    from megatron_minitron.importance.scores import FORMAT, WIDTH_AXES, Scores

    widths = {"ln_attn": 64, "ln_mlp": 64, "heads": 4, "ffn": 96}
    scores = tmp_path / "s.safetensors"
    Scores({f"sums.{a}": torch.ones(4, 3, 2, widths[a], dtype=torch.float64) for a in WIDTH_AXES},
           {"format": FORMAT, "model": meta["model"], "fingerprint": "0" * 32, "samples": 1,
            "seq_agg": "mean", "sample_agg": "l2", "checkpoint": str(other)}).save(scores)
    fails(capsys, [*args, "--scores", str(scores)], "computed for checkpoint", "not this one")
    fails(capsys, [*args, "--scores", str(tmp_path / "missing")], "not found")
    _nothing_at(out)


def test_checkpoint_metadata_unpickler_allows_enum_members_only(tmp_path):
    """DCP metadata is a pickle. Python 3.11.2 writes enum members as `getattr(Enum, name)`:
    allowed for enums of allowed modules; getattr on anything else, or any other callable
    (a pickle that would create a file on load), is refused without running it."""
    import io
    import os
    import pickle

    from torch.distributed.checkpoint.planner import WriteItemType

    from megatron_minitron.checkpoint.mcore import _SafeUnpickler

    class Reduce:
        def __init__(self, *r):
            self.r = r

        def __reduce__(self):
            return self.r

    def load(obj):
        return _SafeUnpickler(io.BytesIO(pickle.dumps(obj))).load()

    assert load(Reduce(getattr, (WriteItemType, "TENSOR"))) is WriteItemType.TENSOR
    with pytest.raises(pickle.UnpicklingError):
        load(Reduce(getattr, (torch.Size, "__new__")))
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError):
        load(Reduce(os.system, (f"touch {marker}",)))
    assert not marker.exists()


@pytest.mark.parametrize("verb", ["eval", "importance"])
def test_sequence_parallel_needs_a_divisible_sequence(verb, capsys, tiny_llama_ckpt, tmp_path):
    args = [verb, "--load", str(tiny_llama_ckpt), "--tp", "2", "--sequence-parallel",
            "--seq-length", "33"]
    if verb == "importance":
        args += ["--samples", "2", "--out", str(tmp_path / "s.safetensors")]
    fails(capsys, args, "--seq-length 33", "tensor parallel size 2")
    assert not (tmp_path / "s.safetensors").exists()


def test_nan_in_training_exits_3_and_keeps_the_last_checkpoint(tiny_llama_ckpt, tmp_path):
    """Exit codes: 2 bad usage or input, 3 training failed (here: Inf/NaN from an absurd LR)."""
    from megatron_minitron.data.demo import held_out_plays, train_plays

    for name, play in (("train", train_plays()[0]), ("valid", held_out_plays()[0])):
        assert main(["preprocess", "--input", str(play), "--tokenizer", str(tiny_llama_ckpt),
                     "--output-prefix", str(tmp_path / name)]) == 0
    save = tmp_path / "run"
    r = run_cli("distill", "--teacher", str(tiny_llama_ckpt), "--student", str(tiny_llama_ckpt),
                "--data", str(tmp_path / "train"), "--valid-data", str(tmp_path / "valid"),
                "--save", str(save), "--train-iters", "4", "--global-batch-size", "2",
                "--seq-length", "32", "--lr", "1e30", "--clip-grad", "0", "--kd-weight", "0",
                "--lm-weight", "1", "--save-interval", "1", "--eval-iters", "1",
                "--warmup-iters", "1", check=False)  # step 1 at lr 0: a good checkpoint first
    err = [line for line in r.stderr.splitlines() if line.startswith("minitron distill")]
    assert r.returncode == 3 and len(err) == 1 and "NaN/Inf" in err[0], r.stderr[-2000:]
    kept = save / (save / "latest").read_text().strip()
    assert kept.name in ("iter_0000001", "iter_0000002"), kept
    _, chunks = load_in_process(kept)
    assert all(torch.isfinite(p).all() for p in chunks[0].parameters())
    assert not (save / "iter_0000003").exists() and not (save / "iter_0000004").exists()


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "ends early"), ("metadata", "cannot be loaded"), ("shape", "shape mismatch"),
    ("tokenizer", "no tokenizer")])
def test_damaged_checkpoint_is_one_line_and_nothing_is_written(damage, needle, capsys,
                                                               tiny_llama_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_ckpt, ckpt)
    if damage == "truncate":
        f = sorted((ckpt / "weights").glob("*.distcp"))[0]
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "metadata":
        (ckpt / "weights" / ".metadata").write_bytes(b"garbage")
    elif damage == "shape":
        meta = json.loads((ckpt / "minitron.json").read_text())
        meta["model"]["ffn_hidden_size"] *= 2
        (ckpt / "minitron.json").write_text(json.dumps(meta))
    else:
        shutil.rmtree(ckpt / "tokenizer")
    load = ["--load", str(ckpt)]
    if damage == "tokenizer":
        fails(capsys, ["eval", *load, "--seq-length", "32"], needle)
    else:
        fails(capsys, ["prune", *load, "--drop-layers", "1", "--out", str(tmp_path / "out")],
               needle)
        _nothing_at(tmp_path / "out")


def test_directory_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import os
    import socket
    import subprocess

    from megatron_minitron.checkpoint.atomic import LOCK, directory_lock
    from megatron_minitron.config import ConfigError

    run = tmp_path / "run"
    with directory_lock(run):
        assert (run / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}"
        with pytest.raises(ConfigError, match="is in use by process"), directory_lock(run):
            pass
    assert not run.exists()  # made by the lock, left empty: removed
    dead = subprocess.Popen(["true"])
    dead.wait()
    run.mkdir()
    (run / LOCK).write_text(f"{socket.gethostname()} {dead.pid}")
    with directory_lock(run):
        assert (run / LOCK).read_text().endswith(f" {os.getpid()}")
    assert run.is_dir() and not (run / LOCK).exists()
    (run / LOCK).write_text("another-host 1")  # cannot be checked from here: counts as alive
    with pytest.raises(ConfigError, match="another-host 1"), directory_lock(run):
        pass


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    """A requeue may put rank 0 on another node: the lock its first run left there cannot be
    checked from here, but it carries this job's id, and a job runs once at a time."""
    from megatron_minitron.checkpoint.atomic import LOCK, directory_lock
    from megatron_minitron.config import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (run / LOCK).write_text("node-a 1234 4242")
    with directory_lock(run):
        assert (run / LOCK).read_text().endswith(" 4242")
    (run / LOCK).write_text("node-a 1234 4241")  # another job's: refused
    with pytest.raises(ConfigError, match="node-a 1234 4241"), directory_lock(run):
        pass
