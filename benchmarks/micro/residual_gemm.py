"""The decoder layer's residual add, apart or folded into the projection GEMM.

Llama-3-8B shapes, bf16, one prefill chunk of M rows: o_proj (4096 -> 4096) and the MLP's
down_proj (14336 -> 4096), each followed by ``residual + out``.  Three ways, CUDA-event medians
of 30 runs after warm-up, alternating, in one process:

* ``apart``: ``r + x @ W.T`` (the GEMM writes its output, an add kernel reads it and the residual);
* ``addmm``: ``torch.addmm(r, x, W.T)`` (cuBLAS adds the residual in its epilogue, beta = 1);
* ``addmm_``: ``r.addmm_(x, W.T)`` (the same, in place into the residual).

Each fold is compared with the f32 product + residual: its error must not exceed the two
roundings of ``apart``.  Writes JSON with the GPU and versions.

    python benchmarks/micro/residual_gemm.py --out /tmp/residual_gemm.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import cuda_median_ms, write_gpu_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8192, 16384], help="M of the chunk")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("residual_gemm.py needs a CUDA device")
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, k in (("o_proj", 4096), ("down_proj", 14336)):
        w = torch.randn(4096, k, generator=g, device=dev, dtype=dt) * k ** -0.5
        for m in args.rows:
            x = torch.randn(m, k, generator=g, device=dev, dtype=dt)
            r = torch.randn(m, 4096, generator=g, device=dev, dtype=dt)
            r2 = r.clone()
            ways = {
                "apart": lambda: r + x @ w.T,
                "addmm": lambda: torch.addmm(r, x, w.T),
                "addmm_": lambda: r2.addmm_(x, w.T),
            }
            ms = {n: [] for n in ways}
            for _ in range(3):  # alternate the three, 10 timed runs each per turn
                for n, fn in ways.items():
                    ms[n].append(cuda_median_ms(fn, 10, 3))
            med = {n: sorted(v)[1] for n, v in ms.items()}
            ref = r.float() + x.float() @ w.float().T
            err = {n: (ways[n]().float() - ref).abs().max().item() for n in ("apart", "addmm")}
            row = {"gemm": name, "m": m, "k": k, **{f"{n}_ms": v for n, v in med.items()},
                   "max_err_apart": err["apart"], "max_err_addmm": err["addmm"]}
            rows.append(row)
            print(f"{name:9s} M={m:5d}: apart {med['apart']:.4f} ms  addmm {med['addmm']:.4f}  "
                  f"addmm_ {med['addmm_']:.4f}  (apart/addmm {med['apart'] / med['addmm']:.3f}x)  "
                  f"max err vs f32: apart {err['apart']:.3g} addmm {err['addmm']:.3g}", flush=True)
    write_gpu_rows(args.out, rows)


if __name__ == "__main__":
    main()
