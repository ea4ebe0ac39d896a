#!/usr/bin/env bash
# Where the server's and the load generator's CPU time goes at 64 streams (cProfile of both, engine in its own process).
set -u
mkdir -p "${OUT:-out}"
source benchmarks/gpu_env.sh
python3 -m cProfile -o ${OUT:-out}/server.prof benchmarks/serve_synthetic.py --synthetic llama-3.1-8b --max_batch_size 64 --port 8123 > ${OUT:-out}/server.log 2>&1 &
srv=$!
for _ in $(seq 240); do curl -sf http://127.0.0.1:8123/v2/health/ready >/dev/null && break; sleep 1; done
python3 -m kiln bench serve --url http://127.0.0.1:8123 --concurrency 64 --num_requests 128 --input_len 128 --output_len 16 >/dev/null 2>&1
python3 -m cProfile -o ${OUT:-out}/client.prof -m kiln bench serve --url http://127.0.0.1:8123 --concurrency 64 --num_requests 640 --input_len 128 --output_len 128 2>&1 | grep -E "throughput|inter-chunk"
kill -INT $srv; wait $srv
python3 -c "
import pstats
for f in ('server', 'client'):
    print('=====', f)
    pstats.Stats('${OUT:-out}/' + f + '.prof').sort_stats('tottime').print_stats(22)
" 2>&1 | grep -vE "^\s*$" | cut -c1-150
