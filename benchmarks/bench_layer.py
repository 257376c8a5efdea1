"""How fast is one attention layer of Llama-3-8B geometry with qllm's GPU path,
against dense FlashAttention (SDPA) in the same process?

One layer: hidden 4096, 32 query heads, 8 KV heads, head_dim 128, bf16, with
the q/k/v/o projections; 2K-budget config (DESIGN §7: n_init=128,
n_local=1024, block_size=128, topk=8, repr_topk=4, exc_block_size=512,
question on, w=4); prefill fed in 8192-token chunks.  Rows: prefill of
32K / 128K / 512K tokens and decode (one token, ms per token) at 128K.
Medians over repeats after warm-up, timed with CUDA events around the whole
prefill (all chunks) or around a run of decode steps.

Writes benchmarks/results/layer_h100.json:
{"gpu", "torch", "config", "rows": [{"mode", "tokens", "qllm_ms", "dense_ms"}], ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import attention_kernel, qllm_env  # noqa: E402
from qllm.attention import RopeTable  # noqa: E402
from qllm.config import QLLMConfig  # noqa: E402
from qllm.gpu import CudaDecodeStep, CudaLayerMemory, attend_cuda  # noqa: E402

HIDDEN, HQ, HKV, D = 4096, 32, 8, 128
CHUNK = 8192
DT = torch.bfloat16


def rope_cos_sin(positions: torch.Tensor, theta: float = 500000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=positions.device) / D)
    ang = positions.double()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate(x, cos, sin):
    """Rotate-half RoPE in the model dtype (as HF does for bf16 models)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class Layer:
    def __init__(self, dev):
        g = torch.Generator(device=dev).manual_seed(0)
        s = HIDDEN ** -0.5
        self.wq = (torch.randn(HQ * D, HIDDEN, generator=g, device=dev) * s).to(DT)
        self.wk = (torch.randn(HKV * D, HIDDEN, generator=g, device=dev) * s).to(DT)
        self.wv = (torch.randn(HKV * D, HIDDEN, generator=g, device=dev) * s).to(DT)
        self.wo = (torch.randn(HIDDEN, HQ * D, generator=g, device=dev) * s).to(DT)

    def qkv(self, x):
        c = x.shape[0]
        q = (x @ self.wq.T).view(c, HQ, D).transpose(0, 1)
        k = (x @ self.wk.T).view(c, HKV, D).transpose(0, 1)
        v = (x @ self.wv.T).view(c, HKV, D).transpose(0, 1)
        return q, k, v

    def qkv_into(self, x, ks, vs):
        """q as qkv does; k and v written into ks, vs ([HKV, c, D] views, e.g. a layer
        memory's kv_slots) by batched GEMMs, one batch per KV head (the same products,
        summed in cuBLAS's order for that shape).  K/V last, so the chunk's rows are in L2
        for the rotations and the local attention.  Measured (H100, NOTES_gpu round 12): the
        batched GEMMs take ~10 us more per call than the flat ones, about what the copies
        cost, so this is not faster; the default stays the flat GEMMs + copies."""
        c = x.shape[0]
        q = (x @ self.wq.T).view(c, HQ, D).transpose(0, 1)
        xb = x.expand(HKV, c, HIDDEN)
        torch.bmm(xb, self.wk.view(HKV, D, HIDDEN).transpose(1, 2), out=ks)
        torch.bmm(xb, self.wv.view(HKV, D, HIDDEN).transpose(1, 2), out=vs)
        return q, ks, vs


_DENSE = {"impl": "aten._scaled_dot_product_flash_attention"}


def flash(q, k, v, causal, scale):
    """Dense attention, bottom-right causal (q is the last rows). q [1,Hq,L,D], k/v [1,Hkv,S,D]."""
    if _DENSE["impl"] == "aten._scaled_dot_product_flash_attention":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    mask = causal_lower_right(q.shape[2], k.shape[2]) if causal else None
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


