#!/usr/bin/env bash
# Live-update benchmark on the lent GPU (issue 5): Qwen2.5-1.5B shape with random bf16 weights,
# written to disk first (variants are made from real files), then `autoglm bench update`.
#   bash benchmarks/gpu_update.sh OUT_DIR      (wheels for the server carried in .whl)
set -u
OUT=${1:?out dir}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/update_gpu.log"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/update_gpu.log"
python3 -m open_autoglm.models.arch_configs qwen2.5-1.5b /tmp/ckpt 2>&1 | tail -1
timeout 450 python3 -m open_autoglm.cli bench update --model /tmp/ckpt/qwen2.5-1.5b --device cuda \
  --clients 32 --input-len 128 --output-len 64 --gap 8 --warmup 5 --vocab-size 150000 --min-token-id 1000 \
  --registry /tmp/registry --json "$OUT/update_gpu.json" --plot "$OUT/update_gpu.png" 2>&1 | tee -a "$OUT/update_gpu.log" | tail -45
