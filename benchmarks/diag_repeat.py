"""Run-to-run determinism of the CUDA attention path across processes: tests/test_cuda.py's
knob script (2 prefill calls of 2100 + 1500 tokens, Llama-3 heads, 2K-budget config, then 8 decode
steps) in N fresh processes per QLLM_ATTN_PAIR value, each result compared bitwise with the first
run's; for every differing tensor, where (prefill or decode columns) and by how much.

    python benchmarks/diag_repeat.py --runs 8 --pair 1 0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--pair", nargs="+", default=["1", "0"], help="QLLM_ATTN_PAIR values")
    args = ap.parse_args()
    from test_cuda import _KNOB_SCRIPT

    tmp = tempfile.mkdtemp()
    first = None
    for val in args.pair:
        for i in range(args.runs):
            path = os.path.join(tmp, f"r_{val}_{i}.pt")
            r = subprocess.run([sys.executable, "-c", _KNOB_SCRIPT, path], capture_output=True, text=True,
                               env=dict(os.environ, QLLM_ATTN_PAIR=val), timeout=300)
            if r.returncode:
                print(f"PAIR={val} run {i}: failed\n{r.stderr[-1500:]}", flush=True)
                continue
            res = torch.load(path)
            if first is None:
                first = res
                print(f"PAIR={val} run {i}: reference", flush=True)
                continue
            diffs = []
            for key in ("out", "scores", "reprs"):
                a, b = first[key], res[key]
                if not torch.equal(a, b):
                    d = (a.float() - b.float()).abs()
                    idx = torch.nonzero(d)
                    cols = idx[:, 1] if key == "out" else idx[:, -1]
                    where = ""
                    if key == "out":
                        where = f" prefill cols {int((cols < 3600).sum())}, decode cols {int((cols >= 3600).sum())}"
                    diffs.append(f"{key}: {idx.shape[0]} elements, max {float(d.max()):.3g}{where}, "
                                 f"first {idx[0].tolist()}")
            print(f"PAIR={val} run {i}: " + ("bitwise equal" if not diffs else "; ".join(diffs)), flush=True)


if __name__ == "__main__":
    main()
