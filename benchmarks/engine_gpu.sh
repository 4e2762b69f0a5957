#!/usr/bin/env bash
# Engine on CUDA (issue 14 item 5): fp32 / bf16 / fp16 elements/s at the 3D-like shape against
# MuSc's formulation on the same GPU, N = 60 and N = 150 measured in full, N = 1000 projected,
# plus the 2D-like shape. About 3-5 minutes on one H200 (each step has its own time limit;
# 8 minutes at most in all).
#   bash benchmarks/engine_gpu.sh                    # on a machine with a CUDA GPU
#   DEVICE=cpu SMOKE=1 bash benchmarks/engine_gpu.sh # checks the script itself in a minute
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
if [ "${SMOKE:-0}" = 1 ]; then SIZE=(--collections 4 --repeats 1); BIG=(--collections 5 --repeats 1); else SIZE=(--repeats 3); BIG=(--collections 150 --repeats 2); fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# Full runs (no sampling); MuSc's cdist takes all M query rows of an image at once, as in MuSc.
timeout 150 "$PY" benchmarks/engine.py --device "$DEVICE" --case 3d --queries 0 "${SIZE[@]}" --reference-rows 4096
timeout 150 "$PY" benchmarks/engine.py --device "$DEVICE" --case 3d --queries 0 "${BIG[@]}" --reference-rows 4096
timeout 120 "$PY" benchmarks/engine.py --device "$DEVICE" --case 2d --queries 0 "${SIZE[@]}" --reference-rows 1369 --codegraph-seeds 0,1
