"""Tiered block memory on the CUDA fast path (``QLLMConfig.device_blocks`` with
qllm/gpu.py's CudaLayerMemory).  Skipped without CUDA.

A budget of N device blocks must change where block K/V live, never what is
computed:

* attend_cuda on a tiered memory (store = init + a ring of W rows that wraps
  many times; blocks in a device cache of N slots and a pinned host tier)
  gives bitwise the outputs, retrievals, token scores and representatives of
  the untiered memory, for budgets topk (every retrieval misses), 2*topk and
  more than the number of blocks, several segment patterns, f16/bf16, head_dim
  64/128, a question vector and question heads;
* after every call the device cache's placement (slot of each block) equals a
  Python LRU model fed with the retrieved ids and the cut blocks, the host tier
  holds every block's exact K/V, and the store does not grow with the text;
* the graph-capturable decode step (CudaDecodeStep) on a tiered memory gives
  bitwise attend_cuda's outputs on an untiered one (graph replays and eager);
* the patched model and GraphDecoder with a budget: logits bitwise equal to
  no budget;
* bad tier arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from _cuda_helpers import ByteTokenizer, DecodeStepRunner

import qllm
from qllm.attention import RopeTable
from qllm.config import QLLMConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

ops = torch.ops.qllm
DEV = "cuda"

# chunk_size 64: the ring is 256 rows for a text of up to ~1500 tokens (wraps ~5 times)
CFG = QLLMConfig(n_init=16, n_local=64, block_size=16, topk=4, repr_topk=16, exc_block_size=32,
                 question_weight=1.0, chunk_size=64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rope(P: int, D: int) -> RopeTable:
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return RopeTable(emb.cos().float(), emb.sin().float())


def _inputs(seed, hq, hkv, D, T, dtype):
    g = _gen(seed)
    return tuple((torch.randn(h, T, D, generator=g)).to(dtype).to(DEV) for h in (hq, hkv, hkv))


class LruModel:
    """The device cache's policy, in Python: each touch ticks a clock, resident blocks are
    stamped, a missing block takes the slot with the smallest stamp not stamped by this touch
    (free slots first, ties to the lower slot)."""

    def __init__(self, n_slots: int, miss_cap: int) -> None:
        self.n, self.miss_cap = n_slots, miss_cap
        self.clock = 0
        self.stamp = [-1] * n_slots
        self.block = [-1] * n_slots
        self.slot_of: dict[int, int] = {}
        self.fetched = self.placed = 0

    def touch(self, blocks, retrieved: bool) -> None:
        self.clock += 1
        c = self.clock
        for b in blocks:
            if b in self.slot_of:
                self.stamp[self.slot_of[b]] = c
        for b in blocks:
            if b in self.slot_of:
                continue
            cands = [(self.stamp[s], s) for s in range(self.n) if self.stamp[s] < c]
            if not cands:
                continue
            _, s = min(cands)
            if self.block[s] >= 0:
                del self.slot_of[self.block[s]]
            self.block[s], self.slot_of[b], self.stamp[s] = b, s, c
            if retrieved:
                self.fetched += 1
            else:
                self.placed += 1

    def call(self, rows, retrieved_log: torch.Tensor) -> None:
        """One attend_cuda call: rows of its schedule, its retrieved ids."""
        log = retrieved_log.cpu().tolist()
        for i, row in enumerate(rows):
            n_ret, cut_b0, cut_n = row[6], row[8], row[9]
            if n_ret > 0:
                self.touch(log[i][:n_ret], True)
            for b in range(cut_b0, cut_b0 + cut_n, self.miss_cap):
                self.touch(range(b, min(b + self.miss_cap, cut_b0 + cut_n)), False)

    def slots(self, n_blocks: int) -> list[int]:
        return [self.slot_of.get(b, -1) for b in range(n_blocks)]


def _pair(cfg, budget, hq, hkv, D, dtype, capacity=None):
    from qllm.gpu import CudaLayerMemory

    ref = CudaLayerMemory(cfg, hq, hkv, D, dtype, torch.device(DEV), capacity=capacity)
    mem = CudaLayerMemory(cfg.replace(device_blocks=budget), hq, hkv, D, dtype, torch.device(DEV),
                          capacity=capacity)
    assert mem.tiered and not ref.tiered
    return ref, mem


@pytest.mark.parametrize("budget", [4, 8, 1000])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float16, 128)])
@pytest.mark.parametrize("segments", [(64,) * 20, (50, 1, 1, 1, 13, 64, 1, 1, 64, 64, 64, 33) + (64,) * 8 + (1,) * 40],
                         ids=["chunks", "mixed"])
@pytest.mark.parametrize("question", [False, True])
def test_tiered_attend_cuda_bitwise_and_lru(budget, dtype, D, segments, question):
    from qllm.gpu import attend_cuda

    cfg = CFG
    hq, hkv = 8, 2
    T = sum(segments)
    q, k, v = _inputs(3, hq, hkv, D, T, dtype)
    rope = _rope(cfg.max_rel_position + 1, D)
    scaling = D ** -0.5
    ref, mem = _pair(cfg, budget, hq, hkv, D, dtype)
    if question:
        qv = (torch.randn(hq, D, generator=_gen(4)) * 0.5).to(DEV)
        ref.question = mem.question = qv
    model = LruModel(budget, mem.miss_cap)
    rows0 = mem.k_store.shape[1]
    start = 0
    for n in segments:
        sl = slice(start, start + n)
        rows, _ = mem._rows(n, rope.cos.shape[0])
        want = attend_cuda(ref, q[:, sl], k[:, sl], v[:, sl], rope, scaling)
        got = attend_cuda(mem, q[:, sl], k[:, sl], v[:, sl], rope, scaling)
        assert torch.equal(got, want), f"segment at {start}: max diff {float((got.float() - want.float()).abs().max())}"
        assert torch.equal(mem.retrieved_log, ref.retrieved_log)
        assert mem._state() == ref._state()
        model.call(rows, mem.retrieved_log)
        assert mem.block_slots().tolist() == model.slots(mem.n_blocks), f"placement after the segment at {start}"
        start += n
    torch.cuda.synchronize()
    assert torch.equal(mem.scores, ref.scores)
    assert torch.equal(mem.block_reprs(), ref.block_reprs())
    # the host tier holds every block's exact K/V; the ring did not grow
    nb = mem.n_blocks
    assert nb > 40
    ids = torch.arange(nb)
    hk, hv = mem.gather_blocks(ids)
    rk, rv = ref.gather_blocks(ids)
    assert torch.equal(hk, rk) and torch.equal(hv, rv)
    assert mem.k_store.shape[1] == rows0 == cfg.n_init + mem.window and mem.window < T // 2
    st = mem.tier_stats()
    assert st["blocks"] == st["on_host"] == nb and st["on_device"] == min(budget, nb)
    assert st["fetches"] == model.fetched and st["placed"] == model.placed
    assert st["evictions"] == model.fetched + model.placed - st["on_device"]
    if budget < nb:
        assert st["fetches"] > 0 and st["evictions"] > 0
    else:
        assert st["fetches"] == 0
    assert st["host_bytes"] >= 2 * nb * hkv * cfg.block_size * D * 2


def test_tiered_ring_grows_for_a_long_call():
    """A call longer than chunk_size grows (and re-lays out) the ring; outputs stay bitwise."""
    from qllm.gpu import attend_cuda

    cfg = CFG
    hq, hkv, D, dtype = 4, 2, 64, torch.bfloat16
    segments = (100, 700, 1, 1, 64, 300)
    T = sum(segments)
    q, k, v = _inputs(5, hq, hkv, D, T, dtype)
    rope = _rope(cfg.max_rel_position + 1, D)
    ref, mem = _pair(cfg, 4, hq, hkv, D, dtype)
    w0 = mem.window
    start = 0
    for n in segments:
        sl = slice(start, start + n)
        want = attend_cuda(ref, q[:, sl], k[:, sl], v[:, sl], rope, 0.125)
        got = attend_cuda(mem, q[:, sl], k[:, sl], v[:, sl], rope, 0.125)
        assert torch.equal(got, want)
        start += n
    assert mem.window > w0
    hk, _ = mem.gather_blocks(torch.arange(mem.n_blocks))
    assert torch.equal(hk, ref.gather_blocks(torch.arange(mem.n_blocks))[0])


def test_tiered_question_heads_bitwise():
    """Question heads (raw scores recorded from the ring at cut time, z-scored selection)."""
    from qllm.attention import _fixed_query
    from qllm.gpu import attend_cuda
    from qllm.retrieval import QuestionRelevance

    cfg = CFG
    hq, hkv, D, dtype = 8, 2, 64, torch.bfloat16
    segments = (64,) * 12 + (1,) * 20
    T = sum(segments)
    q, k, v = _inputs(6, hq, hkv, D, T, dtype)
    rope = _rope(cfg.max_rel_position + 1, D)
    qtok = _fixed_query(torch.randn(hq, 7, D, generator=_gen(7)), rope, cfg.n_local).to(DEV)
    ref, mem = _pair(cfg, 4, hq, hkv, D, dtype)
    for m in (ref, mem):
        m.layer_idx, m.question_tokens = 0, qtok
        m.relevance = QuestionRelevance(((0, 1), (1, 2)), torch.device(DEV))
    start = 0
    for n in segments:
        sl = slice(start, start + n)
        want = attend_cuda(ref, q[:, sl], k[:, sl], v[:, sl], rope, 0.125)
        got = attend_cuda(mem, q[:, sl], k[:, sl], v[:, sl], rope, 0.125)
        assert torch.equal(got, want) and torch.equal(mem.retrieved_log, ref.retrieved_log)
        start += n
    nb = mem.n_blocks
    c = mem.relevance.heads.index((0, 1))  # layer 0's head: the column these memories record
    assert mem.relevance.n_filled[c] == nb
    assert torch.equal(mem.relevance.raw[:nb, c], ref.relevance.raw[:nb, c])
    assert mem.tier_stats()["fetches"] > 0


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_tiered_decode_step_matches_untiered(graph):
    """CudaDecodeStep on a tiered memory (retrieved blocks fetched into the cache inside the
    step, ring row written from the device row) against attend_cuda on an untiered one."""
    from qllm.gpu import CudaDecodeStep, attend_cuda

    cfg = CFG
    hq, hkv, D, dtype = 8, 2, 64, torch.bfloat16
    prefill, steps = 600, 150
    T = prefill + steps
    q, k, v = _inputs(9, hq, hkv, D, T, dtype)
    rope = _rope(cfg.max_rel_position + 1, D)
    scaling = D ** -0.5
    ref, mem = _pair(cfg, 4, hq, hkv, D, dtype, capacity=T + 8)
    for s in range(0, prefill, 64):
        for m in (ref, mem):
            attend_cuda(m, q[:, s:min(s + 64, prefill)], k[:, s:min(s + 64, prefill)],
                        v[:, s:min(s + 64, prefill)], rope, scaling)
    runner = DecodeStepRunner(CudaDecodeStep(mem, rope, scaling), mem, rope, scaling, q, k, v, graph)
    n_fast = 0
    fetched0 = mem.tier_stats()["fetches"]
    for t in range(prefill, T):
        want = attend_cuda(ref, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rope, scaling).clone()
        want_log = ref.retrieved_log.clone()
        got, got_log, fast = runner.run(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        n_fast += fast
        assert torch.equal(got, want), f"token {t}: max diff {float((got.float() - want.float()).abs().max())}"
        assert torch.equal(got_log, want_log), f"token {t}"
        assert mem._state() == ref._state()
    assert n_fast >= steps - steps // 16 - 2
    torch.cuda.synchronize()
    assert torch.equal(mem.scores, ref.scores)
    assert mem.tier_stats()["fetches"] > fetched0
    nb = mem.n_blocks
    assert torch.equal(mem.gather_blocks(torch.arange(nb))[1], ref.gather_blocks(torch.arange(nb))[1])


def test_tiered_no_host_sync():
    """The tiered op loop (fetches, cut placement, ring writes, write-back) never syncs."""
    from qllm.gpu import attend_cuda

    cfg = CFG
    hq, hkv, D, dtype = 8, 2, 64, torch.bfloat16
    q, k, v = _inputs(10, hq, hkv, D, 1024, dtype)
    rope = _rope(cfg.max_rel_position + 1, D)
    _, mem = _pair(cfg, 4, hq, hkv, D, dtype)
    attend_cuda(mem, q[:, :64], k[:, :64], v[:, :64], rope, 0.125)  # first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(64, 1024, 64):
            attend_cuda(mem, q[:, s:s + 64], k[:, s:s + 64], v[:, s:s + 64], rope, 0.125)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert mem.n_blocks > 50 and mem.tier_stats()["fetches"] > 0


def test_tier_bad_arguments():
    from qllm.gpu import CudaLayerMemory

    cfg = CFG.replace(device_blocks=4)
    mem = CudaLayerMemory(cfg, 4, 2, 64, torch.bfloat16, torch.device(DEV))
    q = torch.randn(4, 3, 64, device=DEV, dtype=torch.bfloat16)
    rope = _rope(cfg.max_rel_position + 1, 64)
    cos, sin = mem._rope_tables(rope)
    sched = torch.tensor([[0, 3, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int64)
    args = (q, mem.k_store, mem.v_store, mem.scores, mem.reprs, torch.empty(1, 4, dtype=torch.int32, device=DEV),
            torch.empty_like(q), cos, sin, None, sched, 0.1, 1.0, [16, 64, 16, 4, 16, 0], None, None, [])
    tier = (mem.k_cache, mem.v_cache, mem.tier, mem.host_tab)
    W = mem.window
    bad = [
        ((*tier, [W, 64, mem.miss_cap]), "tier_cfg: expected"),
        ((*tier, [W + 1, 64, mem.miss_cap, 0]), "power of two"),
        ((*tier, [W // 2, 64, mem.miss_cap, 0]), "k_store: tiered mode"),
        ((*tier, []), "without tier_cfg"),
        ((mem.k_cache, None, mem.tier, mem.host_tab, [W, 64, mem.miss_cap, 0]), "needs k_cache"),
        ((mem.k_cache[:, :1], mem.v_cache, mem.tier, mem.host_tab, [W, 64, mem.miss_cap, 0]), "k_cache"),
        ((mem.k_cache, mem.v_cache, mem.tier[:10], mem.host_tab, [W, 64, mem.miss_cap, 0]), "tier: expected"),
        ((mem.k_cache, mem.v_cache, mem.tier.long(), mem.host_tab, [W, 64, mem.miss_cap, 0]), "tier: expected int32"),
        ((mem.k_cache, mem.v_cache, mem.tier, mem.host_tab[:, :0], [W, 64, mem.miss_cap, 0]), "host_tab"),
        ((*tier, [W, 64, mem.miss_cap, 100]), "ring of"),
    ]
    for extra, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            ops.attend_run(*args, *extra)
    with pytest.raises(ValueError, match="block_size"):
        CudaLayerMemory(cfg.replace(block_size=12), 4, 2, 64, torch.bfloat16, torch.device(DEV))


# ------------------------------------------------------------------ patched model


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    c = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=4096,
                    attn_implementation="sdpa")
    return LlamaForCausalLM(c).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patched_model_budget_bitwise_and_graph_decode(dtype):
    """Prefill (chunked, the ring wrapping) and 80 graph-decoded tokens with device_blocks=topk:
    logits bitwise those without a budget; every layer's store stays init + ring."""
    from qllm.gpu import GraphDecoder

    model = _tiny_llama(3).to("cuda", dtype)
    base = CFG.replace(topk=3, chunk_size=128)
    P, new = 900, 80
    ids = torch.randint(0, 256, (1, P), generator=torch.Generator().manual_seed(2)).cuda()
    outs = {}
    for budget in (None, 3):
        with qllm.patched(model, base.replace(device_blocks=budget)):
            qllm.set_question(model, torch.tensor([5, 17, 42, 99]))
            kw = model._qllm.cache_kw
            cache = qllm.QLLMCache(model._qllm)
            with torch.no_grad():
                logits = model(ids, **{kw: cache}, use_cache=True).logits
            dec = GraphDecoder(model, cache, new)
            assert dec.enabled, dec.reason
            tok = logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(new):
                lg = dec.step(tok).clone()
                steps.append(lg)
                tok = lg[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            assert dec.n_replays > new // 2
            mems = list(cache.memories.values())
            if budget is not None:
                for m in mems:
                    assert m.tiered and m.k_store.shape[1] == base.n_init + m.window < P
                    st = m.tier_stats()
                    assert st["on_device"] == budget and st["on_host"] == m.n_blocks and st["fetches"] > 0
            outs[budget] = (logits, torch.cat(steps, dim=1))
    assert torch.equal(outs[3][0], outs[None][0])
    assert torch.equal(outs[3][1], outs[None][1])



def test_generate_picks_a_budget_when_the_text_does_not_fit(monkeypatch, caplog):
    """qllm.generate on CUDA with little free GPU memory (mem_get_info faked) reads the text with
    tiered memory (logged) and answers exactly as with all blocks on the device."""
    import logging

    model = _tiny_llama(5).to("cuda", torch.bfloat16)
    model.generation_config.eos_token_id = None
    tok = ByteTokenizer()
    context = "".join(chr(97 + (7 * i) % 26) for i in range(1500))
    args = dict(config=CFG.replace(topk=3, chunk_size=128), max_new_tokens=40)
    want = qllm.generate(model, tok, context, "which letter?", **args)
    real = torch.cuda.mem_get_info
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 20, real(device)[1]))
    with caplog.at_level(logging.INFO, logger="qllm"):
        got = qllm.generate(model, tok, context, "which letter?", **args)
    assert "tiered memory with device_blocks=" in caplog.text
    assert got == want