class Dense:
    """Dense baseline: KV cache + FlashAttention over everything so far."""

    def __init__(self, layer, n_max, dev):
        self.layer = layer
        self.K = torch.empty(1, HKV, n_max, D, dtype=DT, device=dev)
        self.V = torch.empty_like(self.K)
        self.n = 0
        self.dev = dev
        # RoPE table of every position, computed once (float64 angles, float32 table)
        self.cos, self.sin = rope_cos_sin(torch.arange(n_max, device=dev))

    def step(self, x):
        c = x.shape[0]
        q, k, v = self.layer.qkv(x)
        cos, sin = self.cos[self.n:self.n + c], self.sin[self.n:self.n + c]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.K[0, :, self.n:self.n + c] = k
        self.V[0, :, self.n:self.n + c] = v
        self.n += c
        o = flash(q.unsqueeze(0), self.K[:, :, :self.n], self.V[:, :, :self.n], c > 1, D ** -0.5)
        return o[0].transpose(0, 1).reshape(c, HQ * D) @ self.layer.wo.T


class Qllm:
    """qllm layer; in_place (--kv-in-place): a prefill chunk's K/V projections write into
    the memory's store rows (CudaLayerMemory.kv_slots) by batched GEMMs, else (default)
    attend_cuda copies them there; the eager decode steps always copy."""

    in_place = False

    def __init__(self, layer, cfg, n_max, rope, question, dev):
        self.layer, self.rope = layer, rope
        self.mem = CudaLayerMemory(cfg, HQ, HKV, D, DT, dev, capacity=n_max)
        self.mem.question = question

    def step(self, x):
        c = x.shape[0]
        slots = self.mem.kv_slots(c) if (self.in_place and c > 1) else None  # prefill chunks
        q, k, v = self.layer.qkv(x) if slots is None else self.layer.qkv_into(x, *slots)
        o = attend_cuda(self.mem, q, k, v, self.rope, D ** -0.5)
        return o.transpose(0, 1).reshape(c, HQ * D) @ self.layer.wo.T


class QllmGraph:
    """qllm decode with the layer step (q/k/v projections + attend_decode + o
    projection) captured in CUDA graphs and replayed per token.  Per token on
    the host: the input copy, CudaDecodeStep.prepare (bookkeeping + one tiny
    kernel writing the step's sizes) and the replay.  Tokens that cut a block
    (1 in block_size) replay a second graph whose step ends with the cut;
    with cut_graph=False they run the ordinary path (Qllm.step)."""

    def __init__(self, model: Qllm, cut_graph: bool = True):
        self.m = model
        self.x = torch.zeros(1, HIDDEN, dtype=DT, device=model.mem.device)
        self.dstep = CudaDecodeStep(model.mem, model.rope, D ** -0.5)
        self.allow_cut = cut_graph and self.dstep.can_cut
        self.g = None  # {cuts: (graph, static output)}
        self.fallbacks = 0

    def _body(self):
        q, k, v = self.m.layer.qkv(self.x)
        o = self.dstep.launch(q, k, v)
        return o.transpose(0, 1).reshape(1, HQ * D) @ self.m.layer.wo.T

    def step(self, x):
        self.x.copy_(x)
        if not self.dstep.prepare(allow_cut=self.allow_cut):
            self.fallbacks += 1
            return self.m.step(x)
        if self.g is None:
            y = self._body()  # a real step; also the warm-up before capture
            torch.cuda.synchronize()
            cuts = self.dstep.cuts
            self.g = {}
            for c in ([False, True] if self.allow_cut else [False]):
                self.dstep.cuts = c
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    self.g[c] = (g, self._body())  # captured, not run
            self.dstep.cuts = cuts
            return y
        g, y = self.g[self.dstep.cuts]
        g.replay()
        return y


