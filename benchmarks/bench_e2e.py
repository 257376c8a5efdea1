"""End to end: a whole Llama-3-8B-shaped model (random weights) with qllm
against the unpatched model (SDPA), on long prompts (issue 4).

Model: transformers ``LlamaForCausalLM`` with Llama-3.1-8B geometry (hidden
4096, intermediate 14336, 32 layers, 32 q heads, 8 KV heads, head_dim 128,
vocab 128256, RoPE theta 500000 with llama3 scaling), bf16 on CUDA, random
weights (initialised on the GPU; speed does not depend on the values).
Random prompt token ids, greedy decoding.

Rows (each one process, one model; warm-up of both paths at a short length first):

* ``--tokens`` (default 128K) prompt + ``--new-tokens`` (64): qllm
  (``qllm.patch(model, QLLMConfig())``, the default 2K budget, question of 32
  random tokens via ``set_question``; the CUDA path ``qllm/gpu.py``) against
  dense (unpatched, ``attn_implementation="sdpa"``, transformers' DynamicCache).
* a long prompt with all layers, qllm alone: the longest that fits the GPU
  (``--long-tokens``, default: computed from the free memory, at most 512K).
* a 1M-token prompt, qllm alone, with as many layers as fit
  (``--million-layers``, default: computed).
* ``--cuda-graph``: after the qllm row at ``--tokens``, a second qllm row on the
  same prompt whose decode steps are CUDA-graph replays of the whole model
  (``qllm.gpu.GraphDecoder``; ``"decode": "graph"``), with the GPU time of the
  replays alone and whether its tokens equal the eager row's
  (``--profile-graph``: GPU time by kernel of the replays).

Without a budget every block of every layer stays on the GPU, so GPU memory
grows with the prompt (4 KiB of K/V per token per layer in bf16, plus 1 KiB of
f32 representatives).  ``--tiered`` adds rows with ``QLLMConfig.device_blocks
= --device-blocks``: the CUDA path's tiered memory (qllm/gpu.py: a ring of
recent K/V, a device cache of that many blocks per layer, every block in a
pinned host tier):

* two tiered qllm rows at ``--tokens`` beside the untiered one (same process:
  the cost of the tiers; with ``--cuda-graph`` both decode by graph replays):
  ``pinned_pool`` "cold" page-locks the host tier during the prefill, "warm"
  (a second request) reuses the pinned chunks torch's caching host allocator
  kept;
* the ``--million-tokens`` row tiered, with as many layers as the host memory
  holds (``--host-fraction`` of MemAvailable for the pinned tier: 4 KiB per
  token per layer), showing the GPU memory stays at weights + the budgeted
  state whatever the prompt length.

Per row: prefill seconds (the prompt call(s) + argmax of the last logits,
``torch.cuda.synchronize`` around them), decode tokens/s (``new_tokens - 1``
one-token forward steps after the prefill, whose logits give the first new
token), peak GPU memory (``torch.cuda.max_memory_allocated``, reset per row).

``--tiny`` runs a small float32 model on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qllm  # noqa: E402
from qllm import gpu as qgpu  # noqa: E402

from common import machine_info, write_json  # noqa: E402

GIB = 1024 ** 3
TARGET_PREFILL_128K_S = 3.5
HBM_BYTES_S = 3.35e12  # H100 SXM HBM3, datasheet
TIERED_NOTE = ("tiered memory (QLLMConfig.device_blocks: blocks beyond a device budget kept in host memory) "
               "is off in this row (--tiered turns it on): every block stays on the GPU, so GPU memory grows "
               "with the prompt")

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                 max_position_embeddings=2 * 1048576 + 8192, bos_token_id=128000, eos_token_id=128001)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
            max_position_embeddings=2 * 1048576 + 8192, bos_token_id=0, eos_token_id=1)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ------------------------------------------------------------------ helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device):
    return torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None


def make_config(shape: dict, layers: int):
    from transformers import LlamaConfig

    kw = dict(shape, num_hidden_layers=layers, tie_word_embeddings=False, use_cache=True)
    try:
        cfg = LlamaConfig(**kw, rope_parameters=dict(ROPE))
    except TypeError:  # transformers < 5: rope_theta + rope_scaling
        rs = {k: v for k, v in ROPE.items() if k != "rope_theta"}
        cfg = LlamaConfig(**kw, rope_theta=ROPE["rope_theta"], rope_scaling=rs)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(cfg, dtype: torch.dtype, dev: torch.device):
    """LlamaForCausalLM with random weights, built directly on ``dev`` in ``dtype``."""
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()  # no .to(dtype): the rotary inv_freq buffer stays float32, as from_pretrained leaves it
    # small normal init on the device (transformers' own init may be skipped in some versions)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)  # RMSNorm weights
    sync(dev)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.num_hidden_layers} layers, {n / 1e9:.2f}B params, {dtype}, {dev}, "
          f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    return model


def truncate_layers(model, layers: int) -> None:
    """Keep the first ``layers`` decoder layers (frees the others)."""
    base = model.model
    base.layers = torch.nn.ModuleList(list(base.layers)[:layers])
    model.config.num_hidden_layers = layers
    lt = getattr(model.config, "layer_types", None)
    if lt is not None:
        model.config.layer_types = list(lt)[:layers]


def kv_bytes_per_token(cfg, qcfg: qllm.QLLMConfig, layers: int, dtype: torch.dtype) -> float:
    """qllm's device state per text token: K/V store + f32 block representatives."""
    hd, hkv, hq = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
    el = torch.tensor([], dtype=dtype).element_size()
    return layers * (2 * hkv * hd * el + hq * hd * 4 / qcfg.block_size)


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def tiered_layer_bytes(cfg, qcfg: qllm.QLLMConfig, budget: int, n_tokens: int, dtype: torch.dtype) -> int:
    """GPU bytes of one tiered CudaLayerMemory holding n_tokens (qllm/gpu.py's allocations)."""
    el = torch.tensor([], dtype=dtype).element_size()
    kv_row = 2 * cfg.num_key_value_heads * cfg.head_dim * el
    seg = max(qcfg.n_init + qcfg.n_local, qcfg.n_local + qcfg.block_size) + qcfg.exc_block_size
    ring = 1
    while ring < seg + min(qcfg.chunk_size, n_tokens):
        ring *= 2
    blocks = (n_tokens - qcfg.n_init) // qcfg.block_size + 1
    reprs = blocks * cfg.num_attention_heads * cfg.head_dim * 4
    scores = cfg.num_attention_heads * 4 * 4096
    return (qcfg.n_init + ring) * kv_row + budget * qcfg.block_size * kv_row + reprs + scores + 4 * (2 * budget + blocks)


