#!/bin/bash
# One device call = build + CUDA tests + layer benchmark (see benchmarks/NOTES_gpu.md).
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [build] [test] [ttier] [e2etier] [tmodel] [tfused] [bench] [test8] [bench8] [pdecode] [probe] [mma] [tsab] [tsorder] [microsel] [micropc [ncupc]] [gemm] [resgemm] [microseam] [mergeab] [bench10] [kvab] [pairab] [earlyab] [e2eearly] [cutab] [seamab] [ncuseam] [e2eprof] [ncu] [ncuts] [ncuattn] [profile] [e2e] [e2eg]
# Logs and results go to $OUT (default: /tmp/qllm_out).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/qllm_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
# The image's default CC/CXX wrap a toolchain whose statically linked libstdc++ crashes when
# torch formats an integer into an error message; the system compiler builds a working extension.
if [[ -x /usr/bin/g++ ]]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
stages="${*:-build test bench}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# Same-build A/B of bench_layer.py: two settings alternating twice, each run in its own process.
#   ab_layer PREFIX GREP NAME_A "ENV_A" "FLAGS_A" NAME_B "ENV_B" "FLAGS_B" BENCH_ARGS...
# (ENV_*: VAR=value words or empty; results in $OUT/PREFIX_NAME_ROUND.json)
ab_layer() {
  local prefix=$1 pat=$2 rep v e f
  local -a names=("$3" "$6") envs=("$4" "$7") flags=("$5" "$8")
  shift 8
  for rep in 1 2; do
    for v in 0 1; do
      stamp "$prefix: ${names[v]} (round $rep)"
      e=${envs[v]}; f=${flags[v]}
      # shellcheck disable=SC2086  # e, f: zero or more words
      env $e timeout 150 python3 benchmarks/bench_layer.py "$@" $f \
        --out "$OUT/${prefix}_${names[v]}_$rep.json" 2>&1 | grep "$pat"
    done
  done
}

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
  timeout 320 python3 -m pytest -q --maxfail=20 -p no:cacheprovider tests/test_cuda.py tests/test_cuda_select.py 2>&1 | tee "$OUT/test_cuda.log" | tail -60
  stamp "tests done"
fi
if [[ " $stages " == *" ttier "* ]]; then
  stamp "tiered fast path tests (tests/test_cuda_tiers.py)"
  timeout 300 python3 -m pytest -q -x -rs -p no:cacheprovider tests/test_cuda_tiers.py 2>&1 | tee "$OUT/test_cuda_tiers.log" \
    | grep -v "FutureWarning\|return forward_call\|^\s*$" | tail -40
  stamp "tiered tests done"
fi
if [[ " $stages " == *" e2etier "* ]]; then
  stamp "e2e with tiered memory: 128K untiered vs tiered (graph decode), 1M tiered"
  timeout 560 python3 benchmarks/bench_e2e.py --tiered --cuda-graph --skip-dense --long-tokens 0 \
    --out "$OUT/e2e_tiers_h100.json" 2>&1 | tee "$OUT/e2e_tiers.log" | grep -v "Warning\|warn" | tail -30
  stamp "e2e tiers done"
fi
if [[ " $stages " == *" tmodel "* ]]; then
  stamp "whole-model tests (tests/test_cuda_model.py: patched tiny Llama, graph decoder, generate)"
  timeout 300 python3 -m pytest -q -rs -p no:cacheprovider -s tests/test_cuda_model.py 2>&1 | tee "$OUT/test_cuda_model.log" \
    | grep -v "FutureWarning\|return forward_call\|^\s*$" | tail -40
  stamp "whole-model tests done"
fi
if [[ " $stages " == *" tfused "* ]]; then
  stamp "fused RMSNorm / SiLU-gate kernels (tests/test_cuda_fused.py, benchmarks/bench_fused.py)"
  timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_fused.py 2>&1 | tee "$OUT/test_cuda_fused.log" \
    | grep -v "FutureWarning\|return forward_call\|^\s*$" | tail -40
  timeout 200 python3 benchmarks/bench_fused.py --out "$OUT/bench_fused.json" 2>&1 | tee "$OUT/bench_fused.log" | tail -12
  stamp "fused kernels done"
