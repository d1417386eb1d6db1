#!/usr/bin/env bash
# Run benchmarks on a lent GPU machine (see bench/README.md). The default model's GGUF is
# carried in two halves (.devA, .devB) because one call carries at most 64 MiB.
#   step a: bash bench/gpu_run.sh stash      (with .devA carried)
#   step b: bash bench/gpu_run.sh run BENCH… (with .devB carried)
set -euo pipefail
STORE=/root/ranklab-dev
case "$1" in
  stash)
    mkdir -p $STORE && cp -r .devA/* $STORE/ && ls -la $STORE ;;
  run)
    shift
    [ -f $STORE/model.gguf ] || cat $STORE/gguf_part_aa .devB/gguf_part_ab > $STORE/model.gguf
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $STORE/whl/*.whl >/dev/null
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    export RANKLAB_BENCH_MODEL=$STORE/model.gguf RANKLAB_CACHE=$STORE/cache RANKLAB_SHARED=$STORE/shared
    export RANKLAB_BENCH_OUT=${OUT:-/tmp/out}
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    for b in "$@"; do echo "== $b"; (cd bench && eval "python3 $b") || echo "FAILED: $b"; done ;;
esac
