"""How much faster are qllm's fused RMSNorm and SiLU-gate kernels (csrc/cuda/fused.cu) than the
Hugging Face code they replace, on the shapes of an 8B Llama's prefill chunk?

Rows: RMSNorm over [rows, hidden] -- Hugging Face's LlamaRMSNorm forward (float32 copies, ~6
kernels) against torch.ops.qllm.rms_norm -- and the MLP's gate product over [rows,
intermediate] -- F.silu(gate) * up against torch.ops.qllm.silu_mul; default shapes: 8192-token
chunks of Llama-3-8B (hidden 4096, intermediate 14336) and SmolLM2-135M (576, 1536), and one
decode token.  bf16 by default.  Each call is timed with CUDA events; medians over repeats after
warm-up, baseline and fused in the same process.  Also records how many outputs are bitwise
equal (RMSNorm: all but rare 1-ulp differences; silu_mul: all).

Writes JSON (--out, default benchmarks/results/fused.json):
{"machine": {gpu, torch, ...}, "dtype", "rows": [{"op", "rows", "cols", "hf_ms", "fused_ms",
"speedup", "fused_GBps", "equal_fraction"}]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cuda_median_ms, machine_info  # noqa: E402
import qllm  # noqa: E402,F401  (registers torch.ops.qllm)

NORM_SHAPES = [(8192, 4096), (8192, 576), (1, 4096)]
MLP_SHAPES = [(8192, 14336), (8192, 1536), (1, 14336)]


def bench_norm(rows: int, cols: int, dtype, repeats: int, warmup: int) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator(device="cuda").manual_seed(rows + cols)
    x = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g) * 8
    hf = LlamaRMSNorm(cols, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(cols, device="cuda", generator=g) + 0.5)
        want, got = hf(x), torch.ops.qllm.rms_norm(x, hf.weight, 1e-5)
        hf_ms = cuda_median_ms(lambda: hf(x), repeats, warmup)
        fused_ms = cuda_median_ms(lambda: torch.ops.qllm.rms_norm(x, hf.weight, 1e-5), repeats, warmup)
    moved = 2 * x.numel() * x.element_size() + hf.weight.numel() * x.element_size()
    return {"op": "rms_norm", "rows": rows, "cols": cols, "hf_ms": hf_ms, "fused_ms": fused_ms,
            "speedup": hf_ms / fused_ms, "fused_GBps": moved / fused_ms / 1e6,
            "equal_fraction": float((got == want).float().mean())}


def bench_mlp_gate(rows: int, cols: int, dtype, repeats: int, warmup: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(rows * 3 + cols)
    gate = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g) * 3
    up = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
    want, got = F.silu(gate) * up, torch.ops.qllm.silu_mul(gate, up)
    hf_ms = cuda_median_ms(lambda: F.silu(gate) * up, repeats, warmup)
    fused_ms = cuda_median_ms(lambda: torch.ops.qllm.silu_mul(gate, up), repeats, warmup)
    moved = 3 * gate.numel() * gate.element_size()
    return {"op": "silu_mul", "rows": rows, "cols": cols, "hf_ms": hf_ms, "fused_ms": fused_ms,
            "speedup": hf_ms / fused_ms, "fused_GBps": moved / fused_ms / 1e6,
            "equal_fraction": float((got == want).float().mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fused.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused: needs a CUDA GPU", file=sys.stderr)
        return 2
    if not hasattr(torch.ops.qllm, "rms_norm"):
        print("bench_fused: qllm was built without its CUDA kernels", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = [bench_norm(r, c, dtype, args.repeats, args.warmup) for r, c in NORM_SHAPES]
    rows += [bench_mlp_gate(r, c, dtype, args.repeats, args.warmup) for r, c in MLP_SHAPES]
    print(f"{'op':<9} {'rows':>6} {'cols':>6} {'HF ms':>9} {'fused ms':>9} {'speedup':>8} {'GB/s':>7} {'equal':>8}")
    for r in rows:
        print(f"{r['op']:<9} {r['rows']:>6} {r['cols']:>6} {r['hf_ms']:>9.4f} {r['fused_ms']:>9.4f} "
              f"{r['speedup']:>7.2f}x {r['fused_GBps']:>7.0f} {r['equal_fraction']:>8.6f}")
    payload = {"machine": machine_info(), "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
               "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