def weight_bytes(cfg, layers: int, dtype: torch.dtype) -> int:
    el = torch.tensor([], dtype=dtype).element_size()
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = (h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
                 + 3 * h * i + 2 * h)
    return el * (2 * cfg.vocab_size * h + h + layers * per_layer)


def profile_kernels(fn, dev: torch.device, n: int, label: str, unit: str, top: int = 24,
                    host: bool = False) -> dict:
    """GPU time by kernel of ``n`` calls of ``fn`` (torch.profiler / CUPTI), per call: kernel
    groups (GEMM/GEMV, qllm's kernels, the rest) and the ``top`` kernels, in ``unit``
    ("us" or "ms")."""
    from torch.profiler import ProfilerActivity, profile

    scale = 1.0 if unit == "us" else 1e-3
    gpu = dev.type == "cuda"  # on the CPU (--tiny smoke test): self CPU time of each op
    acts = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if (gpu and host) else \
        [ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        sync(dev)
    per = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) if gpu else ev.self_cpu_time_total
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CPU and gpu:
            continue  # host ops / runtime calls of the host=True profile: see host_view
        if us and ev.key not in ("", "cudaGraphLaunch"):
            per[ev.key] = per.get(ev.key, 0.0) + us * scale / n
    groups = {"gemm/gemv (cuBLAS)": 0.0, "qllm attention kernels": 0.0, "other": 0.0}
    for name, t in per.items():
        low = name.lower()
        if any(w in low for w in ("gemv", "gemm", "cutlass", "sm90_xmma", "splitk", "cublas", "nvjet")):
            groups["gemm/gemv (cuBLAS)"] += t
        elif "qllm" in low or any(w in low for w in ("attn", "select", "bscore", "tscore", "combine", "prep",
                                                     "qcomb", "store_kv", "qsel", "dyn", "seam")):
            groups["qllm attention kernels"] += t
        else:
            groups["other"] += t
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    idle = gpu_idle(prof, scale) if gpu else None
    print(f"{label} ({n}x), {unit} per call: total {sum(per.values()):.0f}; "
          + ", ".join(f"{k} {v:.0f}" for k, v in groups.items()), flush=True)
    for name, t in ranked[:top]:
        print(f"  {t:9.1f}  {name[:110]}", flush=True)
    out = {"unit": unit, "total": sum(per.values()), "groups": groups,
           "top": [[name[:200], t] for name, t in ranked[:top]]}
    if idle is not None:
        print(f"  GPU timeline ({unit}): first start to last end {idle['span']:.1f}, busy {idle['busy']:.1f}, "
              f"idle {idle['idle']:.1f} in {idle['gaps_over_10us']} gaps over 10 us; largest:", flush=True)
        for g in idle["largest"][:4]:
            print(f"    {g['gap']:8.3f}  after {g['after'][:60]}  before {g['before'][:60]}", flush=True)
        print("  gaps over 10 us by kernel pair (count, idle):", flush=True)
        for g in idle["gaps_over_10us_by_pair"][:10]:
            print(f"    {g['count']:6d} {g['idle']:8.2f}  {g['pair']}", flush=True)
        out["timeline"] = idle
    if gpu and host:
        try:
            out["host"] = host_view(prof, scale)
        except Exception as exc:  # noqa: BLE001 -- a diagnostic
            print(f"  (host view failed: {type(exc).__name__}: {exc})", flush=True)
    return out


def host_view(prof, scale: float, top: int = 12) -> dict | None:
    """What the host did around the GPU's idle gaps (profile with CPU activities): runtime API time
    by call, and for each gap over 10 us the host op that launched the kernel after it (innermost
    CPU op around the launch) and how long before the kernel's start the launch returned."""
    try:
        evs = list(prof.profiler.kineto_results.events())
        dev = [(e.start_ns(), e.end_ns(), e.name(), e.correlation_id()) for e in evs
               if e.device_type() == torch.autograd.DeviceType.CUDA and e.end_ns() > e.start_ns()]
        cpu = [(e.start_ns(), e.end_ns(), e.name(), e.correlation_id()) for e in evs
               if e.device_type() == torch.autograd.DeviceType.CPU]
    except Exception as exc:  # noqa: BLE001 -- a diagnostic; the torch API differs between versions
        print(f"  (no host view: {type(exc).__name__}: {exc})", flush=True)
        return None
    k = scale * 1e-3
    runtime = {}
    for a, b, name, _ in cpu:
        if name.startswith(("cuda", "cu")):
            n, t = runtime.get(name, (0, 0))
            runtime[name] = (n + 1, t + b - a)
    launch_of = {c: (a, b) for a, b, name, c in cpu if name.startswith(("cuda", "cu")) and c}
    ops = sorted((a, b, name) for a, b, name, _ in cpu if not name.startswith(("cuda", "cu")))
    dev.sort()
    by_op: dict = {}
    end = dev[0][0] if dev else 0
    starts = [o[0] for o in ops]
    for a, b, name, c in dev:
        if a - end > 10_000 and c in launch_of:
            la, lb = launch_of[c]
            i = bisect.bisect_right(starts, la)
            inner = None
            for j in range(i - 1, max(-1, i - 400), -1):  # innermost op that encloses the launch
                if ops[j][1] >= lb:
                    inner = ops[j][2]
                    break
            key = f"{(inner or '?')[:60]} -> {name.split('(')[0][-40:]}"
            n, t, slack = by_op.get(key, (0, 0, 0))
            by_op[key] = (n + 1, t + a - end, slack + a - lb)
        end = max(end, b)
    rt = sorted(runtime.items(), key=lambda kv: -kv[1][1])[:top]
    gaps = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]
    print("  host: runtime calls (count, total):", flush=True)
    for name, (n, t) in rt:
        print(f"    {n:7d} {t * k:9.2f}  {name}", flush=True)
    print("  host: gaps over 10 us by the host op launching the next kernel (count, idle, launch-to-start):",
          flush=True)
    for key, (n, t, slack) in gaps:
        print(f"    {n:6d} {t * k:8.2f} {slack * k / n:8.4f}  {key}", flush=True)
    return {"runtime": [{"call": name, "count": n, "total": t * k} for name, (n, t) in rt],
            "gaps_by_launching_op": [{"op": key, "count": n, "idle": t * k, "mean_launch_to_start": slack * k / n}
                                     for key, (n, t, slack) in gaps]}


