#!/bin/bash
# One device call = build + CUDA tests + layer benchmark (see benchmarks/NOTES_gpu.md).
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [build] [test] [bench] [profile]
# Logs and results go to $OUT (default: /tmp/qllm_out).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/qllm_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
stages="${*:-build test bench}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" | tee -a "$OUT/env.txt"

if [[ " $stages " == *" build "* ]]; then
  stamp "build"
  export MAX_JOBS=16
  if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    grep -n "error" "$OUT/build.log" | head -40; tail -40 "$OUT/build.log"; exit 1
  fi
  python3 -c "import qllm, torch; print('ops:', [n for n in dir(torch.ops.qllm) if not n.startswith('_')])"
  stamp "built"
fi
if [[ " $stages " == *" test "* ]]; then
  stamp "tests"
  timeout 260 python3 -m pytest -q --maxfail=20 -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -60
  stamp "tests done"
fi
if [[ " $stages " == *" diag "* ]]; then
  stamp "diag: mixed CUDA/CPU arguments under cuda-gdb"
  cat > /tmp/mixed.py <<'PY'
import torch, qllm
k = torch.randn(3, 2, 8, 4, device="cuda"); s = torch.randn(3, 4, 8)
try:
    torch.ops.qllm.repr_compute(k, s, 2)
except ValueError as e:
    print("VALUEERROR", e)
PY
  timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 /tmp/mixed.py 2>&1 | grep -v "^\[New Thread\|^\[Thread\|Detaching" | tail -30 | tee "$OUT/diag.log"
fi
if [[ " $stages " == *" bench "* ]]; then
  stamp "bench"
  timeout 300 python3 benchmarks/bench_layer.py --out "$OUT/layer_h100.json" 2>&1 | tee "$OUT/bench.log"
  stamp "bench done"
fi
if [[ " $stages " == *" profile "* ]]; then
  timeout 200 python3 benchmarks/bench_layer.py --prefill 131072 --decode-at --repeats 1 --profile 131072 \
    --out "$OUT/layer_profile.json" 2>&1 | tee "$OUT/profile.log" | tail -40
fi
