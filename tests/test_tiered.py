"""Tiered block memory: ``QLLMConfig.device_blocks`` in qllm.memory.LayerMemory.

A budget of N blocks per layer moves the other blocks' K/V to a host tier
(qllm._core.BlockStore in bookkeeping mode decides the slots, LRU where "use"
= retrieved).  It must change where blocks live, never what is computed:

* layer level (qllm.attention.attend): outputs, retrieved ids, representatives,
  block K/V and tail state are bitwise equal to ``device_blocks=None`` for
  budgets topk, topk+1, 2*topk and more than the number of blocks, over segment
  patterns (one prefill, prefill + 1-token decode, odd splits), strategies
  qllm / infllm with a question vector, float32 and bfloat16, one call per
  segment or per execution block;
* after every call: at most N blocks (and N pool rows) on the device, the
  placement equals the store's, the counters add up, and -- one call per
  execution block -- placement, fetches and evictions equal a small Python LRU
  model fed with the retrieved ids and the cut blocks;
* qllm.patch on a tiny random-weight Llama: logits bitwise equal with and
  without a budget (prefill, odd chunk, decode; question; question heads);
* config validation names QLLMConfig.device_blocks; the CUDA cache takes the
  fast path's tiers (block_size a power of two) or falls back to the generic
  path with a log line.  The fast path's tiers: tests/test_cuda_tiers.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

import qllm
from qllm.attention import RopeTable, attend
from qllm.memory import LayerMemory

BASE = qllm.QLLMConfig(n_init=8, n_local=32, block_size=8, topk=2, repr_topk=3, exc_block_size=16,
                       question_weight=2.0, strategy="qllm")
CPU = torch.device("cpu")
HQ, HKV, D = 4, 2, 16
T = 240  # (240 - 40) / 8 = 25 blocks
SEGMENTS = {
    "prefill": [T],
    "decode": [150] + [1] * (T - 150),
    "odd": [37, 5, 61, 1, 1, 90, 3, 42],
}
N_BLOCKS = (T - BASE.n_init - BASE.n_local) // BASE.block_size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------- helpers


def rope_table(n: int, head_dim: int = D) -> RopeTable:
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([ang, ang], dim=-1)
    return RopeTable(emb.cos().float(), emb.sin().float())


def random_inputs(seed: int, t: int = T, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(HQ, t, D, generator=g) * 1.5).to(dtype)
    k = torch.randn(HKV, t, D, generator=g).to(dtype)
    v = torch.randn(HKV, t, D, generator=g).to(dtype)
    question = torch.randn(HQ, D, generator=g) * 1.5
    return q, k, v, question


def pieces(segments, exc: int | None):
    """[start, end) of each attend call: one per segment, or one per execution block (exc)."""
    out, s = [], 0
    for n in segments:
        step = n if exc is None else exc
        out.extend((a, min(a + step, s + n)) for a in range(s, s + n, step))
        s += n
    return out


class LRUModel:
    """What the block store promises, for the calls LayerMemory makes (append / fetch)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.clock = cap, 0
        self.last: dict[int, int] = {}
        self.dev: set[int] = set()
        self.host: set[int] = set()
        self.fetches = self.evictions = 0

    def _evict(self, exclude=()) -> None:
        victim = min((b for b in self.dev if b not in exclude), key=lambda b: (self.last[b], b))
        self.dev.remove(victim)
        self.host.add(victim)
        self.evictions += 1

    def append(self, block: int) -> None:
        self.clock += 1
        if len(self.dev) == self.cap:
            self._evict()
        self.dev.add(block)
        self.last[block] = self.clock

    def fetch(self, ids: list[int]) -> None:
        want = set(ids)
        for b in ids:
            if b in self.host:
                if len(self.dev) == self.cap:
                    self._evict(want)
                self.host.remove(b)
                self.dev.add(b)
                self.fetches += 1
        self.clock += 1
        for b in ids:
            self.last[b] = self.clock