def gpu_idle(prof, scale: float, top: int = 16) -> dict | None:
    """Where the GPU sat idle inside the profiled calls: the union of the device activities'
    intervals (kernels, copies, sets) against the span from the first start to the last end,
    and the ``top`` largest gaps with the activities on either side (``scale`` converts us)."""
    try:
        acts = [(ev.start_ns(), ev.end_ns(), ev.name()) for ev in prof.profiler.kineto_results.events()
                if ev.device_type() == torch.autograd.DeviceType.CUDA and ev.end_ns() > ev.start_ns()]
    except Exception as exc:  # noqa: BLE001 -- a diagnostic; the torch API differs between versions
        print(f"  (no GPU timeline: {type(exc).__name__}: {exc})", flush=True)
        return None
    if not acts:
        return None
    acts.sort()
    busy, gaps, end, last = 0, [], acts[0][0], acts[0][2]
    for a, b, name in acts:
        if a > end:
            gaps.append((a - end, last, name))
        busy += max(0, b - max(a, end))
        if b > end:
            end, last = b, name
    span = end - acts[0][0]
    gaps.sort(key=lambda g: -g[0])
    k = scale * 1e-3  # ns -> us -> unit
    short = lambda name: name.split("(")[0].split("<")[0].replace("void ", "")[-48:]  # noqa: E731
    pairs: dict = {}
    for g, a, b in gaps:
        if g > 10_000:
            key = f"{short(a)} -> {short(b)}"
            n, t = pairs.get(key, (0, 0))
            pairs[key] = (n + 1, t + g)
    return {"span": span * k, "busy": busy * k, "idle": (span - busy) * k,
            "gaps_over_10us": sum(1 for g in gaps if g[0] > 10_000),
            "idle_in_gaps_over_10us": sum(g[0] for g in gaps if g[0] > 10_000) * k,
            "largest": [{"gap": g * k, "after": a[:120], "before": b[:120]} for g, a, b in gaps[:top]],
            "gaps_over_10us_by_pair": [{"pair": p, "count": n, "idle": t * k}
                                       for p, (n, t) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]]}


def profile_replays(graph, dev: torch.device, n: int = 5, top: int = 24) -> dict:
    """GPU time per token by kernel over ``n`` back-to-back graph replays (µs)."""
    return profile_kernels(graph.replay, dev, n, "graph replay profile", "us", top)


