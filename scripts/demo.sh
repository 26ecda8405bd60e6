#!/usr/bin/env bash
# The built-in demo: the whole method on SmolLM2-135M and shipped Shakespeare (configs/demo.yaml):
# convert -> teacher correction -> importance -> prune -> distill -> eval -> HF export, then a
# short greedy continuation from the distilled model. Re-running skips finished stages.
set -euo pipefail
config=${1:-configs/demo.yaml}
minitron run "$config"
run_dir=$(python -c "import sys; from pathlib import Path
from megatron_minitron.pipeline.config import load_config
print(load_config(Path(sys.argv[1])).directory)" "$config")
minitron generate --load "$run_dir/distill/$(cat "$run_dir/distill/latest")" --max-new-tokens 24 \
  --prompt "ROMEO: But soft, what light through yonder window breaks?"
