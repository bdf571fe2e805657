#!/usr/bin/env bash
# The image's entrypoint (under tini): `docker run IMAGE COMMAND [ARGS ...]`
#
#   train CONFIG [--set KEY=VALUE ...] [--overwrite]   fine-tune: one process per visible GPU
#                                                      (one on a machine without), via launch/train.sh
#   prepare CONFIG | bench | merge | export | generate | env   the mistral-qlora command of that name
#   shell [ARGS]                                       bash
#   help                                               this text
#
# Every command replaces this shell (exec), so `docker stop`'s SIGTERM reaches mistral-qlora,
# which saves a checkpoint at the next step boundary and exits with 75; a hung rank (train.hang_timeout)
# exits with 76 after writing its stacks to run.log; both codes pass through as the container's
# exit code (restart it with `--restart on-failure` or your orchestrator's policy), and the same
# `train` command resumes from the last checkpoint. Several nodes: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# (launch/train.sh reads them; NPROC_PER_NODE overrides the GPU count).
set -euo pipefail

visible_gpus() {
  # what this container was given (docker --gpus / CUDA_VISIBLE_DEVICES); 0 without GPUs
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c '[0-9A-Za-z]' || true
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

command="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$command" in
  train)
    gpus="$(visible_gpus)"
    if [[ -z "${NPROC_PER_NODE:-}" && "$gpus" -gt 0 ]]; then
      export NPROC_PER_NODE="$gpus"
    fi
    echo "entrypoint: $gpus GPU(s) visible; ${NPROC_PER_NODE:-1} training process(es) on this node" >&2
    export MISTRAL_QLORA="${MISTRAL_QLORA:-mistral-qlora}"
    exec "${MISTRAL_QLORA_HOME:-/opt/mistral-qlora}/launch/train.sh" "$@"
    ;;
  prepare | bench | merge | export | generate | env)
    exec mistral-qlora "$command" "$@"
    ;;
  shell)
    exec bash "$@"
    ;;
  help | -h | --help)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "entrypoint: unknown command '$command'" >&2
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