# --------------------------------------------------------------- one row
class Runner:
    def __init__(self, model, dev: torch.device, qcfg: qllm.QLLMConfig, question: torch.Tensor,
                 profile_graph: bool = False):
        self.model, self.dev, self.qcfg, self.question = model, dev, qcfg, question
        self.profile_graph = profile_graph

    def qllm_cache(self, capacity: int):
        """A fresh QLLMCache; on the CUDA path its layer memories are created with
        ``capacity`` reserved (else the K/V store grows by doubling: a prompt of
        2^k tokens is copied into a 2^(k+1) store at the first decode token)."""
        handle = self.model._qllm
        cache = qllm.QLLMCache(handle)
        cfg = self.model.config
        dtype = next(self.model.parameters()).dtype
        if qgpu.supports(dtype, self.dev, cfg.head_dim) and not getattr(handle, "question_heads", None):
            for i in handle.attn_modules:
                cache.memories[i] = qgpu.CudaLayerMemory(
                    handle.config, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                    dtype, self.dev, capacity=capacity)
        return cache

    def run(self, strategy: str, ids: torch.Tensor, new_tokens: int, *, prefill_mode: str = "call",
            dense_chunk: int = 0, decode: str = "eager") -> dict:
        """Prefill ``ids`` [1, N] and decode ``new_tokens`` greedily.

        prefill_mode "call": one model call with the whole prompt (qllm chunks it
        internally by ``chunk_size``); "chunks": the benchmark feeds ``chunk_size``
        pieces itself (same memory updates, but avoids the patched forward's
        concatenation of every chunk's last hidden state).  Dense with
        ``dense_chunk`` > 0 feeds pieces of that size (SDPA with a mask then).

        decode "graph" (qllm only): the decode steps go through ``qllm.gpu.GraphDecoder``
        (one CUDA-graph replay of the whole model per token; block-cut tokens replay a second
        graph, or run eagerly with tiers or question heads).  The
        first decode step warms up and captures the graph: it is timed apart
        (``graph_capture_s``), and the decode rate is over the ``new_tokens - 2`` steps after it.
        Then ``graph_replay_only_ms``: the graph replayed 20 times back to back with no host work
        (GPU time per token; this corrupts the cache, which is dropped afterwards).
        """
        model, dev = self.model, self.dev
        N = ids.shape[1]
        free_memory(dev)
        notes = []
        with torch.no_grad():
            if strategy == "qllm":
                qllm.set_question(model, self.question)
                t0 = time.perf_counter()
                cache = self.qllm_cache(N + new_tokens + 8)
                notes.append(f"cache created in {time.perf_counter() - t0:.2f} s (before the prefill clock)")
                reserved = bool(cache.memories)
                step = self.qcfg.chunk_size if prefill_mode == "chunks" else N
            else:
                from transformers import DynamicCache
                cache = DynamicCache(config=model.config)
                step = dense_chunk if dense_chunk > 0 else N
            sync(dev)
            t0 = time.perf_counter()
            for s in range(0, N, step):
                out = model(input_ids=ids[:, s:s + step], past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            sync(dev)
            t_prefill = time.perf_counter() - t0
            peak_prefill = peak_gib(dev)
            del out
            steps = max(new_tokens - 1, 0)
            generated = [tok]
            graph_info = {}
            if decode == "graph":
                dec = qgpu.GraphDecoder(model, cache, new_tokens)
                if not dec.enabled:
                    notes.append(f"graph decoder disabled: {dec.reason}")
                if steps:  # warm-up + capture, timed apart
                    sync(dev)
                    t0 = time.perf_counter()
                    tok = dec.step(tok)[:, -1:].argmax(-1)
                    generated.append(tok)
                    sync(dev)
                    graph_info["graph_capture_s"] = time.perf_counter() - t0
                    steps -= 1
                sync(dev)
                t0 = time.perf_counter()
                for _ in range(steps):
                    tok = dec.step(tok)[:, -1:].argmax(-1)
                    generated.append(tok)
                t_host = time.perf_counter() - t0
                sync(dev)
                t_decode = time.perf_counter() - t0
                graph_info.update(graph_replays=dec.n_replays, graph_eager_steps=dec.n_eager,
                                  graph_host_ms_per_token=1e3 * t_host / steps if steps else None)
                if dec.graph is not None and dev.type == "cuda":
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(20):
                        dec.graph.replay()
                    e1.record()
                    sync(dev)
                    graph_info["graph_replay_only_ms"] = e0.elapsed_time(e1) / 20
                    if self.profile_graph:
                        try:
                            graph_info["graph_profile_us_per_token"] = profile_replays(dec.graph, dev)
                        except Exception as exc:  # noqa: BLE001 -- the profile is a diagnostic only
                            graph_info["graph_profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
                del dec
            else:
                sync(dev)
                t0 = time.perf_counter()
                t_first = None
                for i in range(steps):
                    out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    tok = out.logits[:, -1:].argmax(-1)
                    generated.append(tok)
                    if i == 0:  # the first step apart too (comparable with the graph rows)
                        sync(dev)
                        t_first = time.perf_counter() - t0
                sync(dev)
                t_decode = time.perf_counter() - t0
                if steps > 1:
                    graph_info["decode_ms_per_token_after_first"] = 1e3 * (t_decode - t_first) / (steps - 1)
        mems = list(getattr(cache, "memories", {}).values())
        tiered = [m for m in mems if getattr(m, "tiered", False)]
        if tiered:
            tot = {}
            for m in tiered:
                for k_, v_ in m.tier_stats().items():
                    if isinstance(v_, int):
                        tot[k_] = tot.get(k_, 0) + v_
            graph_info.update(
                device_blocks=tiered[0].n_slots, ring_rows=tiered[0].k_store.shape[1],
                host_alloc_s=sum(m.tier_stats()["host_alloc_s"] for m in tiered),
                device_state_gib=sum(m.device_nbytes() for m in mems) / GIB,
                host_state_gib=sum(m.host_nbytes() for m in mems) / GIB,
                tier_totals={k_: tot[k_] for k_ in ("blocks", "on_device", "on_host", "fetches", "placed",
                                                   "evictions") if k_ in tot})
        seen = cache.get_seq_length()
        steps_all = max(new_tokens - 1, 0)
        kinds = sorted({type(m).__name__ for m in getattr(cache, "memories", {}).values()})
        state = None
        if strategy == "qllm":
            state = cache.nbytes() / GIB
            if seen != N + steps_all:
                notes.append(f"cache saw {seen} tokens, expected {N + steps_all}")
        out_ids = torch.cat(generated, dim=1)[0].tolist()
        del cache, generated
        row = {"prompt_tokens": N, "new_tokens": new_tokens, "strategy": strategy,
               "prefill_s": t_prefill, "prefill_tok_s": N / t_prefill,
               "decode_tok_s": steps / t_decode if steps else None,
               "decode_ms_per_token": 1e3 * t_decode / steps if steps else None,
               "decode_steps_timed": steps,
               "peak_gib": peak_gib(dev), "peak_prefill_gib": peak_prefill,
               "state_gib": state, "first_new_ids": out_ids[:8], "decode": decode, **graph_info}
        self.last_ids = out_ids
        if strategy == "qllm":
            notes.append("prefill: one model call, qllm feeds chunk_size pieces internally"
                         if prefill_mode == "call" else
                         "prefill: the benchmark feeds chunk_size pieces (one model call each, logits_to_keep=1)")
            notes.append(f"layer memories: {', '.join(kinds)}")
            if "CudaLayerMemory" in kinds and reserved:
                notes.append("K/V store capacity reserved up front (CudaLayerMemory(capacity=prompt+new))")
            if decode == "graph":
                notes.append("decode: qllm.gpu.GraphDecoder, one CUDA-graph replay of the whole model per token "
                             "(block-cut tokens: a second graph where the steps can cut, else eager); first step "
                             f"(warm-up + capture) timed apart, rate over the {steps} steps after it")
        else:
            notes.append("prefill: one model call (SDPA, is_causal)" if step >= N else
                         f"prefill chunked: {step}-token model calls (SDPA with a mask)")
            notes.append("decode: transformers DynamicCache (torch.cat per step)")
        row["notes"] = "; ".join(notes)
        free_memory(dev)
        return row


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows) -> None:
    print()
    print(f"{'prompt':>9} {'layers':>6} {'strategy':>8} {'decode':>6} {'prefill s':>10} {'prefill tok/s':>14} "
          f"{'decode tok/s':>13} {'ms/token':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['prompt_tokens']:>9} {r['layers']:>6} {r['strategy']:>8} {r.get('decode', 'eager'):>6} "
              f"{fmt(r['prefill_s'], '10.3f')} "
              f"{fmt(r['prefill_tok_s'], '14.0f')} {fmt(r['decode_tok_s'], '13.1f')} "
              f"{fmt(r['decode_ms_per_token'], '9.2f')} {fmt(r['peak_gib'], '9.2f')}")
    print()


def sync_points(fn) -> None:
    """Run fn with torch's CUDA sync debug mode on and print where (Python stack) the host waited."""
    import traceback
    import warnings

    seen: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=14)[:-2])
        key = stack[-1200:]
        seen[key] = seen.get(key, 0) + 1

    old = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    print(f"  sync points (torch sync debug mode): {sum(seen.values())} in {len(seen)} places", flush=True)
    for key, n in sorted(seen.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  --- {n} times at:\n{key}", flush=True)


FUSED_LAYERS = True  # --unfuse-layers: keep the decoder layers' residual adds apart (A/B of qllm.fused's layer fusion)


def patch_model(model, qcfg: qllm.QLLMConfig) -> None:
    """qllm.patch; with ``--unfuse-layers``, the decoder layers (and their o_proj) given back their own
    forwards afterwards (norms and MLPs stay fused)."""
    qllm.patch(model, qcfg)
    if not FUSED_LAYERS:
        from qllm.fused import unfuse

        mods = [m for m in model._qllm.fused if getattr(m, "_qllm_fused", None) in ("layer", "residual")]
        unfuse(model, mods)
        model._qllm.fused = [m for m in model._qllm.fused if m not in mods]


AB_QUESTION_SYNC = 0  # --ab-question-sync N: N alternations of the prefill with / without the old question vector


def _question_vector_synced(q_fixed, token_scores, config):
    """The question vector as before: repr_compute's default finiteness check, a host sync per layer."""
    hq, n, d = q_fixed.shape
    return torch.ops.qllm.repr_compute(q_fixed.reshape(1, hq, n, d).float(), token_scores.reshape(1, hq, n),
                                       config.repr_topk)[0]


def _alternate(prefill, dev: torch.device, n: int, what: str, arms: dict) -> dict:
    """Wall time of ``prefill`` in one process, n rounds alternating the arms (name -> a function
    that sets the arm up); the first arm's setup runs again at the end (the library's default)."""
    walls = {arm: [] for arm in arms}
    try:
        for _ in range(n):
            for arm, setup in arms.items():
                setup()
                sync(dev)
                t0 = time.perf_counter()
                prefill()
                sync(dev)
                walls[arm].append(time.perf_counter() - t0)
                print(f"  A/B {what}, {arm}: {walls[arm][-1]:.3f} s", flush=True)
    finally:
        next(iter(arms.values()))()
    return walls


def ab_question_sync(prefill, dev: torch.device, n: int) -> dict:
    """The question vector without a host sync (the library's) against one per layer
    (``_question_vector_synced``), alternating (_alternate)."""
    import qllm.attention as qa

    new_fn = qa.question_vector
    return _alternate(prefill, dev, n, "question vector", {
        "no_sync": lambda: setattr(qa, "question_vector", new_fn),
        "sync_per_layer": lambda: setattr(qa, "question_vector", _question_vector_synced)})


AB_TRIM = 0  # --ab-trim N: N alternations of the prefill with / without the last layer's rows trimmed


def ab_trim(prefill, dev: torch.device, n: int) -> dict:
    """The last decoder layer over the kept position only (the library's default under
    logits_to_keep) against over every position (``qllm.patch._TRIM_LAST_LAYER = False``),
    alternating (_alternate)."""
    qp = sys.modules["qllm.patch"]
    return _alternate(prefill, dev, n, "last layer", {
        "trimmed": lambda: setattr(qp, "_TRIM_LAST_LAYER", True),
        "every_row": lambda: setattr(qp, "_TRIM_LAST_LAYER", False)})


def profile_prefill(model, runner: "Runner", qcfg: qllm.QLLMConfig, ids: torch.Tensor, dev: torch.device,
                    out: str | None, info: dict) -> None:
    """GPU time by kernel of one qllm prefill of ``ids`` (the prompt call of Runner.run) and its
    wall time without the profiler, to the JSON ``out``."""
    patch_model(model, qcfg)

    def prefill():
        with torch.no_grad():
            qllm.set_question(model, runner.question)
            cache = runner.qllm_cache(ids.shape[1] + 8)
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    sync(dev)
    t0 = time.perf_counter()
    prefill()
    sync(dev)
    wall = time.perf_counter() - t0
    print(f"qllm prefill of {ids.shape[1]} tokens: {wall:.3f} s (no profiler)", flush=True)
    # the question pass alone (the question's tokens through every layer, once per prompt): host-bound
    from qllm.patch import _encode_question
    qpass = []
    for _ in range(3):
        with torch.no_grad():
            qllm.set_question(model, runner.question)
            cache = qllm.QLLMCache(model._qllm)
            sync(dev)
            t0 = time.perf_counter()
            _encode_question(model._qllm, cache, ids[:, :1])
            sync(dev)
            qpass.append(time.perf_counter() - t0)
    print(f"question pass alone ({runner.question.numel()} tokens): " + ", ".join(f"{t * 1e3:.1f}" for t in qpass)
          + " ms", flush=True)
    ab = ab_question_sync(prefill, dev, AB_QUESTION_SYNC) if AB_QUESTION_SYNC else None
    abt = ab_trim(prefill, dev, AB_TRIM) if AB_TRIM else None
    if os.environ.get("E2E_PROFILE_HOST") and dev.type == "cuda":
        sync_points(prefill)
    prof = profile_kernels(prefill, dev, 1, f"qllm prefill {ids.shape[1]} tokens", "ms", top=40,
                           host=bool(os.environ.get("E2E_PROFILE_HOST")))
    qllm.unpatch(model)
    if out:
        with open(out, "w") as f:
            json.dump({"benchmark": "bench_e2e.py --profile-prefill", "gpu": info.get("gpu"), "machine": info,
                       "tokens": int(ids.shape[1]), "prefill_s_no_profiler": wall, "question_pass_s": qpass,
                       "qllm_config": {k: getattr(qcfg, k) for k in ("n_init", "n_local", "block_size", "topk",
                                                                      "exc_block_size", "chunk_size")},
                       "question_heads": str(getattr(qcfg, "question_heads", None)),
                       "ab_question_sync": ab, "ab_trim_last_layer": abt, "profile_ms": prof}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072, help="prompt of the qllm-vs-dense rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32; --tiny: 2)")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--dense-chunk", type=int, default=0,
                    help="dense prefill in pieces of this many tokens (0: one call; on OOM it retries with 16384)")
    ap.add_argument("--long-tokens", type=int, default=-1,
                    help="qllm-only prompt with all layers (-1: the longest that fits, at most 512K; 0: skip)")
    ap.add_argument("--million-tokens", type=int, default=1048576, help="qllm-only long prompt (0: skip)")
    ap.add_argument("--million-layers", type=int, default=-1,
                    help="layers for the --million-tokens row (-1: as many as fit)")
    ap.add_argument("--warmup-tokens", type=int, default=16384)
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="QLLMConfig.chunk_size of the qllm rows (default: the config's, 8192)")
    ap.add_argument("--reserve-gib", type=float, default=6.0,
                    help="GPU memory kept free for activations etc. when sizing the long rows")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also a qllm row at --tokens whose decode steps are CUDA-graph replays of the whole model "
                         "(qllm.gpu.GraphDecoder), same prompt, same process")
    ap.add_argument("--profile-graph", action="store_true",
                    help="with --cuda-graph: GPU time by kernel of the decode graph's replays (torch.profiler)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="after the warm-up: GPU time by kernel of one qllm prefill of --tokens (torch.profiler), "
                         "written to --out, then exit")
    ap.add_argument("--tiered", action="store_true",
                    help="tiered rows: qllm at --tokens with QLLMConfig.device_blocks=--device-blocks beside the "
                         "untiered one, and the --million-tokens row tiered (layers: as many as the host holds)")
    ap.add_argument("--device-blocks", type=int, default=256, help="device block budget per layer of the tiered rows")
    ap.add_argument("--host-fraction", type=float, default=0.7,
                    help="share of MemAvailable the pinned host tier of the tiered 1M row may take")
    ap.add_argument("--question-apart", action="store_true",
                    help="run the question's forward whole before the prompt (default on CUDA: alongside its first chunk)")
    ap.add_argument("--unfuse-layers", action="store_true",
                    help="keep the decoder layers' residual adds apart (qllm.fused folds them into the GEMMs)")
    ap.add_argument("--ab-question-sync", type=int, default=0, metavar="N",
                    help="with --profile-prefill: N alternations of the prefill without / with a host sync per "
                         "layer in the question vector (its finiteness check), wall times to the JSON")
    ap.add_argument("--ab-trim", type=int, default=0, metavar="N",
                    help="with --profile-prefill: N alternations of the prefill with the last layer's o_proj / MLP "
                         "over the kept position only (default) and over every position, wall times to the JSON")
    ap.add_argument("--tiny", action="store_true", help="small float32 model on the CPU (smoke test)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/e2e_h100.json)")
    args = ap.parse_args()
    global FUSED_LAYERS, AB_QUESTION_SYNC, AB_TRIM
    FUSED_LAYERS = not args.unfuse_layers
    AB_QUESTION_SYNC = args.ab_question_sync
    AB_TRIM = args.ab_trim
    if args.question_apart:
        sys.modules["qllm.patch"]._QUESTION_ALONGSIDE = False

    if args.tiny:
        dev, dtype, shape = torch.device("cpu"), torch.float32, TINY
        qcfg = qllm.QLLMConfig.small(chunk_size=1024)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --tiny for a CPU smoke test)")
        dev, dtype, shape = torch.device("cuda"), torch.bfloat16, LLAMA3_8B
        qcfg = qllm.QLLMConfig() if args.chunk_size is None else qllm.QLLMConfig(chunk_size=args.chunk_size)
        torch.backends.cuda.matmul.allow_tf32 = False
    layers = args.layers if args.layers is not None else shape["num_hidden_layers"]
    cfg = make_config(shape, layers)
    model = build_model(cfg, dtype, dev)
    question = torch.randint(0, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(1))
    n_max = max(args.tokens, args.long_tokens, args.million_tokens, args.warmup_tokens) + args.new_tokens + 8
    ids_all = torch.randint(0, cfg.vocab_size, (1, max(n_max, args.tokens + 16)),
                            generator=torch.Generator().manual_seed(0)).to(dev)
    runner = Runner(model, dev, qcfg, question, profile_graph=args.profile_graph)
    rows = []
    info = machine_info()
    info["fused_layers"] = FUSED_LAYERS
    info["question_alongside"] = sys.modules["qllm.patch"]._QUESTION_ALONGSIDE
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None

    def save(final: bool = False):
        q128 = next((r for r in rows if r["strategy"] == "qllm" and r["prompt_tokens"] == args.tokens
                     and r.get("decode") != "graph"), None)
        g128 = next((r for r in rows if r["strategy"] == "qllm" and r["prompt_tokens"] == args.tokens
                     and r.get("decode") == "graph"), None)
        d128 = next((r for r in rows if r["strategy"] == "dense" and r["prompt_tokens"] == args.tokens), None)
        summary = {}
        if q128 is not None:
            summary["qllm_prefill_s"] = q128["prefill_s"]
            if args.tokens == 131072 and not args.tiny:
                summary["meets_prefill_128k_target"] = q128["prefill_s"] <= TARGET_PREFILL_128K_S
            if d128 is not None:
                summary["prefill_speedup_vs_dense"] = d128["prefill_s"] / q128["prefill_s"]
                if q128["decode_tok_s"] and d128["decode_tok_s"]:
                    summary["decode_speedup_vs_dense"] = q128["decode_tok_s"] / d128["decode_tok_s"]
        if g128 is not None and g128.get("decode_tok_s"):
            g_ms = g128["decode_ms_per_token"]  # steps after the capture step
            summary["decode_graph_ms_per_token"] = g_ms
            for name, r in (("eager", q128), ("dense", d128)):
                ms = None if r is None else r.get("decode_ms_per_token_after_first", r["decode_ms_per_token"])
                if ms:
                    summary[f"decode_{name}_ms_per_token_after_first"] = ms
                    summary[f"decode_graph_speedup_vs_{name}"] = ms / g_ms
            summary["decode_graph_same_tokens_as_eager"] = g128.get("same_tokens_as_eager")
        if not args.tiny:
            # decode floor: every weight read once per token (HBM3 datasheet 3.35 TB/s; measured copies ~3.0)
            summary["decode_floor_ms_weights"] = 1e3 * wb / HBM_BYTES_S
        payload = {
            "benchmark": "bench_e2e.py",
            "gpu": info.get("gpu"), "gpu_total_gib": total / GIB if total else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": info.get("transformers"),
            "machine": info,
            "model": {"shape": "tiny (CPU smoke test)" if args.tiny else "Llama-3.1-8B geometry, random weights",
                      "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "layers": layers,
                      "q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                      "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "rope": ROPE, "dtype": str(dtype),
                      "params_gib": wb / GIB},
            "qllm_config": {k: getattr(qcfg, k) for k in ("n_init", "n_local", "block_size", "topk", "repr_topk",
                                                          "exc_block_size", "question_weight", "strategy",
                                                          "device_blocks", "chunk_size")},
            "question_tokens": int(question.numel()),
            "question_heads": str(qcfg.question_heads) if hasattr(qcfg, "question_heads") else None,
            "dense": "unpatched LlamaForCausalLM, attn_implementation='sdpa', DynamicCache",
            "method": "greedy; prefill_s: prompt call(s) + argmax, synchronised; decode_tok_s: (new_tokens - 1) "
                      "one-token steps after the prefill; peak_gib: torch.cuda.max_memory_allocated over the row "
                      "(weights included); warm-up of both paths at warmup_tokens first",
            "tiered_memory": ({"device_blocks": args.device_blocks, "what": "rows with device_blocks set: "
                               "QLLMConfig.device_blocks on the CUDA path (ring + device block cache + pinned host tier)"}
                              if args.tiered else "not used in this run: " + TIERED_NOTE),
            "warmup_tokens": args.warmup_tokens,
            "rows": rows,
            "complete": final,
            "summary": summary,
            "targets": {"prefill_128k_s": TARGET_PREFILL_128K_S},
        }
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(payload, f, indent=1)
            path = args.out
        else:
            path = write_json("e2e_h100.json", payload)
        return path, summary

    def add(row, layers_, extra=None):
        row["layers"] = layers_
        if extra:
            row.update(extra)
        rows.append(row)
        print(f"  {row['strategy']:>5} {row['prompt_tokens']:>8} tokens, {layers_} layers: prefill "
              f"{row['prefill_s']:.3f} s, decode {fmt(row['decode_tok_s'], '.1f')} tok/s, peak "
              f"{fmt(row['peak_gib'], '.2f')} GiB  [{row['notes']}]", flush=True)
        save()

    # ---- warm-up, both paths (kernels, cuBLAS handles, allocator)
    w = ids_all[:, :args.warmup_tokens]
    patch_model(model, qcfg)
    t0 = time.perf_counter()
    runner.run("qllm", w, 4)
    if args.cuda_graph:
        prof, runner.profile_graph = runner.profile_graph, False
        runner.run("qllm", w, 4, decode="graph")
        runner.profile_graph = prof
    qllm.unpatch(model)
    if not args.skip_dense:
        runner.run("dense", w, 4)
    print(f"warm-up ({args.warmup_tokens} tokens, both paths): {time.perf_counter() - t0:.1f}s", flush=True)
    if args.profile_prefill:
        profile_prefill(model, runner, qcfg, ids_all[:, :args.tokens], dev, args.out, info)
        return

    # ---- qllm vs dense at --tokens
    wb = weight_bytes(cfg, layers, dtype)
    per_tok = kv_bytes_per_token(cfg, qcfg, layers, dtype)
    el = torch.tensor([], dtype=dtype).element_size()
    ids = ids_all[:, :args.tokens]
    print(f"prompt {args.tokens} + {args.new_tokens} new tokens, {layers} layers; weights {wb / GIB:.2f} GiB, "
          f"qllm state {per_tok / 1024:.1f} KiB/token", flush=True)
    patch_model(model, qcfg)
    add(runner.run("qllm", ids, args.new_tokens), layers,
        {"expected_gib": (wb + per_tok * (args.tokens + args.new_tokens + 8)) / GIB})
    untiered_ids = runner.last_ids
    if args.cuda_graph:
        eager_ids = runner.last_ids
        row = runner.run("qllm", ids, args.new_tokens, decode="graph")
        row["same_tokens_as_eager"] = runner.last_ids == eager_ids
        add(row, layers, {"expected_gib": (wb + per_tok * (args.tokens + args.new_tokens + 8)) / GIB})
    if args.tiered:
        qllm.unpatch(model)
        patch_model(model, qcfg.replace(device_blocks=args.device_blocks))
        for pool in ("cold", "warm"):
            # cold: the pinned host tier is page-locked during the prefill (torch's caching host
            # allocator, ~1.5 GiB/s here); warm: a second request reuses the cached pinned chunks
            row = runner.run("qllm", ids, args.new_tokens, decode="graph" if args.cuda_graph else "eager")
            row["same_tokens_as_untiered"] = runner.last_ids == untiered_ids
            add(row, layers, {"expected_gib": None, "tiered_memory": True, "pinned_pool": pool})
    qllm.unpatch(model)
    if not args.skip_dense:
        chunk = args.dense_chunk
        row, oom = None, None
        try:
            row = runner.run("dense", ids, args.new_tokens, dense_chunk=chunk)
        except torch.OutOfMemoryError as exc:
            if chunk:
                raise
            oom = str(exc).splitlines()[0]
        if row is None:  # outside the except block, so the failed call's tensors are freed
            print(f"dense: one-call prefill ran out of memory ({oom}); retrying in 16384-token pieces",
                  flush=True)
            free_memory(dev)
            row = runner.run("dense", ids, args.new_tokens, dense_chunk=16384)
            row["notes"] += "; a one-call prefill ran out of GPU memory"
        add(row, layers, {"expected_gib": (wb + cfg.num_hidden_layers * 2 * cfg.num_key_value_heads
                                           * cfg.head_dim * el * (args.tokens + args.new_tokens)) / GIB})

    # ---- long prompts, qllm alone
    long_rows = []
    if args.long_tokens:
        N = args.long_tokens
        if N < 0:
            if total is None:
                N = 4 * args.tokens
            else:
                fit = (total - wb - args.reserve_gib * GIB) / per_tok - args.new_tokens - 8
                N = int(min(524288, fit) // 32768 * 32768)
        expect = (wb + per_tok * (N + args.new_tokens + 8)) / GIB
        print(f"long prompt, all {layers} layers: {N} tokens; expected memory: weights {wb / GIB:.1f} GiB + "
              f"qllm state {per_tok / 1024:.1f} KiB/token = {expect:.1f} GiB"
              + (f" of {total / GIB:.1f} GiB" if total else ""), flush=True)
        long_rows.append((N, layers, expect))
    if args.million_tokens:
        N = args.million_tokens
        L = args.million_layers
        if L < 0 and args.tiered:  # the GPU holds any length: the host tier (4 KiB/token/layer) bounds the layers
            avail = host_available_bytes()
            host_per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * el * (N + args.new_tokens + 8)
            L = max(1, min(layers, int(args.host_fraction * avail // host_per_layer))) if avail else max(1, layers // 2)
            print(f"tiered {N}-token row: host MemAvailable {avail / GIB:.1f} GiB, pinned tier "
                  f"{host_per_layer / GIB:.2f} GiB per layer -> {L} of {layers} layers", flush=True)
        elif L < 0:
            if total is None:
                L = max(1, layers // 2)
            else:
                L = layers
                while L > 1 and (weight_bytes(cfg, L, dtype) + kv_bytes_per_token(cfg, qcfg, L, dtype)
                                 * (N + args.new_tokens + 8) + args.reserve_gib * GIB) > total:
                    L -= 1
        L = min(L, layers)
        expect = (weight_bytes(cfg, L, dtype) + kv_bytes_per_token(cfg, qcfg, L, dtype)
                  * (N + args.new_tokens + 8)) / GIB
        full = (wb + per_tok * (N + args.new_tokens + 8)) / GIB
        print(f"{N}-token prompt: {L} of {layers} layers (all {layers} would need {full:.1f} GiB); "
              f"expected memory {expect:.1f} GiB", flush=True)
        long_rows.append((N, L, expect))
    for N, L, expect in long_rows:
        if N > ids_all.shape[1]:
            ids_all = torch.randint(0, cfg.vocab_size, (1, N + 16), generator=torch.Generator().manual_seed(0)).to(dev)
        if L < model.config.num_hidden_layers:
            truncate_layers(model, L)
            free_memory(dev)
        tier_row = args.tiered and N == args.million_tokens
        patch_model(model, qcfg.replace(device_blocks=args.device_blocks) if tier_row else qcfg)
        if tier_row:
            expect = (weight_bytes(cfg, L, dtype) + L * tiered_layer_bytes(cfg, qcfg, args.device_blocks, N, dtype)) / GIB
        row, msg = None, None
        try:
            row = runner.run("qllm", ids_all[:, :N], args.new_tokens, prefill_mode="chunks",
                             decode="graph" if (tier_row and args.cuda_graph) else "eager")
        except torch.OutOfMemoryError as exc:
            msg = str(exc).splitlines()[0]
        if row is None:
            qllm.unpatch(model)
            free_memory(dev)
            print(f"  qllm {N} tokens, {L} layers: out of GPU memory ({msg})", flush=True)
            rows.append({"prompt_tokens": N, "new_tokens": args.new_tokens, "layers": L, "strategy": "qllm",
                         "prefill_s": None, "prefill_tok_s": None, "decode_tok_s": None,
                         "decode_ms_per_token": None, "peak_gib": None, "expected_gib": expect,
                         "error": "OutOfMemoryError: " + msg, "notes": TIERED_NOTE})
            save()
            continue
        qllm.unpatch(model)
        extra = {"expected_gib": expect, "tiered_memory": tier_row}
        if tier_row:
            extra["expected_what"] = ("weights + per layer: ring, device block cache, representatives, tier state "
                                      "(qllm/gpu.py); the host tier is pinned CPU memory")
            if L < layers:
                extra["layers_of_model"] = layers
                row["notes"] = (f"{L} of {layers} layers: the pinned host tier of all {layers} layers at {N} tokens "
                                f"({2 * cfg.num_key_value_heads * cfg.head_dim * el * N * layers / GIB:.0f} GiB) "
                                f"exceeds --host-fraction of this machine's host memory; " + row["notes"])
        else:
            row["notes"] = TIERED_NOTE + "; " + row["notes"]
            if L < layers:
                extra["layers_of_model"] = layers
                row["notes"] = (f"only {L} of {layers} layers (the K/V of all {layers} layers at {N} tokens does not "
                                f"fit the GPU without tiered memory); " + row["notes"])
        add(row, L, extra)

    print_table(rows)
    path, summary = save(final=True)
    print("summary:", json.dumps(summary))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
