#!/usr/bin/env bash
# One-call GPU check (issue 7), under 8 minutes on one H100:
#   1. the exact and the accelerated sampler at 8B shapes (LLaDA-8B + SigLIP2 so400m, random bf16
#      weights initialised on the device; end-of-turn banned so every answer runs its full
#      schedule), prompt ~1k tokens incl. 729 image tokens,
#      L=256, B=64, N=256, batch 1;
#   2. the ~1B training benchmark (benchmarks/train_throughput.py --config llada_1b: MFU);
# then one summary table. Needs only jax[cuda], flax, optax, orbax-checkpoint, chex, absl-py,
# transformers, safetensors, pillow, numpy (no ml_collections / grain / tensorflow-datasets: the
# script refuses to import them) and no network.
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine, from anywhere
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # CPU dry run with tiny shapes
#
# Knobs (environment): GPU_CHECK_FAST="prefix:8:0.9,dual:4:0.9:128" (accelerated settings,
# cache_mode:refresh_every:threshold[:steps]; default in gpu_check.py), GPU_CHECK_ATTENTION=cudnn,
# GPU_CHECK_SAMPLER_S / GPU_CHECK_TRAIN_S (time limits of the two parts, default 300 / 170 s),
# GPU_CHECK_OUT (folder for the JSON lines; default a temporary one).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
PY="${PYTHON:-python3}"
OUT_DIR="${GPU_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/sampler.jsonl" "$OUT_DIR/train.jsonl"
start=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== 1/2 samplers (limit ${GPU_CHECK_SAMPLER_S:-300} s)"
timeout -k 10 "${GPU_CHECK_SAMPLER_S:-300}" "$PY" benchmarks/gpu_check.py sampler --out "$OUT_DIR/sampler.jsonl" \
  || echo "sampler part ended with status $? (124 = time limit)"
echo "== 2/2 training (limit ${GPU_CHECK_TRAIN_S:-170} s)"
timeout -k 10 "${GPU_CHECK_TRAIN_S:-170}" "$PY" benchmarks/gpu_check.py train --out "$OUT_DIR/train.jsonl" \
  || echo "train part ended with status $? (124 = time limit)"

"$PY" benchmarks/gpu_check.py summary "$OUT_DIR/sampler.jsonl" "$OUT_DIR/train.jsonl"
echo "total $(( $(date +%s) - start )) s; JSON lines in $OUT_DIR"
