"""Where the tiered CUDA path's prefill time goes (one Llama-3-8B-geometry attention layer,
no projections): untiered vs tiered attend_cuda over a 128K prompt in 8K calls, with the
host tier allocated during the run or reserved beforehand, and the cost of pinned allocation
itself.  Diagnostic only (prints; --out writes JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import qllm  # noqa: E402
from qllm import gpu as qgpu  # noqa: E402
from qllm.attention import RopeTable  # noqa: E402


def rope(P, D, theta=500000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return RopeTable(emb.cos().float(), emb.sin().float())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    torch.zeros(1, device=dev)  # CUDA context first
    # pinned allocation rate: 4 GiB in 32 MiB pieces (fresh memory; the caching host allocator keeps it)
    t0 = time.perf_counter()
    bufs = [torch.empty(16 * 1024 * 1024, dtype=torch.bfloat16, pin_memory=True) for _ in range(128)]
    res["pin_alloc_gib_s"] = 4.0 / (time.perf_counter() - t0)
    del bufs
    print("pinned allocation GiB/s:", res["pin_alloc_gib_s"], flush=True)
    hq, hkv, D, N, C = 32, 8, 128, a.tokens, 8192
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(hq, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(hkv, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(hkv, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    base = qllm.QLLMConfig()
    rt = rope(base.max_rel_position + 1, D)
    for name, cfg, pre in (("untiered", base, False), ("tiered", base.replace(device_blocks=a.budget), False),
                           ("tiered_host_reserved", base.replace(device_blocks=a.budget), True),
                           ("untiered_again", base, False)):
        mem = qgpu.CudaLayerMemory(cfg, hq, hkv, D, torch.bfloat16, dev, capacity=N + 64)
        if pre:
            mem._reserve_host((N - cfg.n_init) // cfg.block_size + 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(0, N, C):
            qgpu.attend_cuda(mem, q[:, s:s + C], k[:, s:s + C], v[:, s:s + C], rt, D ** -0.5)
        t_host = time.perf_counter() - t0
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        row = {"ms": 1e3 * t, "host_ms": 1e3 * t_host}
        if mem.tiered:
            row.update(mem.tier_stats())
        res[name] = row
        print(name, json.dumps(row), flush=True)
        del mem
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
