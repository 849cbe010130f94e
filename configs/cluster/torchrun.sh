#!/bin/bash
# Multi-node training without SLURM: run this on every node (2 nodes x 8 GPUs here).
#   NODE_RANK=0 MASTER_ADDR=node0.example.org bash configs/cluster/torchrun.sh configs/coco_xception_bert.yaml
#   NODE_RANK=1 MASTER_ADDR=node0.example.org bash configs/cluster/torchrun.sh configs/coco_xception_bert.yaml
# torchrun starts one process per GPU; Lightning reads torchrun's variables. Every node must be given the same
# --output-dir (shared storage), since ranks started separately cannot agree on a time-stamped default.
# MAX_RESTARTS=N: when a worker dies, torchrun restarts the node's workers up to N times, and they continue from the
# run folder's newest checkpoint by themselves.
set -euo pipefail
# a fresh rendezvous store per restart: the shared one hands restarted workers stale addresses (pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
RECIPE=${1:?usage: NODE_RANK=.. MASTER_ADDR=.. bash configs/cluster/torchrun.sh RECIPE.yaml [train.py flags]}
shift
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RUN=${RUN:-checkpoints/$(basename "$RECIPE" .yaml)}
torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "${NODE_RANK:?}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  --master-addr "${MASTER_ADDR:?}" --master-port "${MASTER_PORT:-29500}" \
  train.py --config "$RECIPE" --accelerator gpu --devices "$GPUS_PER_NODE" --num-nodes "$NNODES" \
  --precision bf16-mixed --output-dir "$RUN" "$@"