def check_tiers(mem: LayerMemory, budget: int, model: LRUModel | None = None) -> None:
    """Invariants of a budgeted memory after a call (and agreement with the LRU model)."""
    n = mem.n_blocks
    st = mem.tier_stats()
    assert st["budget"] == budget and st["blocks"] == n
    assert mem.n_device_blocks == st["on_device"] == min(n, budget)
    assert mem.n_host_blocks == st["on_host"] == n - min(n, budget)
    # every block starts on the device: the host holds evictions minus fetches
    assert st["on_host"] == st["evictions"] - st["fetches"]
    if n:
        assert mem.pool_k.shape[0] <= budget and mem.pool_v.shape[0] <= budget
    where = [mem.block_location(b) for b in range(n)]
    assert where == [mem.store.lookup(b) for b in range(n)]  # executed moves == store's placement
    dev = {b for b, (tier, _) in enumerate(where) if tier == "device"}
    assert len({s for t, s in where if t == "device"}) == len(dev)  # no two blocks in one slot
    assert len({s for t, s in where if t == "host"}) == n - len(dev)
    if mem.host_k is not None:
        assert all(s < mem.host_k.shape[0] for t, s in where if t == "host")
    assert st["device_bytes"] == mem.device_nbytes() and st["host_bytes"] == mem.host_nbytes()
    assert mem.nbytes() == mem.device_nbytes() + mem.host_nbytes()
    if model is not None:
        assert dev == model.dev, f"device tier {sorted(dev)}, LRU model {sorted(model.dev)}"
        assert (st["fetches"], st["evictions"]) == (model.fetches, model.evictions)


def run_layer(cfg, q, k, v, question, tab, segments, exc=None, check=None):
    """Drive attend; returns (output, retrieved ids per call, memory)."""
    mem = LayerMemory(cfg, HQ, HKV, D, q.dtype, CPU)
    mem.question = question.clone()
    outs, retrieved = [], []
    for a, e in pieces(segments, exc):
        n0 = mem.n_blocks
        outs.append(attend(mem, q[:, a:e], k[:, a:e], v[:, a:e], tab, D ** -0.5))
        ids = mem.last_retrieved
        retrieved.append(None if ids is None else ids.tolist())
        if check is not None:
            check(mem, retrieved[-1], n0)
    return torch.cat(outs, dim=1), retrieved, mem


