#!/usr/bin/env bash
# Tensor parallelism on two GPUs: the GPU tests of tests/gpu/test_tp_gpu.py, the all-reduce time per
# step, and tp 1 vs tp 2 latency and throughput on synthetic Mistral-Nemo-12B shapes (bf16).
#   bash benchmarks/gpu_tp.sh                 # everything
#   PARTS="latency" bash benchmarks/gpu_tp.sh # some of: tests allreduce latency throughput trace channel
# trace: batch-1 decode with KILN_STEP_TRACE, summarized by benchmarks/step_trace.py (where a step's time goes)
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
source benchmarks/gpu_env.sh
model="${MODEL:-mistral-nemo-12b}"
parts="${PARTS:-tests allreduce latency throughput}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvidia-smi topo -m 2>/dev/null | head -5 || true
has() { [[ " $parts " == *" $1 "* ]]; }
if has tests; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -rs -s -o faulthandler_timeout=120 \
    tests/gpu/test_tp_gpu.py >"$out/tp_tests.log" 2>&1
  echo "tp tests exit code: $?"; grep -E "agreement|max \|diff\||passed|failed" "$out/tp_tests.log"
fi
if has allreduce; then
  timeout 60 torchrun --standalone --nproc-per-node 2 benchmarks/allreduce.py --hidden 5120 --layers 40 \
    --output_json "$out/allreduce.json" 2>&1 | grep -v "^W\|^\*" | tee "$out/allreduce.log"
fi
if has latency; then
  for tp in 1 2; do
    echo "== latency tp $tp"
    timeout "${LATENCY_TIMEOUT:-80}" python3 -m kiln bench latency --synthetic "$model" --tp_size "$tp" --batch_size 1 \
      --input_len 128 --output_len 256 --output_json "$out/latency_tp$tp.json" 2>&1 | tee -a "$out/latency.log" | grep -v "^W"
  done
fi
if has channel; then
  timeout 60 python3 benchmarks/step_channel.py --seqs 1,256 --steps 2000 2>&1 | tee "$out/step_channel.log"
fi
if has trace; then
  for run in ${TRACE_RUNS:-tp1 tp2 tp2symm}; do
    tp="${run:2:1}"; extra=""
    [[ "$run" == *symm ]] && extra="KILN_TP_ALLREDUCE=symm"
    echo "== trace $run"
    env $extra KILN_STEP_TRACE="$out/trace_$run" timeout "${LATENCY_TIMEOUT:-80}" python3 -m kiln bench latency \
      --synthetic "$model" --tp_size "$tp" --batch_size 1 --input_len 128 --output_len 256 2>&1 \
      | grep -E "time per output|achieved" | tee -a "$out/trace.log"
    python3 benchmarks/step_trace.py "$out/trace_$run" 2>&1 | tee -a "$out/trace.log"
  done
fi
if has throughput; then
  for tp in ${TP_SIZES:-1 2}; do
    echo "== throughput tp $tp"
    timeout "${THROUGHPUT_TIMEOUT:-110}" python3 -m kiln bench throughput --synthetic "$model" --tp_size "$tp" --num_requests "${NUM_REQUESTS:-1000}" \
      --input_len 128 --output_len 128 --max_batch_size "${MAX_BATCH_SIZE:-256}" \
      --output_json "$out/throughput_tp$tp.json" 2>&1 | tee -a "$out/throughput.log" | grep -v "^W"
  done
fi
