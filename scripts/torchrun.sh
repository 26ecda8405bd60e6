#!/usr/bin/env bash
# Any `minitron` verb, or the whole pipeline, on one node under torchrun:
#   NPROC=8 scripts/torchrun.sh run configs/llama31-8b-to-4b-width.yaml
#   NPROC=2 scripts/torchrun.sh importance --load CKPT --tp 2 --sequence-parallel --out S
#   NPROC=8 scripts/torchrun.sh distill --teacher T --student S --data D --train-iters N --save R --tp 8
# Several nodes without SLURM: set NNODES, NODE_RANK and MASTER_ADDR on each (MASTER_PORT too).
# NPROC defaults to the GPUs nvidia-smi lists (1 without a GPU). Under SLURM use slurm/minitron.sbatch.
set -euo pipefail
if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the address of node 0, the same on every" \
    "node); 127.0.0.1 would start $NNODES separate jobs" >&2
  exit 2
fi
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
exec torchrun --nproc_per_node "${NPROC:-$((gpus > 0 ? gpus : 1))}" --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" -m megatron_minitron "$@"
