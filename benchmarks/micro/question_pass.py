"""Host cost of one layer's question encoding (the question pass runs it once per layer per prompt,
host-bound on the GPU): ``encode_question`` (the question's causal attention written out, the
fixed-position queries computed once) against the generic sequence it replaces (a scratch streaming
``LayerMemory`` and ``_exec_block`` over the question, then the question vector from the scratch's
token scores).  Llama-3-8B head geometry, a 32-token question; both in one process, alternating, on
the device given (default CPU); the outputs are compared bitwise.

    python benchmarks/micro/question_pass.py [--device cuda] [--reps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import qllm
from qllm.attention import RopeTable, _exec_block, _fixed_query, encode_question
from qllm.memory import LayerMemory
from qllm.retrieval import question_vector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None, help="JSON path for the result")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = qllm.QLLMConfig()
    hq, hkv, T, d = 32, 8, 32, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(hq, T, d, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(hkv, T, d, generator=g).to(dev, torch.bfloat16)
    v = torch.randn(hkv, T, d, generator=g).to(dev, torch.bfloat16)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(cfg.max_rel_position + 1).float(), inv)
    emb = torch.cat([ang, ang], dim=-1)
    rope = RopeTable(emb.cos().to(dev), emb.sin().to(dev))
    mem = LayerMemory(cfg, hq, hkv, d, torch.bfloat16, dev)
    scaling = d ** -0.5

    def earlier():
        scratch = LayerMemory(cfg.replace(strategy="streaming", n_init=0, exc_block_size=T),
                              hq, hkv, d, torch.bfloat16, dev)
        q_fix = _fixed_query(q.float(), rope, cfg.n_local)
        out = _exec_block(scratch, q, k, v, rope, scaling, q_fix=q_fix)
        return out, question_vector(q_fix, scratch.tail_scores, cfg), q_fix

    def now():
        return encode_question(mem, q, k, v, rope, scaling, return_fixed=True)

    a, b = earlier(), now()
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = {"earlier": [], "now": []}
    with torch.no_grad():
        for _ in range(args.reps):
            for name, fn in (("earlier", earlier), ("now", now)):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    print(f"{dev}: question encoding of one layer ({T} tokens, {hq}/{hkv} heads, d {d}), median of {args.reps}: "
          f"generic block {med['earlier']:.3f} ms, encode_question {med['now']:.3f} ms "
          f"({med['now'] / med['earlier']:.3f}x); outputs bitwise equal: {same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "micro/question_pass.py", "device": str(dev), "torch": torch.__version__,
                       "python": sys.version.split()[0], "reps": args.reps, "median_ms": med,
                       "bitwise_equal": same}, f, indent=1)


if __name__ == "__main__":
    main()
