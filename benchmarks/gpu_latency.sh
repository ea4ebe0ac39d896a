#!/usr/bin/env bash
# Latency of synthetic Mistral-7B-v0.3 shapes on the GPU, in every weight format, plus the TTFT of a
# 2048-token prompt. Writes one JSON per run under ${OUT:-out}/ and prints a short table last.
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
runs=" ${RUNS:-bf16 int4_awq_g128 int4_awq_g64 fp8 int8_wo ttft2048_bf16} "
# PDL="0 1 late" runs each row with each KILN_PDL setting (programmatic dependent launch; kernels/pdl.py):
# rows *_nopdl (0), the plain name (1, the default), *_late (late)
run() {  # name, args...
  local name=$1; shift
  [[ "$runs" == *" $name "* ]] || return 0
  local pdl tag
  for pdl in ${PDL:-1}; do
    case $pdl in 0) tag="${name}_nopdl" ;; late) tag="${name}_late" ;; *) tag=$name ;; esac
    KILN_PDL=$pdl timeout "${RUN_TIMEOUT:-300}" python3 -m kiln bench latency --synthetic mistral-7b-v0.3 "$@" \
      --output_json "$out/$tag.json" >"$out/$tag.txt" 2>&1 || echo "$tag FAILED: $(tail -n 3 "$out/$tag.txt")"
    grep -E "time per output|achieved|transformers" "$out/$tag.txt" | sed "s/^/$tag: /"
  done
}
run bf16 --qformat full_prec ${COMPARE_HF:---compare hf}
run int4_awq_g128 --qformat int4_awq --group_size 128
run int4_awq_g64 --qformat int4_awq --group_size 64
run fp8 --qformat fp8
run int8_wo --qformat int8_wo --group_size 0
run ttft2048_bf16 --qformat full_prec --input_len 2048 --output_len 4
python3 - "$out" <<'PY'
import json, pathlib, sys
print(f"{'run':16} {'TTFT ms':>9} {'ms/token':>9} {'tok/s':>8} {'GB/s':>8} {'% floor':>8}")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    if not isinstance(d, dict) or "tpot_s" not in d:  # another benchmark's output in the same folder
        continue
    pct = d["achieved_gbps"] / d["copy_gbps"] * 100
    print(f"{f.stem:16} {d['ttft_s']*1e3:9.1f} {d['tpot_s']*1e3:9.3f} {d['decode_tokens_per_s']:8.1f} {d['achieved_gbps']:8.0f} {pct:7.1f}%")
PY
