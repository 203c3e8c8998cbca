#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install the CUDA build of llama-cpp-python
# (the wheel `make cuda-wheel` writes to dist/cuda/), start the service with
# every layer offloaded, check from the core's log that the layers and weights
# are on the GPU, run the documented examples, then `make bench`, and print the
# figures. About 10 minutes from a built wheel (the venv as `make setup` makes it).
#
#   bash bench/gpu_check.sh [WHEEL]        # BENCH_ARGS=... passes bench options
#
# Exits non-zero on the first thing that is not as it should be, saying what.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
out=bench/results/gpu
mkdir -p "$out"

wheel=${1:-$(ls -t dist/cuda/llama_cpp_python-*.whl 2>/dev/null | head -1 || true)}
[ -n "$wheel" ] && [ -f "$wheel" ] || { echo "no CUDA wheel: run make cuda-wheel first" >&2; exit 1; }
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: not a GPU machine" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

echo "== set-up, and the CUDA build of llama-cpp-python ($wheel)"
make -s .venv/.bench proto
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"

echo "== the service with every layer on the GPU (N_GPU_LAYERS=-1)"
log=$out/service.log
N_GPU_LAYERS=-1 LOG_FORMAT=text setsid .venv/bin/python api_service.py >"$log" 2>&1 &
service=$!
trap 'kill -INT -- -"$service" 2>/dev/null || true; wait "$service" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -fs http://localhost:8002/health >/dev/null 2>&1 && break
  kill -0 "$service" 2>/dev/null || { cat "$log"; echo "the service exited" >&2; exit 1; }
  sleep 1
done
curl -fs http://localhost:8002/health >/dev/null || { echo "not healthy in 120 s" >&2; exit 1; }
offloaded=$(grep -o 'layers offloaded to the GPU: [0-9]*/[0-9]*' "$log" | tail -1 | awk '{print $NF}')
buffers=$(grep -o 'model buffers: .*' "$log" | tail -1)
echo "$buffers; layers on the GPU: ${offloaded:-not reported}"
[ -n "$offloaded" ] && [ "${offloaded%/*}" = "${offloaded#*/}" ] \
  || { echo "not every layer is on the GPU" >&2; exit 1; }
grep -q 'CUDA0' <<<"$buffers" || { echo "no weights in a CUDA buffer" >&2; exit 1; }

echo "== the documented examples"
bash tests/e2e/documented_examples/curl_examples.sh | tee "$out/curl_examples.txt"
for example in chat chat_stream chat_with_session; do
  .venv/bin/python "tests/e2e/documented_examples/$example.py" | tee "$out/$example.txt"
done
kill -INT -- -"$service"
wait "$service" || true
trap - EXIT

echo "== make bench (the service and llama-cpp-python on the GPU)"
make -s bench BENCH_ARGS="${BENCH_ARGS:-} --out $out" | tee "$out/bench.txt"
echo "== done in $((SECONDS - started)) s; figures in $out/"
