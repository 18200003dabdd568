#!/usr/bin/env bash
# GPU suite for issue 4 (the fast path): gpu tests, then every benchmark, then a short table.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [--peers] [--gptfast] [--steps tests,gemv,latency,throughput,prefix,startup]
#   (latency_qwen / latency_llama pick one model: with --peers each takes minutes of compiling)
#
# Runs on the lent GPU machine from the repo root, wheels carried in .whl (xxhash, server deps).
# --peers adds transformers generate_batch (throughput) and the gpt-fast-style loop (latency),
# each several minutes of compile / slow generation; --gptfast adds only the latter (check it
# alone first: benchmarks/gptfast_gpu_check.py). Each step has its own timeout and may fail
# without stopping the rest. OUT_DIR gets suite.log (everything, table last) and j/*.json (one
# report per benchmark, at most 7: the lent machine returns 8 files); merge them anywhere with
# `python benchmarks/gpu_summary.py OUT_DIR/j results.json`.
set -u
OUT=${1:?out dir}; shift
PEERS=0; GPTFAST=0; STEPS=tests,gemv,latency,throughput,prefix,startup
while [ $# -gt 0 ]; do case $1 in --peers) PEERS=1; GPTFAST=1;; --gptfast) GPTFAST=1;; --steps) STEPS=$2; shift;; esac; shift; done
want() { [[ ",$STEPS," == *",$1,"* ]]; }
mkdir -p "$OUT"
J="$OUT/j"; mkdir -p "$J"            # per-benchmark JSON (kept if the run is cut short)
LOG="$OUT/suite.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:.
fi
export PYTHONPATH=${PYTHONPATH:-.}
CLI="python3 -m open_autoglm.cli"
QWEN="--random-weights --arch-config qwen2.5-1.5b"
LLAMA="--random-weights --arch-config llama-3.1-8b"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, never abort the suite
  local name=$1 limit=$2; shift 2
  echo "=== $name: $* ($(date +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  tail -n 12 "$LOG" | grep -v "^===" | sed 's/^/    /'
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"
  lscpu | grep -E "Model name|^CPU\(s\)"; } 2>&1 | tee -a "$LOG"
# Preflight: every module the suite imports, so a missing wheel costs seconds, not the whole run.
python3 -c "import open_autoglm.engine.llm_engine, open_autoglm.models.catalog, open_autoglm.server.cli, open_autoglm.bench.startup, open_autoglm.bench.prefix, open_autoglm.layers.triton_ops; print('imports ok')" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "preflight failed" | tee -a "$LOG"; exit 1; }

want tests && step pytest_gpu 300 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 -rfE tests/test_attention.py tests/test_gpu_engine.py tests/test_gpu_transfer.py tests/test_sampler.py tests/test_peers.py
want gemv && step gemv_microbench 120 python3 benchmarks/gemv_gpu.py

GF=""; HF=""; LAT_S=300
[ "$PEERS" = 1 ] && HF="--peer hf --plot $OUT/throughput_qwen.png"
[ "$GPTFAST" = 1 ] && GF="--peer gptfast" && LAT_S=450  # + the peer's compile (run 4's old peer: ~150 s)
{ want latency || want latency_qwen; } && step latency_qwen $LAT_S $CLI bench latency $QWEN --input-len 512 --output-len 256 --max-model-len 4096 $GF --json "$J/latency_qwen.json"
{ want latency || want latency_llama; } && step latency_llama $LAT_S $CLI bench latency $LLAMA --input-len 512 --output-len 256 --max-model-len 4096 $GF --json "$J/latency_llama.json"
if want throughput; then
  step throughput_qwen 360 $CLI bench throughput $QWEN --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 1024 --max-num-batched-tokens 8192 $HF --json "$J/throughput_qwen.json"
  step throughput_llama 150 $CLI bench throughput $LLAMA --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 1024 --max-num-batched-tokens 8192 --json "$J/throughput_llama.json"
fi
want prefix && step prefix_qwen 120 python3 -m open_autoglm.bench.prefix $QWEN --num-prompts 64 --prefix-len 2048 --suffix-len 64 --output-len 16 --max-model-len 4096 --json "$J/prefix_qwen.json"
if want startup; then  # an empty Triton cache of its own (the steps above filled only the default one), then warm
  TC=$(mktemp -d)
  step startup_cold 120 python3 -m open_autoglm.bench.startup $QWEN --max-model-len 4096 --triton-cache "$TC" --json "$J/startup_cold.json"
  step startup_warm 150 python3 -m open_autoglm.bench.startup $QWEN --max-model-len 4096 --triton-cache "$TC" --serve --json "$J/startup_warm.json"
  # The same with the Hugging Face hub client told it is offline (what an air-gapped server sets):
  # tells whether config/tokenizer loading waits on the network here.
  HF_HUB_OFFLINE=1 step startup_offline 150 python3 -m open_autoglm.bench.startup $QWEN --max-model-len 4096 --triton-cache "$TC" --serve --json "$J/startup_offline.json"
fi

python3 benchmarks/gpu_summary.py "$J" /tmp/results.json 2>&1 | tee -a "$LOG"
