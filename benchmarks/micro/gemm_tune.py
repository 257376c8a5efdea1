"""Can another GEMM algorithm run the 8B prefill's projections faster than torch's default pick?

The end-to-end 128K prefill spends ~2.5 s of its ~3.7 s in cuBLAS at ~730 TFLOP/s.  This micro
times the seven GEMMs of one Llama-3-8B decoder layer on one prefill chunk (M rows, bf16, as
``qllm.fused`` runs them: ``x @ W.T``, and ``r.addmm_(x, W.T)`` for o_proj / down_proj) three ways,
CUDA-event medians in one process:

* ``default``: torch's pick (cuBLAS, ``torch.backends.cuda.preferred_blas_library()`` as is);
* ``cublaslt``: ``preferred_blas_library("cublaslt")`` (cuBLASLt's heuristic first choice);
* ``tunable``: torch's TunableOp, which times every implementation it registers for the shape and
  keeps the fastest (``torch.cuda.tunable``; the kernels it chose are written to the JSON).

The tunable arm runs last (TunableOp is a process-wide switch); default and cublaslt alternate.
Each arm's result is compared with the default's (max abs difference).

    python benchmarks/micro/gemm_tune.py --out /tmp/gemm_tune.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cuda_median_ms, write_gpu_rows  # noqa: E402

# name, in features, out features, residual added in place (addmm_)
LAYER = (("q_proj", 4096, 4096, False), ("k_proj", 4096, 1024, False), ("v_proj", 4096, 1024, False),
         ("o_proj", 4096, 4096, True), ("gate_proj", 4096, 14336, False), ("up_proj", 4096, 14336, False),
         ("down_proj", 14336, 4096, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192, help="M of the chunk")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_tune.py needs a CUDA device")
    dev, dt, m = torch.device("cuda"), torch.bfloat16, args.rows
    g = torch.Generator(device=dev).manual_seed(0)
    cases = []
    for name, k, n, res in LAYER:
        w = torch.randn(n, k, generator=g, device=dev, dtype=dt) * k ** -0.5
        x = torch.randn(m, k, generator=g, device=dev, dtype=dt)
        r = torch.randn(m, n, generator=g, device=dev, dtype=dt) if res else None
        fn = (lambda x=x, w=w, r=r: r.addmm_(x, w.T)) if res else (lambda x=x, w=w: x @ w.T)
        cases.append((name, k, n, res, fn))

    default_lib = torch.backends.cuda.preferred_blas_library()
    ms = {c[0]: {"default": [], "cublaslt": []} for c in cases}
    outs = {}
    for turn in range(3):
        for arm in ("default", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(default_lib if arm == "default" else "cublaslt")
            for name, k, n, res, fn in cases:
                ms[name][arm].append(cuda_median_ms(fn, args.reps, 3))
                if turn == 0 and not res:
                    outs[(name, arm)] = fn().float()
    torch.backends.cuda.preferred_blas_library(default_lib)

    tun = torch.cuda.tunable
    tun.enable(True)
    tun.tuning_enable(True)
    tun.set_max_tuning_iterations(30)
    tun.set_filename(os.path.join(os.environ.get("OUT", "/tmp"), "tunableop_results.csv"))
    for name, k, n, res, fn in cases:
        fn()  # tunes this shape once
    torch.cuda.synchronize()
    tun.tuning_enable(False)
    for name, k, n, res, fn in cases:
        ms[name]["tunable"] = [cuda_median_ms(fn, args.reps, 3) for _ in range(3)]
        if not res:
            outs[(name, "tunable")] = fn().float()
    chosen = [list(map(str, r)) for r in tun.get_results()]
    tun.enable(False)

    rows, tot = [], {"default": 0.0, "cublaslt": 0.0, "tunable": 0.0}
    for name, k, n, res, fn in cases:
        med = {a: sorted(v)[1] for a, v in ms[name].items()}
        tflop = 2 * m * k * n / 1e12
        row = {"gemm": name, "m": m, "k": k, "n": n, "residual_in_place": res,
               **{f"{a}_ms": v for a, v in med.items()}, **{f"{a}_tflops": tflop / (v / 1e3) for a, v in med.items()}}
        for a in ("cublaslt", "tunable"):
            if (name, a) in outs:
                row[f"{a}_max_diff_vs_default"] = float((outs[(name, a)] - outs[(name, "default")]).abs().max())
        rows.append(row)
        for a in tot:
            tot[a] += med[a]
        print(f"{name:9s} {m}x{k}->{n}: " + "  ".join(f"{a} {med[a]:.4f} ms ({tflop / (med[a] / 1e3):.0f} TF/s)"
                                                   for a in med), flush=True)
    print("layer total: " + "  ".join(f"{a} {v:.4f} ms" for a, v in tot.items()), flush=True)
    rows.append({"gemm": "layer total", "m": m, **{f"{a}_ms": v for a, v in tot.items()},
                 "default_blas_library": str(default_lib), "tunableop_results": chosen})
    for r in chosen:
        print("tunableop:", r, flush=True)
    write_gpu_rows(args.out, rows)


if __name__ == "__main__":
    main()