fi
if [[ " $stages " == *" tdecode "* ]]; then
  stamp "decode-step (CUDA graph) tests"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -k decode_step tests/test_cuda.py 2>&1 | tee "$OUT/test_decode.log" | tail -30
  stamp "decode-step tests done"
fi
if [[ " $stages " == *" bdecode "* ]]; then
  stamp "decode bench only (eager + graph, 128K)"
  timeout 200 python3 benchmarks/bench_layer.py --prefill --decode-at 131072 \
    --out "$OUT/layer_decode.json" 2>&1 | tee "$OUT/bench_decode.log" | grep "decode\|dense baseline\|Error\|error"
fi
if [[ " $stages " == *" test1 "* ]]; then
  stamp "attend tests with 128-row attention CTAs (QLLM_ATTN_MI=2)"
  QLLM_ATTN_MI=2 timeout 200 python3 -m pytest -q -p no:cacheprovider -k attend_cuda tests/test_cuda.py 2>&1 | tail -5
fi
if [[ " $stages " == *" bench1 "* ]]; then
  stamp "bench with QLLM_ATTN_MI=2"
  QLLM_ATTN_MI=2 timeout 200 python3 benchmarks/bench_layer.py --prefill 32768 131072 --decode-at 131072 \
    --out "$OUT/layer_mi2.json" 2>&1 | tee "$OUT/bench_mi2.log" | grep "prefill\|decode"
fi
if [[ " $stages " == *" test8 "* ]]; then
  stamp "attend tests with 8-warp 128-row attention CTAs (QLLM_ATTN_WARPS=8)"
  QLLM_ATTN_WARPS=8 timeout 200 python3 -m pytest -q -p no:cacheprovider -k "attend_cuda or decode_step" tests/test_cuda.py 2>&1 | tail -5
fi
if [[ " $stages " == *" bench8 "* ]]; then
  stamp "bench with QLLM_ATTN_WARPS=8 (prefill 32K, 128K)"
  QLLM_ATTN_WARPS=8 timeout 200 python3 benchmarks/bench_layer.py --prefill 32768 131072 --decode-at \
    --out "$OUT/layer_w8.json" 2>&1 | tee "$OUT/bench_w8.log" | grep "prefill\|decode"
fi
if [[ " $stages " == *" pdecode "* ]]; then
  stamp "profile of graph decode steps at 128K"
  timeout 200 python3 benchmarks/bench_layer.py --prefill --decode-at 131072 --repeats 1 --profile-decode-graph 131072 \
    --out "$OUT/layer_pdecode.json" 2>&1 | tee "$OUT/pdecode.log" | grep -v "^ *$" | grep "kernel\|gemv\|Name\|decode\|Self CUDA\|nvjet\|reduce" | head -30
fi
if [[ " $stages " == *" probe "* ]]; then
  stamp "wgmma probe: descriptors for QK^T / PV tiles, warpgroup rate (benchmarks/micro/wgmma_probe.cu)"
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a benchmarks/micro/wgmma_probe.cu -o /tmp/wgmma_probe \
    && timeout 120 /tmp/wgmma_probe 2>&1 | tee "$OUT/wgmma_probe.txt"
fi
if [[ " $stages " == *" mma "* ]]; then
  # the mma.sync attention kernel (the default is wgmma in the default sm_90a build)
  stamp "attend tests with QLLM_ATTN_WGMMA=0"
  QLLM_ATTN_WGMMA=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider -k "attend_cuda or decode_step" tests/test_cuda.py 2>&1 | tail -15
  stamp "layer benchmark with QLLM_ATTN_WGMMA=0"
  QLLM_ATTN_WGMMA=0 timeout 240 python3 benchmarks/bench_layer.py --prefill 32768 131072 524288 --decode-at 131072 \
    --out "$OUT/layer_mma.json" 2>&1 | tee "$OUT/bench_mma.log" | grep "prefill\|decode\|rror"
