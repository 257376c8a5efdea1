"""Question: does the model find a pass key hidden in a long text, per strategy and length?

SmolLM2-135M-Instruct (trained on 8K tokens), pass key at several depths of an essay haystack,
strategies full / streaming / infllm / qllm in the same process, same prompt.

    python benchmarks/passkey.py --lengths 4096 8192 16384 32768 --depths 0.1 0.5 0.9
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import qllm
from qllm.data import build_needle_text, passkey_needle

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--strategies", nargs="+", default=["full", "streaming", "infllm", "qllm"])
    ap.add_argument("--max-full-tokens", type=int, default=16384, help="skip 'full' above this length (CPU time)")
    ap.add_argument("--time-budget", type=float, default=3600.0, help="stop starting new lengths after this many s")
    ap.add_argument("--output", default="passkey_cpu.json")
    a = ap.parse_args()

    model, tok = qllm.load_model()
    cfg0 = qllm.QLLMConfig.small()
    rows, t_start = [], time.perf_counter()
    print(f"{'tokens':>7} {'depth':>5} " + " ".join(f"{s:>10}" for s in a.strategies))
    for n in a.lengths:
        if time.perf_counter() - t_start > a.time_budget:
            print(f"time budget spent: stopping before {n} tokens")
            break
        for depth in a.depths:
            needle = passkey_needle(seed=n + int(depth * 100))
            text = build_needle_text(tok, n, needle, depth)
            cells = []
            for strat in a.strategies:
                if strat == "full" and n > a.max_full_tokens:
                    cells.append(f"{'skip':>10}")
                    continue
                cfg = cfg0.replace(strategy=strat)
                t = time.perf_counter()
                with torch.no_grad():
                    ans = qllm.generate(model, tok, text, needle.question, config=cfg, max_new_tokens=12)
                dt = time.perf_counter() - t
                ok = needle.answer in ans
                rows.append({"tokens": n, "depth": depth, "strategy": strat, "correct": ok,
                             "answer": ans, "expected": needle.answer, "seconds": round(dt, 2)})
                cells.append(f"{('yes' if ok else 'no'):>5} {dt:4.0f}s")
            print(f"{n:>7} {depth:>5.2f} " + " ".join(cells), flush=True)
        write_json(a.output, {"question": "pass key retrieval accuracy", "model": "SmolLM2-135M-Instruct Q4_1",
                              "config": {k: getattr(cfg0, k) for k in ("n_init", "n_local", "block_size", "topk",
                                                                       "repr_topk", "exc_block_size",
                                                                       "question_weight")},
                              "machine": machine_info(), "rows": rows})
    summary = {}
    for r in rows:
        summary.setdefault((r["tokens"], r["strategy"]), []).append(r["correct"])
    print("\naccuracy per length and strategy:")
    for (n, s), v in sorted(summary.items()):
        print(f"  {n:>7} {s:>10}: {sum(v)}/{len(v)}")


if __name__ == "__main__":
    main()
