"""Command line: ``qllm ask FILE --question "..."``, ``qllm demo`` and ``qllm calibrate``."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time

from .config import STRATEGIES, QLLMConfig

__all__ = ["main"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Progress:
    """tqdm bar over the reading: tokens read, tokens/s, memory."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.t0 = None

    def __call__(self, done: int, total: int, cache) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="tok", desc="reading", file=sys.stderr, dynamic_ncols=True)
            self.t0 = time.perf_counter()
        self.bar.update(done - self.bar.n)
        host = cache.host_nbytes()
        tier = f" (host tier {host / 2**20:.1f} MiB)" if host else ""
        self.bar.set_postfix_str(f"memory {cache.nbytes() / 2**20:.1f} MiB{tier}, rss {_rss_mb():.0f} MiB")
        if done >= total:
            self.bar.close()


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory budget (defaults: the small budget for small models)")
    g.add_argument("--strategy", choices=STRATEGIES, default="qllm")
    g.add_argument("--n-init", type=int, default=128)
    g.add_argument("--n-local", type=int, default=256)
    g.add_argument("--block-size", type=int, default=64)
    g.add_argument("--topk", type=int, default=4)
    g.add_argument("--repr-topk", type=int, default=4)
    g.add_argument("--exc-block-size", type=int, default=256)
    g.add_argument("--question-weight", type=float, default=2.0)
    g.add_argument("--question-heads", default="auto", metavar="auto|none|FILE",
                   help="how the question scores blocks: 'auto' (the shipped calibration of the model, if any), "
                        "'none' (block representatives), or a calibration JSON written by 'qllm calibrate'")
    g.add_argument("--device-blocks", type=int, default=None,
                   help="blocks per layer kept on the compute device, the rest in host memory (CUDA: GPU memory "
                        "then stays bounded whatever the text length); default: all on the device")
    g.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk (progress granularity)")


def _question_heads(spec: str):
    if spec == "auto":
        return "auto"
    if spec == "none":
        return None
    from .heads import load_calibration

    return load_calibration(spec)


def _config(a: argparse.Namespace) -> QLLMConfig:
    return QLLMConfig(n_init=a.n_init, n_local=a.n_local, block_size=a.block_size, topk=a.topk,
                      repr_topk=a.repr_topk, exc_block_size=a.exc_block_size,
                      question_weight=a.question_weight, question_heads=_question_heads(a.question_heads),
                      strategy=a.strategy, chunk_size=a.chunk_size, device_blocks=a.device_blocks)


def _load(a):
    from .models import load_model

    t = time.perf_counter()
    model, tok = load_model(a.model)
    print(f"model: {a.model or 'SmolLM2-135M-Instruct (embedded)'} loaded in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    return model, tok


def _ask(model, tok, context: str, question: str, cfg: QLLMConfig, max_new_tokens: int, quiet: bool) -> str:
    from .generate import generate

    n = len(tok(context, add_special_tokens=False)["input_ids"])
    print(f"text: {n} tokens; strategy {cfg.strategy}; n_init={cfg.n_init} n_local={cfg.n_local} "
          f"block_size={cfg.block_size} topk={cfg.topk}", file=sys.stderr)
    t = time.perf_counter()
    answer = generate(model, tok, context, question, max_new_tokens=max_new_tokens, config=cfg,
                      progress=_Progress(not quiet))
    print(f"answered in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return answer


def cmd_ask(a) -> int:
    cfg = _config(a)  # bad budget options fail before any reading or loading
    if not os.path.isfile(a.file):
        print(f"qllm ask: FILE: no such file: {a.file}", file=sys.stderr)
        return 2
    with open(a.file, encoding="utf-8", errors="replace") as f:
        context = f.read()
    if not context.strip():
        print(f"qllm ask: FILE: {a.file} is empty", file=sys.stderr)
        return 2
    model, tok = _load(a)
    print(_ask(model, tok, context, a.question, cfg, a.max_new_tokens, a.quiet))
    return 0


def cmd_demo(a) -> int:
    from .data import build_needle_text, passkey_needle

    cfg = _config(a)
    model, tok = _load(a)
    needle = passkey_needle(a.seed)
    text = build_needle_text(tok, a.tokens, needle, a.depth)
    print(f"demo: a pass key hidden at depth {a.depth:.0%} of a {a.tokens}-token essay text "
          f"(the model was trained on 8192 tokens)", file=sys.stderr)
    answer = _ask(model, tok, text, needle.question, cfg, a.max_new_tokens, a.quiet)
    ok = needle.answer in answer
    print(f"question: {needle.question}\nanswer:   {answer}\nexpected: {needle.answer} -> "
          f"{'RIGHT' if ok else 'WRONG'}")
    if not ok:
        print("note: the answer depends on retrieval ranking the pass key's block into the top-k "
              "(README, 'Measured', has the rates per strategy and length)", file=sys.stderr)
    return 0


def cmd_calibrate(a) -> int:
    import json

    from .heads import calibrate, fingerprint

    if a.n_heads < 1:
        print(f"qllm calibrate: --n-heads: expected >= 1, got {a.n_heads}", file=sys.stderr)
        return 2
    model, tok = _load(a)
    t0 = time.perf_counter()

    def progress(i: int, n: int) -> None:
        if not a.quiet:
            print(f"calibrating: {i}/{n} texts, {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    res = calibrate(model, tok, n_tokens=a.tokens, n_heads=a.n_heads, progress=progress)
    res["fingerprint"] = fingerprint(model.config.get_text_config() if hasattr(model.config, "get_text_config")
                                     else model.config)
    res["model"] = a.model or "SmolLM2-135M-Instruct (embedded)"
    with open(a.output, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"question heads {res['question_heads']} written to {a.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qllm", description="Query-aware context memory for long texts")
    sub = p.add_subparsers(dest="cmd", required=True)
    ask = sub.add_parser("ask", help="answer a question about a long text file")
    ask.add_argument("file")
    ask.add_argument("--question", "-q", required=True)
    demo = sub.add_parser("demo", help="find a pass key hidden in a long essay text")
    demo.add_argument("--tokens", type=int, default=16000)
    demo.add_argument("--depth", type=float, default=0.25)
    demo.add_argument("--seed", type=int, default=0)
    cal = sub.add_parser("calibrate", help="find the model's question heads (writes a calibration JSON)")
    cal.add_argument("--output", "-o", required=True)
    cal.add_argument("--tokens", type=int, default=6000, help="length of each calibration text")
    cal.add_argument("--n-heads", type=int, default=8)
    for s in (ask, demo, cal):
        s.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: embedded)")
        s.add_argument("--max-new-tokens", type=int, default=32)
        s.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.add_argument("--verbose", "-v", action="store_true")
        if s is not cal:
            _add_budget_args(s)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    try:
        return {"ask": cmd_ask, "demo": cmd_demo, "calibrate": cmd_calibrate}[a.cmd](a)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"qllm {a.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