fi
# Nsight Compute on the PATH or in its default install folder
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
# A/B of kernel knobs in one call: the CUDA tests selected by PYTEST_K under TEST_ENV, then the
# layer benchmark once per VAR=VALUE argument ($OUT/layer_VAR_VALUE.json).
#   knob_ab TEST_ENV PYTEST_K "BENCH ARGS" VAR=VALUE...
knob_ab() {
  local test_env=$1 k=$2 bench_args=$3 cfg
  shift 3
  stamp "CUDA tests ($k) with $test_env"
  env "$test_env" timeout 200 python3 -m pytest -q -x -p no:cacheprovider -k "$k" tests/test_cuda.py 2>&1 | tail -2
  for cfg in "$@"; do
    stamp "layer benchmark with $cfg"
    # shellcheck disable=SC2086  # bench_args: several arguments
    env "$cfg" timeout 200 python3 benchmarks/bench_layer.py $bench_args \
      --out "$OUT/layer_${cfg//=/_}.json" 2>&1 | grep "prefill\|decode\|rror"
  done
}
if [[ " $stages " == *" tsab "* ]]; then
  # token-score kernels: mma.sync, wgmma with two Q stages, with one (the default)
  knob_ab QLLM_TSCORE_STAGES=2 attend_cuda "--prefill 32768 131072 --decode-at" \
    QLLM_TSCORE_WGMMA=0 QLLM_TSCORE_STAGES=2 QLLM_TSCORE_STAGES=1
fi
if [[ " $stages " == *" tsorder "* ]]; then
  # token-score CTAs heaviest key tile first (the default) against key order
  knob_ab QLLM_TSCORE_ORDER=0 attend_cuda "--prefill 32768 131072 --decode-at" \
    QLLM_TSCORE_ORDER=0 QLLM_TSCORE_ORDER=1
fi
if [[ " $stages " == *" microsel "* ]]; then
  # select_kernel / combine_kernel micro-benchmark, this tree against the one in .base/ (carried: a
  # copy of an earlier commit's csrc/ with this tree's benchmarks/micro/), built side by side
  stamp "micro select: build"
  mflags="-O3 -std=c++20 -arch=sm_90 -Icsrc/include -Icsrc"
  nvcc $mflags benchmarks/micro/select_combine.cu -o /tmp/msel_new > "$OUT/micro_build.log" 2>&1 &
  if [[ -d .base ]]; then (cd .base && nvcc $mflags benchmarks/micro/select_combine.cu -o /tmp/msel_base) >> "$OUT/micro_build.log" 2>&1; fi
  wait
  for v in base new; do
    [[ -x /tmp/msel_$v ]] || continue
    stamp "micro select: $v"
    timeout 120 /tmp/msel_$v 2>&1 | tee "$OUT/micro_select_$v.txt"
  done
fi
if [[ " $stages " == *" micropc "* ]]; then
  # the attention's pipeline shape on synthetic full tiles: the shipped coupled CTA against a producer
  # warp + two consumer warpgroups with mbarriers (benchmarks/micro/pc_attention.cu; outputs compared)
  stamp "pipeline shape micro (benchmarks/micro/pc_attention.cu)"
  if nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc benchmarks/micro/pc_attention.cu -o /tmp/pca \
      > "$OUT/micro_pc_build.log" 2>&1; then
    # PC_SHAPES: "rows keys" pairs separated by commas (512 rows and >= 2752 keys add the row-tile balance runs)
    IFS=, read -r -a pc_shapes <<< "${PC_SHAPES:-512 2560,512 1536,2048 2560}"
    for shape in "${pc_shapes[@]}"; do
      # shellcheck disable=SC2086  # two arguments
      timeout 60 /tmp/pca $shape 2>&1 | tee -a "$OUT/micro_pc.txt"
    done
    if [[ " $stages " == *" ncupc "* && -n "$NCU" ]]; then
      # the first launch of each variant (its correctness run): pipes, stalls, shared-memory traffic
      stamp "ncu of the pipeline-shape variants"
      timeout 240 "$NCU" --launch-count 6 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        /tmp/pca 512 2560 > "$OUT/ncu_pc.txt" 2>&1
      grep -E "coupled_kernel|pc_kernel|Duration|Tensor|Issue Slots|Shared|Stall|Warp Cycles|Pipe" "$OUT/ncu_pc.txt" | head -80
    fi
  else
    tail -20 "$OUT/micro_pc_build.log"
  fi
