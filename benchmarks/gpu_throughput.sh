#!/usr/bin/env bash
# Offline throughput on the GPU (the serving issue's table): synthetic Llama-3.1-8B, 1000 requests.
#   bash benchmarks/gpu_throughput.sh            # every row
#   ROWS="bf16:128:128:256" bash benchmarks/gpu_throughput.sh
#   EXTRA="--temperature 1.0 --top_p 0.95" ROWS=...   # flags added to every row (drawn tokens)
#   KILN_OVERLAP=0 ROWS=...                           # steps in the plain order, to compare
# A row is QFORMAT:INPUT_LEN:OUTPUT_LEN:MAX_BATCH_SIZE (qformat full_prec is written bf16).
# JSON per row goes to ${OUT:-out}/throughput_*.json; logs to throughput.log.
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
source benchmarks/gpu_env.sh
model="${MODEL:-llama-3.1-8b}"
requests="${NUM_REQUESTS:-1000}"
rows="${ROWS:-bf16:128:128:256 fp8:128:128:256 int4_awq:128:128:256 bf16:1000:1000:256}"
for row in $rows; do
  IFS=: read -r q inp outp bs <<<"$row"
  qf=$q; [ "$q" = bf16 ] && qf=full_prec
  name="throughput_${q}_${inp}_${outp}_b${bs}"
  echo "== $name" | tee -a "$out/throughput.log"
  timeout "${RUN_TIMEOUT:-400}" python3 -m kiln bench throughput --synthetic "$model" --qformat "$qf" \
    --num_requests "$requests" --input_len "$inp" --output_len "$outp" --max_batch_size "$bs" \
    ${MAX_NUM_TOKENS:+--max_num_tokens $MAX_NUM_TOKENS} ${EXTRA:-} --output_json "$out/$name.json" 2>&1 | tee -a "$out/throughput.log"
done
