#!/usr/bin/env bash
# compute-sanitizer over every Triton and CUDA kernel at small shapes, on the GPU machine (after the install that
# tools/gpu_check.sh does). tests/test_public_ops.py runs every public op on every backend the machine has,
# forward and backward, on contiguous and strided inputs (a few elements per dimension), so every kernel
# launches there. Each tool's report goes to $OUT/sanitize_<tool>.log (or ./gpu_out); the exit status is
# non-zero if any tool found an error.
#   SANITIZE_TOOLS  the tools to run (default: memcheck racecheck)   SANITIZE_K  a pytest -k expression
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# Without the caching allocator every tensor is its own allocation, so an access past one is reported
# instead of landing in a neighbour inside a pooled block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
  "$sanitizer" --tool "$tool" --error-exitcode 99 --log-file "$out/sanitize_$tool.log" \
    python3 -m pytest tests/test_public_ops.py -q -x -p no:cacheprovider -k "${SANITIZE_K:-strided_views}" \
    > "$out/sanitize_${tool}_pytest.log" 2>&1
  code=$?
  echo "$tool: exit $code; $(tail -1 "$out/sanitize_${tool}_pytest.log"); $(grep -c '^=========.*Error\|^========= Invalid\|Race reported' "$out/sanitize_$tool.log") error lines; $(tail -1 "$out/sanitize_$tool.log")"
  [ "$code" -eq 0 ] || status=1
done
exit "$status"