fi
if [[ " $stages " == *" gemm "* ]]; then
  stamp "projection GEMMs one by one vs concatenated (benchmarks/micro/gemm_fuse.py)"
  timeout 120 python3 benchmarks/micro/gemm_fuse.py --out "$OUT/gemm_fuse.json" 2>&1 | tee "$OUT/gemm_fuse.log" | tail -6
fi
if [[ " $stages " == *" resgemm "* ]]; then
  stamp "residual add apart vs folded into the GEMM (benchmarks/micro/residual_gemm.py)"
  timeout 120 python3 benchmarks/micro/residual_gemm.py --out "$OUT/residual_gemm.json" 2>&1 | tee "$OUT/residual_gemm.log" | tail -6
fi
if [[ " $stages " == *" microseam "* ]]; then
  # the seam launch by phase: per-launch time of six variants and a %globaltimer trace of each,
  # this tree against the one in .base/ (when carried), built side by side
  stamp "micro seam: build"
  mflags="-O3 -std=c++20 -arch=sm_90 -Icsrc/include -Icsrc"
  # variants of this tree: MSEAM_VARIANTS="name=nvcc flags;..." (default: the defaults alone)
  IFS=';' read -r -a mvars <<< "${MSEAM_VARIANTS:-new=}"
  names=(base)
  for nv in "${mvars[@]}"; do
    n=${nv%%=*}; names+=("$n")
    # shellcheck disable=SC2086  # flags: several arguments
    nvcc $mflags ${nv#*=} benchmarks/micro/seam_trace.cu -o "/tmp/mseam_$n" > "$OUT/micro_seam_build_$n.log" 2>&1 &
  done
  if [[ -d .base ]]; then (cd .base && nvcc $mflags benchmarks/micro/seam_trace.cu -o /tmp/mseam_base) >> "$OUT/micro_seam_build.log" 2>&1; fi
  wait
  for v in "${names[@]}"; do
    [[ -x /tmp/mseam_$v ]] || continue
    stamp "micro seam: $v"
    timeout 120 /tmp/mseam_$v 2>&1 | tee "$OUT/micro_seam_$v.txt"
  done
fi
if [[ " $stages " == *" seamab "* ]]; then
  # the seam kernel between execution blocks against its four kernels one by one
  knob_ab QLLM_SEAM=0 attend_cuda "" QLLM_SEAM=0 QLLM_SEAM=1
fi
if [[ " $stages " == *" mergeab "* ]]; then
  # the seam's merged selection (default) against QLLM_SEAM_MERGE=0 (round 10's seam): 128K and 512K prefill
  ab_layer ab_merge "prefill\|rror" 0 "QLLM_SEAM_MERGE=0" "" 1 "QLLM_SEAM_MERGE=1" "" \
    --prefill 131072 524288 --decode-at --no-dense --repeats 5
fi
if [[ " $stages " == *" bench10 "* ]]; then
  # the shipped path's 128K and 512K prefill in 10 processes of their own (3 repeats each, no dense):
  # the layer table's qllm rows are the medians of these
  for rep in $(seq 1 10); do
    stamp "layer, process $rep of 10"
    timeout 100 python3 benchmarks/bench_layer.py --prefill 131072 524288 --decode-at --no-dense --repeats 3 \
      --out "$OUT/med_$rep.json" 2>&1 | grep "prefill\|rror"
  done
fi
if [[ " $stages " == *" kvab "* ]]; then
  # the prefill chunks' K/V projections written in place (--kv-in-place: kv_slots) against copied
  # into the store (default): 128K and 512K
  ab_layer ab_kv "prefill\|projections\|rror" inplace "" "--kv-in-place" copy "" "" \
    --prefill 131072 524288 --decode-at --no-dense --repeats 5
fi
if [[ " $stages " == *" pairab "* ]]; then
  # the attention grid with heavy / light row tiles paired (default) against the natural order
  # (QLLM_ATTN_PAIR=0): 128K and 512K prefill
  ab_layer ab_pair "prefill\|rror" pair "QLLM_ATTN_PAIR=1" "" natural "QLLM_ATTN_PAIR=0" "" \
    --prefill 131072 524288 --decode-at --no-dense --repeats 5
fi
if [[ " $stages " == *" earlyab "* ]]; then
  # the attention started while the seam runs (default: it waits on the seam's counters) against
  # its launch after the seam's end (QLLM_ATTN_EARLY=0): 128K and 512K prefill
  ab_layer ab_early "prefill\|rror" early "QLLM_ATTN_EARLY=1" "" late "QLLM_ATTN_EARLY=0" "" \
    --prefill 131072 524288 --no-dense --repeats 3
fi
if [[ " $stages " == *" e2eearly "* ]]; then
  # 8B-shaped model, 128K prefill: the early start (default) against QLLM_ATTN_EARLY=0, one process
  # per run, alternating twice
  for rep in 1 2; do
    for v in 1 0; do
      stamp "e2e QLLM_ATTN_EARLY=$v (round $rep)"
      QLLM_ATTN_EARLY=$v timeout ${E2E_TIMEOUT:-200} python3 benchmarks/bench_e2e.py --skip-dense --long-tokens 0 \
        --million-tokens 0 --new-tokens 8 --out "$OUT/e2e_early_${v}_$rep.json" 2>&1 | grep "qllm\|rror" | tail -5
    done
  done
fi
if [[ " $stages " == *" cutab "* ]]; then
  # graph decode at 128K: block-cut tokens replaying the second graph (default) against the ordinary
  # path (--no-cut-graph)
  ab_layer ab_cutgraph "decode\|rror" cut "" "" nocut "" "--no-cut-graph" --prefill --decode-at 131072
fi
if [[ " $stages " == *" ncu "* ]]; then
  # hardware counters of one attention and one token-score launch (32K prefill, 20th execution
  # block of the warm-up), for the mma.sync kernel and the wgmma one (needs the sm_90a build)
  for v in 0 1; do
    stamp "ncu, QLLM_ATTN_WGMMA=$v"
    QLLM_ATTN_WGMMA=$v timeout 200 "$NCU" --clock-control none -k "regex:attn_kernel|tscore_kernel" --launch-skip 40 \
      --launch-count 2 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      python3 benchmarks/bench_layer.py --prefill 32768 --decode-at --repeats 1 --out /tmp/ncu_layer.json \
      > "$OUT/ncu_wg$v.txt" 2>&1
    grep -i "duration\|throughput\|stall\|warp cycles per issued\|issued ipc\|achieved occ\|registers\|L2 Hit\|==PROF==\|error" "$OUT/ncu_wg$v.txt" | head -40
  done
fi
if [[ " $stages " == *" ncuts "* ]]; then
  # counters of one wgmma token-score launch (32K prefill, 21st execution block of the warm-up)
  stamp "ncu, tscore_wg_kernel"
  timeout 200 "$NCU" --clock-control none -k "regex:tscore_wg_kernel" --launch-skip 20 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats \
    python3 benchmarks/bench_layer.py --prefill 32768 --decode-at --repeats 1 --out /tmp/ncu_layer.json \
    > "$OUT/ncu_tscore.txt" 2>&1
  grep -i "duration\|throughput\|stall\|warp cycles per issued\|issued ipc\|achieved occ\|registers\|waves\|grid size\|==PROF==\|error" "$OUT/ncu_tscore.txt" | head -40
fi
if [[ " $stages " == *" ncuseam "* ]]; then
  # counters of one seam launch with a cut and a top-k (the warm-up's 16K prefill and 4 decode
  # steps launch 42 seams; the 63rd is in the second chunk of the 32K prefill) and of one qcomb
  # launch over a whole 8192-row chunk (the 32K prefill's second call)
  for kv in "seam_kernel 62" "qcomb_kernel 7"; do
    set -- $kv
    stamp "ncu, $1"
    timeout 200 "$NCU" --clock-control none -k "regex:$1" --launch-skip "$2" --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section SchedulerStats \
      python3 benchmarks/bench_layer.py --prefill 32768 --decode-at --repeats 1 --out /tmp/ncu_layer.json \
      > "$OUT/ncu_$1.txt" 2>&1
    grep -i "duration\|throughput\|warp cycles per issued\|achieved occ\|registers\|theoretical occ\|block limit\|==PROF==\|error" \
      "$OUT/ncu_$1.txt" | head -30
  done
fi
if [[ " $stages " == *" e2eprof "* ]]; then
  # one qllm prefill of the 8B-shaped model at 128K: wall time, then GPU time by kernel
  stamp "e2e prefill profile"
  timeout ${E2E_TIMEOUT:-300} python3 benchmarks/bench_e2e.py --profile-prefill --skip-dense --long-tokens 0 ${E2E_ARGS:-} \
    --million-tokens 0 --out "$OUT/e2e_prefill_profile.json" 2>&1 | grep -v "FutureWarning\|return forward_call" \
    | tee "$OUT/e2e_prefill_profile.log" | tail -50
  stamp "e2e prefill profile done"
fi
if [[ " $stages " == *" ncuattn "* ]]; then
  # counters of one wgmma attention launch (32K prefill, 41st execution block of the warm-up) and
  # its per-instruction source page (executed counts, stall samples) as gzipped CSV
  stamp "ncu, attn_kernel"
  timeout 200 "$NCU" --clock-control none -k "regex:attn_kernel" --launch-skip 40 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section InstructionStats \
    --section SchedulerStats --section Occupancy -o /tmp/ncu_attn -f \
    python3 benchmarks/bench_layer.py --prefill 32768 --decode-at --repeats 1 --out /tmp/ncu_layer.json > /tmp/ncu_attn.log 2>&1
  "$NCU" -i /tmp/ncu_attn.ncu-rep --print-details all > "$OUT/ncu_attn.txt" 2>&1
  "$NCU" -i /tmp/ncu_attn.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip -c > "$OUT/ncu_attn_src.csv.gz"
  grep -i "duration\|issued instructions  \|issued warp\|registers\|warp cycles per issued\|==PROF==\|error" "$OUT/ncu_attn.txt" | head -20
fi
if [[ " $stages " == *" diag "* ]]; then
  stamp "diag: mixed CUDA/CPU arguments under cuda-gdb"
  cat > /tmp/mixed.py <<'PY'
import torch, qllm, sys
pool = torch.randn(4, 1, 2, 2, device="cuda")
for dt in (torch.int32, torch.int64):
    print("gather", dt, flush=True)
    try:
        torch.ops.qllm.gather_slots(pool, torch.tensor([0, 4], dtype=dt, device="cuda"))
        print("no error", flush=True)
    except ValueError as e:
        print("VALUEERROR", e, flush=True)
PY
  timeout 150 cuda-gdb -batch -ex run -ex "bt 25" --args python3 /tmp/mixed.py 2>&1 | grep -v "^\[New Thread\|^\[Thread\|Detaching\|Cuda Driver error\|warning: Cuda" | tail -45 | tee "$OUT/diag.log"
fi
if [[ " $stages " == *" bench "* ]]; then
  stamp "bench"
  timeout 300 python3 benchmarks/bench_layer.py --out "$OUT/layer_h100.json" 2>&1 | tee "$OUT/bench.log"
  stamp "bench done"
fi
if [[ " $stages " == *" profile "* ]]; then
  timeout 200 python3 benchmarks/bench_layer.py --prefill 131072 --decode-at --repeats 1 --profile 131072 --profile-decode 131072 \
    --out "$OUT/layer_profile.json" 2>&1 | tee "$OUT/profile.log" | grep -v "^ *$" | tail -75
fi
if [[ " $stages " == *" e2eg "* ]]; then
  # 8B-shaped model at 128K: qllm eager decode, qllm decode as CUDA-graph replays (GraphDecoder), dense; no long rows
  stamp "e2e graph decode"
  timeout ${E2E_TIMEOUT:-300} python3 benchmarks/bench_e2e.py --cuda-graph --long-tokens 0 --million-tokens 0 \
    --out "$OUT/e2e_graph.json" 2>&1 | grep -v "FutureWarning\|return forward_call" | tee "$OUT/e2e_graph.log"
  stamp "e2e graph decode done"
fi
if [[ " $stages " == *" e2e "* ]]; then
  # whole Llama-3-8B-shaped model (random weights): qllm vs dense at 128K, then qllm alone on long prompts
  stamp "e2e"
  timeout ${E2E_TIMEOUT:-420} python3 benchmarks/bench_e2e.py --out "$OUT/e2e_h100.json" 2>&1 | grep -v "FutureWarning\|return forward_call" | tee "$OUT/e2e.log"
  stamp "e2e done"
fi
