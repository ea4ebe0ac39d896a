#!/usr/bin/env bash
# Served over HTTP vs offline, same model and limits (the serving issue's second bar):
# kiln bench throughput with MAX_BATCH_SIZE in flight, then a synthetic `kiln serve` under
# `kiln bench serve --concurrency CONCURRENCY`. JSON to ${OUT:-out}/.
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
source benchmarks/gpu_env.sh
# the server's packages must import before anything is measured (on a machine without network they come
# as wheels beside the tree; fastapi 0.16x also needs opentelemetry-api and importlib-metadata)
python3 -c "import fastapi, uvicorn, pydantic" || { echo "the server's packages do not import"; exit 1; }
model="${MODEL:-llama-3.1-8b}" n="${NUM_REQUESTS:-1000}" c="${CONCURRENCY:-64}"
[ "${SKIP_OFFLINE:-0}" = 1 ] || python3 -m kiln bench throughput --synthetic "$model" --num_requests "$n" \
  --input_len 128 --output_len 128 --max_batch_size "$c" --output_json "$out/offline_b$c.json" 2>&1 \
  | tee "$out/serve_bench.log"
python3 benchmarks/serve_synthetic.py --synthetic "$model" --max_batch_size "$c" --port 8123 ${SWITCH:+--switch_interval $SWITCH} >"$out/server.log" 2>&1 &
server=$!
for _ in $(seq 240); do
  curl -sf http://127.0.0.1:8123/v2/health/ready >/dev/null && break
  if ! kill -0 "$server" 2>/dev/null; then  # the server exited: say why instead of waiting on
    echo "the server exited before it was ready:"; tail -n 15 "$out/server.log"; exit 1
  fi
  sleep 1
done
# warm-up: compile every kernel variant outside the measured run
python3 -m kiln bench serve --url http://127.0.0.1:8123 --concurrency "$c" --num_requests "$((2 * c))" \
  --input_len 128 --output_len 16 >/dev/null 2>&1
for proto in ${PROTOCOLS:-openai kserve}; do
  python3 -m kiln bench serve --url http://127.0.0.1:8123 --protocol "$proto" --concurrency "$c" --workers "${WORKERS:-4}" \
    --num_requests "$n" --input_len 128 --output_len 128 --output_json "$out/served_${proto}_c$c.json" 2>&1 \
    | tee -a "$out/serve_bench.log"
done
curl -s http://127.0.0.1:8123/metrics | grep -E "^kiln_" | head -40 >"$out/metrics.txt"
kill "$server"; wait "$server" 2>/dev/null
tail -5 "$out/server.log"