class DenseGraph:
    """Dense decode as one CUDA graph: projections, RoPE and the K/V write at a
    device-side position (advanced inside the graph), FlashAttention, o
    projection.  The attention's key count is fixed at capture (the graph
    cannot change shapes), so every replay attends over the first N+1 keys:
    a timing baseline (same kernels and bytes as a real step at N), not a
    correct decode beyond the first token."""

    def __init__(self, model: Dense):
        self.d = model
        dev = model.dev
        self.x = torch.zeros(1, HIDDEN, dtype=DT, device=dev)
        self.pos = torch.tensor([model.n], dtype=torch.int64, device=dev)
        self.n_fixed = model.n + 1
        self.g = None
        self.y = None

    def _body(self):
        d = self.d
        q, k, v = d.layer.qkv(self.x)
        cos, sin = d.cos.index_select(0, self.pos), d.sin.index_select(0, self.pos)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        d.K[0].index_copy_(1, self.pos, k)
        d.V[0].index_copy_(1, self.pos, v)
        self.pos.add_(1)
        o = flash(q.unsqueeze(0), d.K[:, :, :self.n_fixed], d.V[:, :, :self.n_fixed], False, D ** -0.5)
        return o[0].transpose(0, 1).reshape(1, HQ * D) @ d.layer.wo.T

    def step(self, x):
        self.x.copy_(x)
        if self.g is None:
            y = self._body()
            torch.cuda.synchronize()
            self.g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.g):
                self.y = self._body()
            return y
        self.g.replay()
        return self.y


def prefill(model, x):
    for s in range(0, x.shape[0], CHUNK):
        model.step(x[s:s + CHUNK])