def assert_same_state(a: LayerMemory, b: LayerMemory) -> None:
    assert a.n_blocks == b.n_blocks and a.n_seen == b.n_seen and a.tail_start == b.tail_start
    assert torch.equal(a.block_reprs(), b.block_reprs())
    assert torch.equal(a.block_keys(), b.block_keys())
    assert torch.equal(a.block_values(), b.block_values())
    for name in ("tail_k", "tail_v", "tail_scores", "init_k", "init_v"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------ layer level


@pytest.mark.parametrize("calls", ["segment", "exec_block"])
@pytest.mark.parametrize("pattern", list(SEGMENTS))
@pytest.mark.parametrize("strategy", ["qllm", "infllm"])
@pytest.mark.parametrize("budget", ["topk", "topk+1", "2*topk", "all"])
def test_layer_bitwise_equal_and_lru(budget, strategy, pattern, calls):
    cfg = BASE.replace(strategy=strategy)
    n = {"topk": cfg.topk, "topk+1": cfg.topk + 1, "2*topk": 2 * cfg.topk, "all": N_BLOCKS + 7}[budget]
    tab = rope_table(cfg.max_rel_position + 1)
    q, k, v, question = random_inputs(sum(map(ord, budget + strategy + pattern)))
    exc = cfg.exc_block_size if calls == "exec_block" else None
    want, want_ids, ref = run_layer(cfg, q, k, v, question, tab, SEGMENTS[pattern], exc)
    model = LRUModel(n) if calls == "exec_block" else None

    def check(mem, ids, n0):
        if model is not None:
            if ids is not None:
                model.fetch(ids)
            for b in range(n0, mem.n_blocks):
                model.append(b)
        check_tiers(mem, n, model)

    got, got_ids, mem = run_layer(cfg.replace(device_blocks=n), q, k, v, question, tab, SEGMENTS[pattern], exc,
                                  check)
    assert torch.equal(got, want)
    assert got_ids == want_ids
    assert_same_state(mem, ref)
    assert mem.n_blocks == N_BLOCKS
    st = mem.tier_stats()
    if n >= N_BLOCKS:
        assert (st["on_host"], st["fetches"], st["evictions"], mem.host_k) == (0, 0, 0, None)
    else:
        assert st["evictions"] >= N_BLOCKS - n and st["on_host"] == N_BLOCKS - n
    if n == cfg.topk and model is not None:
        assert st["fetches"] > 0  # the smallest budget does move blocks back
    assert ref.tier_stats() == {"budget": None, "blocks": N_BLOCKS, "on_device": N_BLOCKS, "on_host": 0,
                                "fetches": 0, "evictions": 0, "device_bytes": ref.nbytes(), "host_bytes": 0}


@pytest.mark.parametrize("budget", [2, 3])
def test_layer_wide_exec_blocks_cut_more_blocks_than_budget(budget):
    """64-query execution blocks cut up to 8 blocks at once: new blocks are evicted in the same cut."""
    cfg = BASE.replace(exc_block_size=64)
    tab = rope_table(cfg.max_rel_position + 1)
    q, k, v, question = random_inputs(70 + budget)
    segs = [130, 1, 1, 108]
    want, want_ids, ref = run_layer(cfg, q, k, v, question, tab, segs, cfg.exc_block_size)
    model = LRUModel(budget)
    cuts = []

    def check(mem, ids, n0):
        if ids is not None:
            model.fetch(ids)
        for b in range(n0, mem.n_blocks):
            model.append(b)
        cuts.append(mem.n_blocks - n0)
        check_tiers(mem, budget, model)

    got, got_ids, mem = run_layer(cfg.replace(device_blocks=budget), q, k, v, question, tab, segs,
                                  cfg.exc_block_size, check)
    assert max(cuts) > budget
    assert torch.equal(got, want) and got_ids == want_ids
    assert_same_state(mem, ref)


def test_layer_bfloat16_bitwise():
    cfg = BASE
    tab = rope_table(cfg.max_rel_position + 1)
    q, k, v, question = random_inputs(81, dtype=torch.bfloat16)
    want, want_ids, ref = run_layer(cfg, q, k, v, question, tab, SEGMENTS["odd"])
    got, got_ids, mem = run_layer(cfg.replace(device_blocks=3), q, k, v, question, tab, SEGMENTS["odd"],
                                  check=lambda m, ids, n0: check_tiers(m, 3))
    assert got.dtype == torch.bfloat16 and mem.host_k.dtype == torch.bfloat16
    assert torch.equal(got, want) and got_ids == want_ids
    assert_same_state(mem, ref)


def test_streaming_keeps_no_store():
    """Strategies without blocks accept any budget and keep no block store."""
    cfg = BASE.replace(strategy="streaming", device_blocks=0)
    tab = rope_table(cfg.max_rel_position + 1)
    q, k, v, question = random_inputs(90)
    want, _, _ = run_layer(BASE.replace(strategy="streaming"), q, k, v, question, tab, SEGMENTS["odd"])
    got, _, mem = run_layer(cfg, q, k, v, question, tab, SEGMENTS["odd"])
    assert torch.equal(got, want)
    assert mem.store is None and mem.n_blocks == 0 and mem.host_nbytes() == 0


def test_block_keys_values_and_nbytes():
    cfg = BASE.replace(device_blocks=3)
    tab = rope_table(cfg.max_rel_position + 1)
    q, k, v, question = random_inputs(91)
    _, _, ref = run_layer(BASE, q, k, v, question, tab, SEGMENTS["prefill"])
    _, _, mem = run_layer(cfg, q, k, v, question, tab, SEGMENTS["prefill"])
    ids = [7, 0, 24, 7, 3]
    assert sorted({mem.block_location(i)[0] for i in ids}) == ["device", "host"]
    for name in ("block_keys", "block_values"):
        want = getattr(ref, name)()[torch.tensor(ids)]
        assert torch.equal(getattr(mem, name)(ids), want)
        assert torch.equal(getattr(mem, name)(torch.tensor(ids, dtype=torch.int32)), want)
        assert torch.equal(getattr(ref, name)(ids), want)
        assert getattr(mem, name)([]).shape == (0, HKV, cfg.block_size, D)
    # the K/V of the blocks, by id: the tail-major keys cut from the text, in order
    first = cfg.n_init
    want_k = k[:, first:first + N_BLOCKS * cfg.block_size].reshape(HKV, N_BLOCKS, cfg.block_size, D).transpose(0, 1)
    assert torch.equal(mem.block_keys(), want_k)
    before = [mem.block_location(b) for b in range(mem.n_blocks)], mem.tier_stats()
    mem.block_keys([24, 1, 2])  # reading does not touch LRU state nor move anything
    assert ([mem.block_location(b) for b in range(mem.n_blocks)], mem.tier_stats()) == before
    for bad in ([25], [-1], [0, 99]):
        with pytest.raises(IndexError, match="ids"):
            mem.block_keys(bad)
    with pytest.raises(TypeError, match="ids"):
        mem.block_keys(torch.tensor([1.0]))
    with pytest.raises(IndexError, match="block"):
        mem.block_location(25)
    # bytes: device pool capped at the budget, the rest on the host
    row = HKV * cfg.block_size * D * 4
    assert mem.pool_k.shape[0] == 3
    assert mem.host_nbytes() == 2 * mem.host_k.shape[0] * row and mem.host_k.shape[0] >= N_BLOCKS - 3
    assert mem.device_nbytes() == ref.device_nbytes() - 2 * (ref.pool_k.shape[0] - 3) * row
    assert ref.host_nbytes() == 0 and ref.nbytes() == ref.device_nbytes()
    assert mem.nbytes() == mem.device_nbytes() + mem.host_nbytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_host_tier_bitwise():
    dev = torch.device("cuda")
    cfg = BASE
    tab = rope_table(cfg.max_rel_position + 1)
    tab = RopeTable(tab.cos.to(dev), tab.sin.to(dev))
    q, k, v, question = (t.to(dev) for t in random_inputs(95))

    def run(c):
        mem = LayerMemory(c, HQ, HKV, D, torch.float32, dev)
        mem.question = question.clone()
        outs = [attend(mem, q[:, a:e], k[:, a:e], v[:, a:e], tab, D ** -0.5) for a, e in pieces(SEGMENTS["odd"], None)]
        return torch.cat(outs, dim=1), mem

    want, ref = run(cfg)
    got, mem = run(cfg.replace(device_blocks=2))
    assert torch.equal(got, want)
    assert mem.host_k.is_pinned() and mem.host_k.device.type == "cpu" and mem.pool_k.device.type == "cuda"
    assert torch.equal(mem.block_keys(), ref.block_keys())
    assert mem.tier_stats()["fetches"] > 0


# ------------------------------------------------------------ config


@pytest.mark.parametrize("value,exc", [("4", TypeError), (4.0, TypeError), (True, TypeError),
                                       (-1, ValueError), (2**31, ValueError)])
def test_config_rejects_bad_device_blocks(value, exc):
    with pytest.raises(exc, match=r"QLLMConfig\.device_blocks"):
        qllm.QLLMConfig(device_blocks=value)


@pytest.mark.parametrize("strategy", ["qllm", "infllm"])
def test_config_device_blocks_below_topk(strategy):
    with pytest.raises(ValueError, match=r"QLLMConfig\.device_blocks: expected >= topk \(8\).*got 7"):
        qllm.QLLMConfig(strategy=strategy, topk=8, device_blocks=7)
    with pytest.raises(ValueError, match=r"QLLMConfig\.device_blocks"):
        qllm.QLLMConfig(strategy=strategy, topk=8, device_blocks=0)
    cfg = qllm.QLLMConfig(strategy=strategy, topk=8, device_blocks=8)
    assert cfg.device_blocks == 8
    with pytest.raises(ValueError, match=r"QLLMConfig\.device_blocks"):
        cfg.replace(topk=9)


@pytest.mark.parametrize("strategy", ["streaming", "full"])
def test_config_device_blocks_without_retrieval(strategy):
    assert qllm.QLLMConfig(strategy=strategy, device_blocks=0).device_blocks == 0
    assert qllm.QLLMConfig(device_blocks=None).device_blocks is None


# ------------------------------------------------------- whole model


VOCAB = 128


def make_llama(seed: int):
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()


def ids_of(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


def cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def run_model(model, cfg, ids, q_ids, after_call=None):
    """Prefill 131 tokens, an odd chunk of 9, then 1-token decode; logits of every call, the cache."""
    import inspect

    kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    logits, cache = [], None
    with qllm.patched(model, cfg):
        qllm.set_question(model, q_ids)
        with torch.no_grad():
            for a, e in [(0, 131), (131, 140)] + [(j, j + 1) for j in range(140, ids.shape[1])]:
                out = model(input_ids=ids[:, a:e], **({} if cache is None else {kw: cache}))
                cache = cache_of(out)
                logits.append(out.logits)
                if after_call is not None:
                    after_call(cache)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("strategy,budget,heads", [
    ("qllm", 2, None), ("qllm", 3, None), ("infllm", 2, None), ("qllm", 64, None),
    ("qllm", 2, ((0, 1), (1, 2))),
])
def test_patched_llama_logits_bitwise(strategy, budget, heads):
    model = make_llama(seed=5)
    ids, q_ids = ids_of(170, seed=6), ids_of(10, seed=7)[0]
    base = BASE.replace(strategy=strategy, question_heads=heads)
    want, ref = run_model(model, base, ids, q_ids)
    retrieved = []

    def after_call(cache):
        assert cache.memories
        for m in cache.memories.values():
            assert isinstance(m, LayerMemory)
            check_tiers(m, budget)
        retrieved.append(cache.retrieved_blocks())

    got, cache = run_model(model, base.replace(device_blocks=budget), ids, q_ids, after_call)
    assert torch.equal(got, want)
    n_blocks = (170 - BASE.n_init - BASE.n_local) // BASE.block_size
    assert retrieved[-1] == ref.retrieved_blocks()
    for i, m in cache.memories.items():
        r = ref.memories[i]
        assert m.n_blocks == r.n_blocks == n_blocks
        assert torch.equal(m.block_keys(), r.block_keys()) and torch.equal(m.block_reprs(), r.block_reprs())
        if budget < n_blocks:
            assert m.n_host_blocks == n_blocks - budget and m.host_nbytes() > 0
    assert cache.nbytes() == sum(m.device_nbytes() + m.host_nbytes() for m in cache.memories.values())


def test_cuda_cache_picks_fast_path_tiers_or_falls_back_with_a_log(monkeypatch, caplog):
    """With a budget the cache picks the CUDA fast path's tiered memory when block_size is a
    power of two; otherwise the generic path, with one log line (gpu.supports faked to True,
    the CUDA memory class replaced by a recorder: this runs without a GPU)."""
    import qllm.cache as cache_mod

    made = []

    class FakeCuda:
        def __init__(self, config, *args, **kwargs):
            made.append(config)

    model = make_llama(seed=8)
    monkeypatch.setattr(cache_mod.gpu, "supports", lambda *a, **k: True)
    monkeypatch.setattr(cache_mod.gpu, "CudaLayerMemory", FakeCuda)
    monkeypatch.setattr(qllm._log, "_seen", set())
    with qllm.patched(model, BASE.replace(device_blocks=4)):  # block_size 8
        cache = qllm.QLLMCache(model._qllm)
        m0 = cache.memory(0, HQ, HKV, D, torch.float32, CPU)
    assert type(m0) is FakeCuda and made[0].device_blocks == 4
    with qllm.patched(model, BASE.replace(device_blocks=4, block_size=12)):
        with caplog.at_level(logging.INFO, logger="qllm"):
            cache = qllm.QLLMCache(model._qllm)
            m0 = cache.memory(0, HQ, HKV, D, torch.float32, CPU)
            m1 = cache.memory(1, HQ, HKV, D, torch.float32, CPU)
    assert type(m0) is LayerMemory and type(m1) is LayerMemory and m0.store is not None
    lines = [r.getMessage() for r in caplog.records if "device_blocks" in r.getMessage()]
    assert len(lines) == 1 and "generic torch path" in lines[0] and "power-of-two" in lines[0]


# ------------------------------------------------------- automatic budget (qllm.generate on CUDA)


def test_auto_device_blocks_budget_math():
    """None while the untiered memories fit the share of free memory; else the blocks that fit
    after the tiered layers' fixed part, clamped to [topk, blocks of the text]."""
    from qllm.gpu import auto_device_blocks

    cfg = qllm.QLLMConfig()  # 8B-like geometry below: 4 KiB of K/V per token per layer in bf16
    geo = dict(n_layers=32, n_q_heads=32, n_kv_heads=8, head_dim=128, element_size=2)
    gib = 2 ** 30
    # 128K tokens: 16 GiB of K/V + 0.5 GiB of representatives -> fits 60 GiB free
    assert auto_device_blocks(cfg, 131072, free_bytes=60 * gib, **geo) is None
    # 1M tokens with 40 GiB free: 0.6 * 40 = 24 GiB; fixed part 32 * (16512 rows * 4 KiB + 8192 * 16 KiB)
    n = 1 << 20
    b = auto_device_blocks(cfg, n, free_bytes=40 * gib, **geo)
    fixed = 32 * ((128 + 16384) * 4096 + ((n - 128) // 128 + 1) * 32 * 128 * 4)
    assert b == int((0.6 * 40 * gib - fixed) // (32 * 128 * 4096))
    assert cfg.topk <= b < (n - 128) // 128
    assert auto_device_blocks(cfg, n, free_bytes=80 * gib, **geo) > b          # more memory, more slots
    assert auto_device_blocks(cfg, n, free_bytes=1 * gib, **geo) == cfg.topk   # never below topk
    for c in (cfg.replace(device_blocks=64), cfg.replace(strategy="streaming"), cfg.replace(block_size=96)):
        assert auto_device_blocks(c, n, free_bytes=1 * gib, **geo) is None


def test_cache_budget_override_builds_tiered_memories():
    """QLLMCache.device_blocks replaces the patch's budget for that sequence's layer memories."""
    model = make_llama(seed=9)
    with qllm.patched(model, BASE):
        cache = qllm.QLLMCache(model._qllm)
        assert cache.config is model._qllm.config and cache.config.device_blocks is None
        cache.device_blocks = 3
        assert cache.config.device_blocks == 3 and model._qllm.config.device_blocks is None
        m = cache.memory(0, HQ, HKV, D, torch.float32, CPU)
        assert type(m) is LayerMemory and m.store is not None and m.config.device_blocks == 3


def test_generate_sets_no_budget_off_cuda():
    """qllm.generate's automatic budget applies to CUDA models only."""
    from qllm.generate import _budget_for

    model = make_llama(seed=10)
    with qllm.patched(model, BASE):
        cache = qllm.QLLMCache(model._qllm)
        _budget_for(model, cache, 10 ** 7)
        assert cache.device_blocks is None
