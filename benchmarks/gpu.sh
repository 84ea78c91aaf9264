#!/usr/bin/env bash
# The prepared GPU run (issue 14, item 5): attention-implementation parity and the 7B presets (llava-next-7b,
# llava15-7b; full depth, bf16, random weights) with none, pio, fastv, dart, random at 11.1% after layer 2.
# Run from the repository root, no install needed:   bash benchmarks/gpu.sh
# Outputs (7 files, one flat folder): $OUT when set, else runs/gpu. Extra arguments go to piofvlm.bench.gpu
# (--budget SECONDS, default 420; --dry-run: every part on tiny presets on the CPU, what tests/test_gpu_script.py runs).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python="${PYTHON:-$(command -v python3 || command -v python)}"
echo "[gpu.sh] commit $(git rev-parse HEAD 2>/dev/null || echo unknown), python $($python --version 2>&1), out $out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
set +e
$python -m piofvlm.bench.gpu --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
code=${PIPESTATUS[0]}
echo "[gpu.sh] exit $code; files in $out: $(ls "$out" | tr '\n' ' ')"
exit "$code"
