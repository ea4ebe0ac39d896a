#!/usr/bin/env bash
# Programmatic dependent launch on the GPU, in one run: is it correct (the kernel tests with KILN_PDL=late),
# what does it save on a chain of a step's kernels (pdl_chain.py), and end to end (`kiln bench latency`
# with KILN_PDL=0, 1 and late). Logs go to ${OUT:-out}/, a summary is printed.
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; from kiln.kernels import pdl
print('torch', torch.__version__, 'triton', triton.__version__, 'PDL launch option:', pdl._triton_can_launch_pdl(), 'gdc:', pdl.gdc_wait is not None)"
step() {  # name, timeout, command...
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
}
step tests_late ${T_TESTS:-150} env KILN_PDL=late python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_pdl.py tests/kernels/test_quant_matmul.py -k "${TESTS_K:-gpu or gemv1 or gated}"
tail -n 3 "$out/tests_late.log"
for warm in ${WARMS:-1 2}; do  # the GEMVs' L2 prefetch: all of their weight (1) or its first lines (2)
  step chain_warm$warm ${T_CHAIN:-120} python3 benchmarks/pdl_chain.py --warm $warm --formats ${CHAIN:-int4_awq:128 fp8}
  grep -E "KILN_PDL|bit-equal" "$out/chain_warm$warm.log" | sed "s/^/warm $warm: /"
done
OUT="$out" PDL="${PDL:-0 1 late}" RUNS="${RUNS:-int4_awq_g128 fp8}" RUN_TIMEOUT=${T_RUN:-120} bash benchmarks/gpu_latency.sh \
  2>&1 | tail -n 12
# the int4 down projection without SiLU-and-mul fused into its one-row GEMV (kernels/int4_matmul.py)
[ -z "${GATE_RUNS-}" ] || OUT="$out/unfused" KILN_FUSE_GATE=0 PDL=1 RUNS="${GATE_RUNS-}" \
  RUN_TIMEOUT=${T_RUN:-120} bash benchmarks/gpu_latency.sh 2>&1 | tail -n 2
if [ -n "${ALL_TESTS:-}" ]; then
  step tests_all ${T_TESTS:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels
  tail -n 3 "$out/tests_all.log"
fi