def timed(fn) -> float:
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def check_dense_flash(dev):
    """Pick and check the dense call: bottom-right causal GQA against explicit math."""
    q = torch.randn(1, HQ, 64, D, device=dev, dtype=DT)
    k = torch.randn(1, HKV, 200, D, device=dev, dtype=DT)
    v = torch.randn(1, HKV, 200, D, device=dev, dtype=DT)
    kk, vv = k.float().repeat_interleave(HQ // HKV, 1), v.float().repeat_interleave(HQ // HKV, 1)
    att = (q.float() @ kk.transpose(-1, -2)) * D ** -0.5
    mask = torch.ones(64, 200, dtype=torch.bool, device=dev).tril(200 - 64)
    want = att.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    for impl in ("aten._scaled_dot_product_flash_attention", "sdpa(enable_gqa, causal_lower_right)"):
        _DENSE["impl"] = impl
        try:
            err = float((flash(q, k, v, True, D ** -0.5).float() - want).abs().max())
        except RuntimeError as exc:
            print(f"dense impl {impl}: {exc}".splitlines()[0])
            continue
        if err < 3e-2:
            print(f"dense baseline: {impl} (max err {err:.1e} vs math)")
            return
        print(f"dense impl {impl}: wrong result (max err {err})")
    raise SystemExit("no dense flash baseline available")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, nargs="*", default=[32768, 131072, 524288])
    ap.add_argument("--decode-at", type=int, nargs="*", default=[131072])
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-max-repeats", type=int, default=2, help="repeats of dense at > 128K")
    ap.add_argument("--no-cut-graph", action="store_true",
                    help="graph decode: block-cut tokens run the ordinary path instead of a second graph")
    ap.add_argument("--kv-in-place", action="store_true",
                    help="qllm: the prefill chunks' K/V projections written into the store rows by batched "
                         "GEMMs (CudaLayerMemory.kv_slots) instead of copied there")
    ap.add_argument("--no-dense", action="store_true",
                    help="prefill rows without the dense baseline (dense_ms null): for A/B runs of qllm knobs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "layer_h100.json"))
    ap.add_argument("--profile", type=int, default=0, help="profile qllm prefill of N tokens (0: off)")
    ap.add_argument("--profile-decode", type=int, default=0, help="profile 32 qllm decode steps after N tokens")
    ap.add_argument("--profile-decode-graph", type=int, default=0,
                    help="profile 32 graph-replayed qllm decode steps after N tokens")
    args = ap.parse_args()

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    Qllm.in_place = args.kv_in_place
    cfg = QLLMConfig(n_init=128, n_local=1024, block_size=128, topk=8, repr_topk=4, exc_block_size=512,
                     question_weight=4.0, chunk_size=CHUNK)
    layer = Layer(dev)
    cos, sin = rope_cos_sin(torch.arange(cfg.max_rel_position + 1, device=dev))
    rope = RopeTable(cos, sin)
    question = torch.randn(HQ, D, device=dev) * 0.1
    check_dense_flash(dev)
    n_all = max(args.prefill + args.decode_at + [args.profile, args.profile_decode, args.profile_decode_graph])
    x_all = torch.randn(n_all + args.decode_steps * 4, HIDDEN, device=dev, dtype=DT)

    # warm-up both paths (kernel loading, allocator)
    for M in (Qllm(layer, cfg, 20000, rope, question, dev), Dense(layer, 20000, dev)):
        prefill(M, x_all[:16384])
        for t in range(4):
            M.step(x_all[16384 + t:16385 + t])
    torch.cuda.synchronize()

    rows = []
    for N in args.prefill:
        x = x_all[:N]
        tq = []
        for _ in range(args.repeats):
            M = Qllm(layer, cfg, N + 64, rope, question, dev)
            tq.append(timed(lambda: prefill(M, x)))
            del M
        reps = 0 if args.no_dense else args.repeats if N <= 131072 else min(args.repeats, args.dense_max_repeats)
        td = []
        for _ in range(reps):
            M = Dense(layer, N + 64, dev)
            td.append(timed(lambda: prefill(M, x)))
            del M
        row = {"mode": "prefill", "tokens": N, "qllm_ms": statistics.median(tq),
               "dense_ms": statistics.median(td) if td else None, "qllm_all_ms": tq, "dense_all_ms": td}
        rows.append(row)
        dense_txt = f"{row['dense_ms']:9.2f} ms" if td else "(not run)"
        print(f"prefill {N:>7}: qllm {row['qllm_ms']:9.2f} ms   dense {dense_txt}", flush=True)
        torch.cuda.empty_cache()

    S = args.decode_steps
    for N in args.decode_at:
        x = x_all[:N]
        res = {}
        for name, make in (("qllm", lambda: Qllm(layer, cfg, N + 4 * S + 64, rope, question, dev)),
                           ("dense", lambda: Dense(layer, N + 4 * S + 64, dev)),
                           ("qllm_graph", lambda: Qllm(layer, cfg, N + 4 * S + 64, rope, question, dev)),
                           ("dense_graph", lambda: Dense(layer, N + 4 * S + 64, dev))):
            M = make()
            prefill(M, x)
            xs = x_all[N:N + 4 * S]
            if name == "qllm_graph":
                M = QllmGraph(M, cut_graph=not args.no_cut_graph)
            elif name == "dense_graph":
                M = DenseGraph(M)
            for t in range(4):  # warm the decode shapes (graphs: the first step captures)
                M.step(xs[t:t + 1])
            per = []
            for r in range(3):
                base = 4 + r * S

                def run(base=base):
                    for t in range(S):
                        M.step(xs[base + t:base + t + 1])
                per.append(timed(run) / S)
            res[name] = statistics.median(per)
            if name == "qllm_graph":
                res["qllm_graph_fallbacks"] = M.fallbacks
                # GPU time of the graph alone: back-to-back replays, no host work
                # between them (the memory does not advance: timing only)
                res["qllm_graph_replay_only"] = timed(lambda: [M.g[False][0].replay() for _ in range(S)]) / S
            del M
            torch.cuda.empty_cache()
        rows.append({"mode": "decode", "tokens": N, "qllm_ms": res["qllm"], "dense_ms": res["dense"],
                     "qllm_graph_ms": res["qllm_graph"], "dense_graph_ms": res["dense_graph"],
                     "qllm_graph_ordinary_steps": res["qllm_graph_fallbacks"],
                     "qllm_graph_replay_only_ms": res["qllm_graph_replay_only"],
                     "note": "qllm_ms / dense_ms: eager steps; *_graph_ms: one CUDA graph per layer step "
                             "(qllm: block-cut tokens, 1 in block_size, replay a second graph that ends with "
                             "the cut; ordinary steps: tokens neither graph takes; dense: attention over a "
                             "fixed N+1 keys)"})
        print(f"decode  {N:>7}: qllm {res['qllm']:9.4f} ms/token   dense {res['dense']:9.4f} ms/token   "
              f"graph: qllm {res['qllm_graph']:9.4f}  dense {res['dense_graph']:9.4f} ms/token "
              f"(qllm ordinary steps: {res['qllm_graph_fallbacks']}; replays alone "
              f"{res['qllm_graph_replay_only']:.4f})", flush=True)

    # projections only (the floor's first term), 128K
    if 131072 in args.prefill:
        x = x_all[:131072]

        def proj_only():
            for s in range(0, 131072, CHUNK):
                xc = x[s:s + CHUNK]
                q, k, v = layer.qkv(xc)
                _ = q.transpose(0, 1).reshape(-1, HQ * D) @ layer.wo.T
        proj = statistics.median([timed(proj_only) for _ in range(3)])
        # the K/V half of the projections, 128K: flat GEMMs + the copies into a store (what
        # attend_cuda does by default) against batched GEMMs writing the store rows in place
        store_k = torch.empty(HKV, 131072, D, dtype=DT, device=dev)
        store_v = torch.empty_like(store_k)

        def kv_flat():
            for s in range(0, 131072, CHUNK):
                _, k, v = layer.qkv(x[s:s + CHUNK])
                store_k[:, s:s + CHUNK].view(torch.int64).copy_(k.view(torch.int64))
                store_v[:, s:s + CHUNK].view(torch.int64).copy_(v.view(torch.int64))

        def kv_in_place():
            for s in range(0, 131072, CHUNK):
                layer.qkv_into(x[s:s + CHUNK], store_k[:, s:s + CHUNK], store_v[:, s:s + CHUNK])
        kv_ab = {}
        for name, fn in (("copy", kv_flat), ("in_place", kv_in_place)) * 2:
            kv_ab.setdefault(name, []).append(statistics.median([timed(fn) for _ in range(3)]))
        del store_k, store_v
        print(f"projections only, 128K: {proj:.2f} ms; q/k/v with the K/V copies {kv_ab['copy']} ms, "
              f"K/V in place {kv_ab['in_place']} ms")
    else:
        proj, kv_ab = None, None

    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "attention_kernel": attention_kernel(D),
        "qllm_env": qllm_env(),
        "config": {"hidden": HIDDEN, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16",
                   "chunk": CHUNK, "n_init": cfg.n_init, "n_local": cfg.n_local, "block_size": cfg.block_size,
                   "topk": cfg.topk, "repr_topk": cfg.repr_topk, "exc_block_size": cfg.exc_block_size,
                   "question_weight": cfg.question_weight, "repeats": args.repeats,
                   "decode_steps": S, "dense": _DENSE["impl"] + " (GQA, bottom-right causal)",
                   "graph_decode_cut_graph": not args.no_cut_graph, "kv_in_place": Qllm.in_place},
        "projections_only_128k_ms": proj,
        "qkv_128k_kv_copy_vs_in_place_ms": kv_ab,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        N = args.profile
        M = Qllm(layer, cfg, N + 64, rope, question, dev)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            prefill(M, x_all[:N])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    if args.profile_decode:
        from torch.profiler import ProfilerActivity, profile
        N = args.profile_decode
        M = Qllm(layer, cfg, N + 256, rope, question, dev)
        prefill(M, x_all[:N])
        for t in range(8):
            M.step(x_all[N + t:N + t + 1])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for t in range(8, 40):
                M.step(x_all[N + t:N + t + 1])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))
    if args.profile_decode_graph:
        from torch.profiler import ProfilerActivity, profile
        N = args.profile_decode_graph
        M = Qllm(layer, cfg, N + 256, rope, question, dev)
        prefill(M, x_all[:N])
        M = QllmGraph(M, cut_graph=not args.no_cut_graph)
        for t in range(8):
            M.step(x_all[N + t:N + t + 1])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for t in range(8, 40):
                M.step(x_all[N + t:N + t + 1])
            torch.cuda.synchronize()
        print(f"graph decode profile (ordinary steps: {M.fallbacks})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
