"""Question: how fast does qllm read a 16K-token prompt on the CPU, against the unpatched model (SDPA)?

SmolLM2-135M-Instruct, float32, one process, both measured on the same prompt; prefill only
(logits of the last token).  Prints tokens/s and writes JSON.

    python benchmarks/cpu_prefill.py --tokens 16384 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import qllm
from qllm.data import load_haystack

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info, write_json  # noqa: E402


def _prefill_seconds(model, ids, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--output", default="cpu_prefill.json")
    a = ap.parse_args()

    model, tok = qllm.load_model()
    ids = tok(load_haystack(), return_tensors="pt")["input_ids"][:, : a.tokens]
    n = ids.shape[1]
    # qllm reads with a question (question heads of the shipped calibration: the default), as a user would
    configs = {"qllm-small": qllm.QLLMConfig.small(), "qllm-default": qllm.QLLMConfig()}
    question = "What is the secret number?"
    # warm-up (allocator, threads) on a short prefix
    _prefill_seconds(model, ids[:, :512], 1)
    rows = []
    dense = _prefill_seconds(model, ids, a.repeats)
    rows.append({"variant": "dense-sdpa", "tokens": n, "seconds": dense, "tok_per_s": n / dense})
    for name, cfg in configs.items():
        with qllm.patched(model, cfg):
            qllm.set_question(model, question, tokenizer=tok)
            s = _prefill_seconds(model, ids, a.repeats)
        rows.append({"variant": name, "tokens": n, "seconds": s, "tok_per_s": n / s, "speedup_vs_dense": dense / s,
                     "question": question,
                     "config": {k: getattr(cfg, k) for k in ("n_init", "n_local", "block_size", "topk",
                                                              "exc_block_size", "chunk_size", "question_heads")}})
    print(f"{'variant':>14} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs dense':>8}")
    for r in rows:
        print(f"{r['variant']:>14} {r['tokens']:>7} {r['seconds']:8.1f} {r['tok_per_s']:8.0f} "
              f"{dense / r['seconds']:8.2f}x")
    path = write_json(a.output, {"question": "CPU prefill speed, qllm vs unpatched SDPA",
                                 "model": "SmolLM2-135M-Instruct Q4_1 (float32)", "repeats": a.repeats,
                                 "machine": machine_info(), "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
