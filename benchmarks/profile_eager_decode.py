"""Where the host time of qllm's eager decode step goes (no CUDA graph: what ``model.generate``
on a patched model runs per token).

The Llama-3-8B-shaped model of ``bench_e2e.py`` (random bf16 weights, patched with the default
2K-budget config and a question), a prompt of ``--tokens``, then eager decode steps: the time per
token (CUDA-synchronised at the end), the host time per token with the GPU idle in between
(``--sync-each``: each step synchronised, so host and GPU time separate), the CUDA kernels
launched per token (``torch.profiler``), and the Python functions that take the host time
(``cProfile``, top ``--top`` by own time and by cumulative time).  Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qllm  # noqa: E402
from bench_e2e import LLAMA3_8B, Runner, build_model, make_config, sync  # noqa: E402
from common import machine_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768, help="prompt tokens before the decode steps")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24, help="timed eager decode steps")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "eager_decode_profile_h100.json"))
    args = ap.parse_args()
    if args.tokens < 1 or args.layers < 1 or args.steps < 4:
        raise SystemExit("--tokens, --layers >= 1 and --steps >= 4 expected")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    dev = torch.device("cuda")
    cfg = make_config(LLAMA3_8B, args.layers)
    model = build_model(cfg, torch.bfloat16, dev)
    qcfg = qllm.QLLMConfig()
    qllm.patch(model, qcfg)
    question = torch.randint(0, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(1))
    qllm.set_question(model, question)
    runner = Runner(model, dev, qcfg, question)
    total = args.tokens + 3 * args.steps + 16
    ids = torch.randint(0, cfg.vocab_size, (1, total), generator=torch.Generator().manual_seed(0)).to(dev)
    cache = runner.qllm_cache(total + 8)
    res = {"machine": machine_info(), "tokens": args.tokens, "layers": args.layers, "steps": args.steps}
    with torch.no_grad():
        out = model(input_ids=ids[:, :args.tokens], past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        del out
        for _ in range(3):  # warm-up steps
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        sync(dev)

        def steps(n: int, sync_each: bool = False) -> float:
            nonlocal tok
            t0 = time.perf_counter()
            for _ in range(n):
                tok = model(input_ids=tok, past_key_values=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1:].argmax(-1)
                if sync_each:
                    sync(dev)
            sync(dev)
            return 1e3 * (time.perf_counter() - t0) / n

        res["ms_per_token"] = steps(args.steps)
        res["ms_per_token_sync_each"] = steps(args.steps, sync_each=True)
        # GPU time per token: CUDA events around one step, synchronised before it
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        gpu = []
        for _ in range(4):
            sync(dev)
            ev[0].record()
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            ev[1].record()
            sync(dev)
            gpu.append(ev[0].elapsed_time(ev[1]))
        res["gpu_span_ms_per_token"] = sorted(gpu)[len(gpu) // 2]
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            steps(4)
        kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        res["kernels_per_token"] = len(kern) / 4
        names: dict[str, int] = {}
        for e in kern:
            names[e.name[:90]] = names.get(e.name[:90], 0) + 1
        res["kernel_counts_per_token"] = {k: v / 4 for k, v in sorted(names.items(), key=lambda x: -x[1])[:args.top]}
        pr = cProfile.Profile()
        pr.enable()
        steps(8)
        pr.disable()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(args.top)
        res[f"cprofile_{key}"] = s.getvalue()
    print(f"eager decode after {args.tokens} tokens, {args.layers} layers: {res['ms_per_token']:.2f} ms/token "
          f"(each step synchronised: {res['ms_per_token_sync_each']:.2f}; GPU span of one step "
          f"{res['gpu_span_ms_per_token']:.2f}); {res['kernels_per_token']:.0f} kernels per token")
    for k, v in res["kernel_counts_per_token"].items():
        print(f"  {v:7.1f}  {k}")
    print(res["cprofile_tottime"])
    print(res["cprofile_cumulative"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
