"""Shared bits for the benchmark scripts: machine/version record, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch


def cuda_median_ms(fn, repeats: int, warmup: int) -> float:
    """Median milliseconds of fn() over `repeats` calls, each between two CUDA events, after
    `warmup` calls."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["attention_kernel"] = attention_kernel()
    info["qllm_env"] = qllm_env()
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        pass
    return info


def qllm_env() -> dict:
    """Kernel choices made through the environment (QLLM_ATTN_*, QLLM_TSCORE_*, ...)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("QLLM_")}


def attention_kernel(head_dim: int = 128) -> str | None:
    """Which qllm attention kernel runs for head_dim (build arch and QLLM_ATTN_*),
    or None without a CUDA build of qllm (or without qllm: torch-only micros run on a bare machine)."""
    try:
        import qllm  # noqa: F401  (loads the ops)
    except ImportError:
        return None

    op = getattr(torch.ops.qllm, "cuda_attention_kernel", None) if hasattr(torch.ops, "qllm") else None
    return None if op is None else op(head_dim)


def write_gpu_rows(path: str | None, rows: list) -> None:
    """{"gpu", "torch", "machine", "rows"} to ``path`` (nothing when it is None): the micro benchmarks' JSON."""
    if path:
        res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "machine": machine_info(), "rows": rows}
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


def write_json(name: str, payload: dict) -> str:
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path
