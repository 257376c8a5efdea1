"""Question: does the model answer a fact planted early in a ~6K-token text, per strategy?

SmolLM2-135M-Instruct (CPU), the small budget, the facts of ``qllm.data.fact_needles`` (none of them is
used by the question-head calibration) planted at several depths of the essay haystack; strategies in the
same process on the same prompts:

* ``full``        the unpatched model (dense attention over the whole text)
* ``streaming``   init + local window only
* ``infllm``      retrieval by the text's queries only
* ``qllm-repr``   + the question through block representatives (question_heads=None: the paper's term)
* ``qllm``        + the question through the model's calibrated question heads (the default)

    python benchmarks/needles.py --tokens 6000 --depths 0.1 0.2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import qllm
from qllm.data import build_needle_text, fact_needles

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info, write_json  # noqa: E402

STRATEGIES = {
    "full": dict(strategy="full"),
    "streaming": dict(strategy="streaming"),
    "infllm": dict(strategy="infllm"),
    "qllm-repr": dict(strategy="qllm", question_heads=None),
    "qllm": dict(strategy="qllm", question_heads="auto"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--output", default="needles_cpu.json")
    a = ap.parse_args()

    model, tok = qllm.load_model()
    cfg0 = qllm.QLLMConfig.small()
    rows = []
    print(f"{'fact':>10} {'depth':>5} " + " ".join(f"{s:>12}" for s in a.strategies), flush=True)
    for needle in fact_needles():
        for depth in a.depths:
            text = build_needle_text(tok, a.tokens, needle, depth)
            cells = []
            for name in a.strategies:
                cfg = cfg0.replace(**STRATEGIES[name])
                t = time.perf_counter()
                with torch.no_grad():
                    ans = qllm.generate(model, tok, text, needle.question, config=cfg, max_new_tokens=12)
                dt = time.perf_counter() - t
                ok = needle.answer in ans
                rows.append({"fact": needle.fact, "depth": depth, "strategy": name, "correct": ok, "answer": ans,
                             "expected": needle.answer, "seconds": round(dt, 2)})
                cells.append(f"{('yes' if ok else 'no'):>7} {dt:3.0f}s")
            print(f"{needle.answer:>10} {depth:>5.2f} " + " ".join(cells), flush=True)
            write_json(a.output, {"question": "planted-fact answers per strategy", "tokens": a.tokens,
                                  "model": "SmolLM2-135M-Instruct Q4_1",
                                  "config": {k: getattr(cfg0, k) for k in ("n_init", "n_local", "block_size",
                                                                           "topk", "repr_topk", "exc_block_size",
                                                                           "question_weight")},
                                  "machine": machine_info(), "rows": rows})
    print("\ncorrect answers per strategy:")
    for name in a.strategies:
        v = [r["correct"] for r in rows if r["strategy"] == name]
        print(f"  {name:>10}: {sum(v)}/{len(v)}")


if __name__ == "__main__":
    main()
