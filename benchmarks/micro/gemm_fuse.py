"""Projection GEMMs one by one against one GEMM over the concatenated weights.

Llama-3-8B shapes, bf16, one 8192-token prefill chunk (M = 8192) and one decode
token (M = 1): q/k/v (4096 -> 4096 + 1024 + 1024) and the MLP's gate/up
(4096 -> 14336 + 14336).  CUDA-event medians of 30 runs after warm-up, in one
process; the concatenated product is checked equal to the separate ones.  Writes
JSON with the GPU and versions.

    python benchmarks/micro/gemm_fuse.py --out /tmp/gemm_fuse.json
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
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_fuse.py needs a CUDA device")
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, outs in (("qkv", (4096, 1024, 1024)), ("gate_up", (14336, 14336))):
        ws = [torch.randn(n, 4096, generator=g, device=dev, dtype=dt) * 0.02 for n in outs]
        wcat = torch.cat(ws, 0)
        for m in (8192, 1):
            x = torch.randn(m, 4096, generator=g, device=dev, dtype=dt)
            sep = cuda_median_ms(lambda: [x @ w.T for w in ws], 30, 5)
            cat = cuda_median_ms(lambda: x @ wcat.T, 30, 5)
            same = torch.equal(torch.cat([x @ w.T for w in ws], 1), x @ wcat.T)
            rows.append({"gemm": name, "m": m, "separate_ms": sep, "concatenated_ms": cat, "bitwise_equal": same})
            print(f"{name:8s} M={m:5d}: separate {sep:.4f} ms  concatenated {cat:.4f} ms  "
                  f"({sep / cat:.3f}x)  bitwise equal: {same}", flush=True)
    write_gpu_rows(args.out, rows)


if __name__ == "__main__":
    main()
