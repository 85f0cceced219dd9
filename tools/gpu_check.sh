#!/usr/bin/env bash
# One call on the GPU machine: install (building based._C), run the gpu-marked tests, run the benchmarks
# named as arguments. Logs go to $OUT (or ./gpu_out). Comparison packages travel as wheels in .whl/; nothing is
# downloaded there, so the install takes the dependencies the machine has (--no-deps).
#   PYTEST_TARGETS  what pytest runs (default: tests)   PYTEST_K  a -k expression   TEST_TIMEOUT  seconds
#   PYTEST_MARK  a -m expression (default: gpu; empty runs every test, e.g. tests/test_public_ops.py, whose
#                unmarked tests take every backend the machine has)
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# The image's default CXX is a wrapper script; an extension built through it crashes on any C++ exception.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
python3 -m pip install -v --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1
echo "install exit $?"; tail -2 "$out/install.log"
python3 -c "import torch, based._C; print('based._C imported; torch', torch.__version__)"
export PYTHONUNBUFFERED=1
# SIGINT at the time limit: pytest then still prints its summary and the slowest tests.
timeout -s INT "${TEST_TIMEOUT:-3000}" python3 -X faulthandler -m pytest ${PYTEST_TARGETS:-tests} \
  -m "${PYTEST_MARK-gpu}" -v --tb=short --durations=15 -k "${PYTEST_K:-}" -p no:cacheprovider -ra 2>&1 \
  | tee "$out/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed|[0-9.]+s (call|setup)" | tail -40
for bench in "$@"; do
  python3 "benchmarks/$bench.py" 2>&1 | tee "$out/$bench.txt"
done
