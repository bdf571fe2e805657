#!/usr/bin/env bash
# The per-node entry: `launch/train.sh CONFIG [--set KEY=VALUE ...] [--overwrite]` on every node.
# It only turns its environment into `mistral-qlora train` arguments; mistral-qlora then builds the
# `accelerate launch` command (launch/*.yaml) for this node, or trains in-process for one process.
#
#   NPROC_PER_NODE  processes on this node (default: one per visible GPU, one without GPUs)
#   NNODES          nodes in the run                      (SLURM_NNODES when unset, else 1)
#   NODE_RANK       this node's rank, 0 .. NNODES-1       (SLURM_NODEID when unset, else 0)
#   MASTER_ADDR     the rank-0 node's address (needed with NNODES > 1)
#   MASTER_PORT     its rendezvous port (default 29500 with NNODES > 1, a free one otherwise)
#   MISTRAL_QLORA   the command to run (default: "python3 -m mistral_qlora")
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
args=()
[[ -n "${NPROC_PER_NODE:-}" ]] && args+=(--nproc "$NPROC_PER_NODE")
nnodes="${NNODES:-${SLURM_NNODES:-}}"
[[ -n "$nnodes" ]] && args+=(--nnodes "$nnodes")
node_rank="${NODE_RANK:-${SLURM_NODEID:-}}"
[[ -n "$node_rank" ]] && args+=(--node-rank "$node_rank")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--main-addr "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && args+=(--main-port "$MASTER_PORT")
read -r -a cmd <<< "${MISTRAL_QLORA:-python3 -m mistral_qlora}"
exec "${cmd[@]}" train "$@" "${args[@]}"
