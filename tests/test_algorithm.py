"""The layer algorithm (qllm.attention.attend over a qllm.memory.LayerMemory)
against the slow reference qllm.reference.reference_attention.

Fresh seeded random q/k/v per case; cos/sin from transformers' own rotary
modules (plain, llama3 and yarn scaling) or computed.  Compared: outputs,
retrieved block ids per execution block, block representatives, token scores
of the tail, block count -- for strategies qllm / infllm / streaming, several
segment patterns (one prefill, prefill + single-token decode, odd splits),
GQA shapes, config corner cases, and the short-text case against plain causal
attention (and torch SDPA).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qllm
from qllm.attention import RopeTable, attend, encode_question
from qllm.memory import LayerMemory
from qllm.reference import causal_attention_ref, reference_attention, reference_question, rope_ref

BASE = qllm.QLLMConfig(n_init=8, n_local=32, block_size=8, topk=2, repr_topk=3, exc_block_size=16,
                       question_weight=2.0, strategy="qllm")
HEADS = [(4, 4), (4, 2), (6, 2)]
ATOL = 2e-5
RTOL = 1e-5
CPU = torch.device("cpu")


# ----------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (several threads only add sync cost, badly so on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rope_tables(kind: str, head_dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, head_dim] of positions 0..n-1."""
    if kind == "computed":
        inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos().float(), emb.sin().float()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {
        "default": {"rope_type": "default", "rope_theta": 10000.0},
        "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        # yarn carries an attention factor: cos[0] != 1
        "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                 "original_max_position_embeddings": 32},
    }[kind]
    max_pos = 128 if kind == "yarn" else 4096  # yarn: factor == max_pos / original_max_pos
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=params)
    rot = LlamaRotaryEmbedding(cfg)
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, 1, head_dim), torch.arange(n).unsqueeze(0))
    return cos[0].float(), sin[0].float()


def table_for(cfg: qllm.QLLMConfig, head_dim: int, kind: str = "default") -> RopeTable:
    n = max(cfg.max_rel_position, cfg.n_init + cfg.n_local) + 1
    cos, sin = rope_tables(kind, head_dim, n)
    return RopeTable(cos, sin)


def random_qkv(seed: int, hq: int, hkv: int, d: int, t: int, q_scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, t, d, generator=g) * q_scale
    k = torch.randn(hkv, t, d, generator=g)
    v = torch.randn(hkv, t, d, generator=g)
    return q, k, v


def random_question(seed: int, hq: int, hkv: int, d: int, n: int, cfg, tab, scaling):
    g = torch.Generator().manual_seed(seed + 1000)
    qq = torch.randn(hq, n, d, generator=g) * 1.5
    qk = torch.randn(hkv, n, d, generator=g)
    return reference_question(qq, qk, config=cfg, cos=tab.cos, sin=tab.sin, scaling=scaling)


def _seed(*parts) -> int:
    """A deterministic seed from the test parameters (Python's str hash is salted per process)."""
    return sum((i + 1) * sum(map(ord, str(p))) for i, p in enumerate(parts)) % 100_000


def exec_pieces(segments, exc: int):
    """The execution blocks [start, end) of a segment pattern (rule 1)."""
    out, s = [], 0
    for n in segments:
        for a in range(s, s + n, exc):
            out.append((a, min(a + exc, s + n)))
        s += n
    return out


def run_fast(cfg, q, k, v, tab, scaling, segments, question=None, per_block=True):
    """Drive attend like the patch does.  per_block: one call per execution block
    (so mem.last_retrieved can be read after each); else one call per segment."""
    hq, t, d = q.shape
    mem = LayerMemory(cfg, hq, k.shape[0], d, q.dtype, CPU)
    if question is not None:
        mem.question = question.clone()
    outs, retrieved = [], []
    pieces = exec_pieces(segments, cfg.exc_block_size) if per_block else \
        [(s - n, s) for n, s in zip(segments, torch.tensor(segments).cumsum(0).tolist())]
    for a, e in pieces:
        outs.append(attend(mem, q[:, a:e], k[:, a:e], v[:, a:e], tab, scaling))
        ids = mem.last_retrieved
        retrieved.append([] if ids is None else sorted(ids.tolist()))
    return torch.cat(outs, dim=1), retrieved, mem


def assert_close(got, want, what, atol=ATOL, rtol=RTOL):
    err = (got.float() - want.float()).abs()
    tol = atol + rtol * want.float().abs()
    bad = err > tol
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} entries differ; max |err| "
                             f"{float(err.max()):.3e}; first at {idx}: got {float(got[tuple(idx)]):.6g}, "
                             f"want {float(want[tuple(idx)]):.6g}")


def compare(cfg, q, k, v, tab, scaling, segments, question=None, check_state=True):
    """Fast vs reference on one text: outputs, retrieval, representatives, scores."""
    ref, info = reference_attention(q, k, v, config=cfg, cos=tab.cos, sin=tab.sin, scaling=scaling,
                                    question=question, segments=segments)
    out, retrieved, mem = run_fast(cfg, q, k, v, tab, scaling, segments, question)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert len(retrieved) == len(info["retrieved"])
    for i, (got, want) in enumerate(zip(retrieved, info["retrieved"])):
        assert got == want, (f"execution block {i} {info['exec_blocks'][i]}: retrieved {got}, reference {want} "
                             f"(smallest reference score gap {info['retrieval_gap']:.3g})")
    assert_close(out, ref, "attention output")
    if check_state:
        nb = len(info["block_starts"])
        assert mem.n_blocks == nb, f"blocks: fast {mem.n_blocks}, reference {nb}"
        if nb:
            assert_close(mem.block_reprs(), info["reprs"], "representatives", atol=1e-5)
        # token scores of the tokens still in the tail (rule 4)
        t = q.shape[1]
        assert mem.n_seen == t
        tail = info["scores"][:, mem.tail_start:t]
        assert mem.tail_scores.shape == tail.shape
        assert_close(mem.tail_scores, tail, "token scores", atol=1e-5)
    return ref, info, out, retrieved


SEGMENTS = {
    "prefill": [200],
    "decode": [180] + [1] * 20,
    "odd_split": [77, 123],
    "many": [5, 1, 1, 40, 33, 1, 1, 1, 118],
}

# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("pattern", list(SEGMENTS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("variant", ["qllm+question", "qllm", "infllm", "streaming"])
def test_matches_reference(variant, heads, pattern):
    hq, hkv = heads
    strategy = variant.split("+")[0]
    cfg = BASE.replace(strategy=strategy)
    d = 16 if hq != 6 else 32
    seed = _seed(variant, heads, pattern)
    q, k, v = random_qkv(seed, hq, hkv, d, sum(SEGMENTS[pattern]))
    tab = table_for(cfg, d)
    scaling = d ** -0.5
    question = random_question(seed, hq, hkv, d, 12, cfg, tab, scaling) if "question" in variant else None
    ref, info, out, retrieved = compare(cfg, q, k, v, tab, scaling, SEGMENTS[pattern], question)
    if strategy == "streaming":
        assert all(r == [] for r in retrieved)
    else:
        n_blocks = len(info["block_starts"])
        assert n_blocks == (200 - cfg.n_local - cfg.n_init) // cfg.block_size
        assert sum(1 for r in retrieved if r) > 5  # retrieval actually happened
        assert all(len(r) == min(cfg.topk, len(r)) for r in retrieved)


@pytest.mark.parametrize("rope", ["default", "llama3", "yarn", "computed"])
@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
def test_rope_variants(rope, strategy):
    cfg = BASE.replace(strategy=strategy)
    hq, hkv, d = 4, 2, 32
    tab = table_for(cfg, d, rope)
    if rope == "yarn":
        assert not torch.allclose(tab.cos[0], torch.ones(d))  # attention factor in cos[0]
    q, k, v = random_qkv(_seed(rope, strategy), hq, hkv, d, 180)
    scaling = d ** -0.5
    question = random_question(7, hq, hkv, d, 9, cfg, tab, scaling) if strategy == "qllm" else None
    compare(cfg, q, k, v, tab, scaling, [101, 79], question)


CONFIG_VARIANTS = {
    "exc_gt_local": dict(exc_block_size=48),  # keys of the same execution block become memory
    "no_init": dict(n_init=0),
    "repr_topk_gt_block": dict(repr_topk=10),
    "topk_gt_blocks": dict(topk=50),
    "odd_sizes": dict(n_init=3, n_local=17, block_size=5, exc_block_size=7, topk=3),
    "exc_1": dict(exc_block_size=1),
    "one_token_blocks": dict(block_size=1, topk=5, repr_topk=1),
    "big_blocks": dict(block_size=24, n_local=20, exc_block_size=24, topk=1),
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
def test_config_variants(variant, strategy):
    cfg = BASE.replace(strategy=strategy, **CONFIG_VARIANTS[variant])
    hq, hkv, d = 4, 2, 16
    tab = table_for(cfg, d)
    t = 170
    q, k, v = random_qkv(_seed(variant, strategy), hq, hkv, d, t)
    scaling = d ** -0.5
    question = random_question(3, hq, hkv, d, 10, cfg, tab, scaling) if strategy == "qllm" else None
    compare(cfg, q, k, v, tab, scaling, [t - 30] + [1] * 10 + [20], question)


@pytest.mark.parametrize("segments", [[39], [10, 29], [1] * 39, [20, 1, 1, 17]], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
def test_short_text_is_causal_attention(strategy, heads, segments):
    """T < n_init + n_local: every strategy is plain causal attention (and the reference says so too)."""
    cfg = BASE.replace(strategy=strategy)
    hq, hkv = heads
    d = 16
    t = sum(segments)
    assert t < cfg.n_init + cfg.n_local
    tab = table_for(cfg, d, "llama3")
    q, k, v = random_qkv(_seed(strategy, heads, str(segments)), hq, hkv, d, t)
    scaling = 0.3
    # plain causal attention with SDPA on rotated q/k at the true positions
    pos = torch.arange(t)
    qr = rope_ref(q, pos, tab.cos, tab.sin)
    kr = rope_ref(k, pos, tab.cos, tab.sin).repeat_interleave(hq // hkv, dim=0)
    vr = v.repeat_interleave(hq // hkv, dim=0)
    sdpa = F.scaled_dot_product_attention(qr[None], kr[None], vr[None], is_causal=True, scale=scaling)[0]
    dense = causal_attention_ref(q, k, v, cos=tab.cos, sin=tab.sin, scaling=scaling)
    assert_close(dense, sdpa, "causal reference vs SDPA")
    question = random_question(1, hq, hkv, d, 6, cfg, tab, scaling) if strategy == "qllm" else None
    ref, info = reference_attention(q, k, v, config=cfg, cos=tab.cos, sin=tab.sin, scaling=scaling,
                                    question=question, segments=segments)
    assert_close(ref, sdpa, "reference vs SDPA")
    out, retrieved, mem = run_fast(cfg, q, k, v, tab, scaling, segments, question, per_block=False)
    assert_close(out, sdpa, "attend vs SDPA")
    assert mem.n_blocks == 0 and all(r == [] for r in retrieved)
    assert_close(mem.tail_scores, info["scores"], "token scores", atol=1e-5)
    # every query's probabilities sum to 1, so the scores sum to the number of queries
    assert math.isclose(float(mem.tail_scores.sum()), hq * t, rel_tol=1e-5)


@pytest.mark.parametrize("pattern", ["prefill", "odd_split", "many"])
@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
def test_segment_call_equals_block_calls(strategy, pattern):
    """attend on a whole segment == attend on its execution blocks one by one (and the same state)."""
    cfg = BASE.replace(strategy=strategy)
    hq, hkv, d = 4, 2, 16
    tab = table_for(cfg, d)
    segs = SEGMENTS[pattern]
    q, k, v = random_qkv(_seed(strategy, pattern), hq, hkv, d, sum(segs))
    scaling = d ** -0.5
    question = random_question(5, hq, hkv, d, 8, cfg, tab, scaling) if strategy == "qllm" else None
    a, _, ma = run_fast(cfg, q, k, v, tab, scaling, segs, question, per_block=True)
    b, rb, mb = run_fast(cfg, q, k, v, tab, scaling, segs, question, per_block=False)
    assert_close(b, a, "segment-wise vs block-wise", atol=1e-6)
    assert ma.n_blocks == mb.n_blocks and ma.tail_start == mb.tail_start
    ref, info = reference_attention(q, k, v, config=cfg, cos=tab.cos, sin=tab.sin, scaling=scaling,
                                    question=question, segments=segs)
    assert_close(b, ref, "segment-wise vs reference")
    assert rb[-1] == info["retrieved"][-1]


def test_question_weight_zero_is_infllm():
    hq, hkv, d = 6, 2, 16
    cfg_q = BASE.replace(strategy="qllm", question_weight=0.0)
    cfg_i = BASE.replace(strategy="infllm")
    tab = table_for(cfg_q, d)
    q, k, v = random_qkv(11, hq, hkv, d, 200)
    question = random_question(11, hq, hkv, d, 10, cfg_q, tab, d ** -0.5)
    segs = [150] + [1] * 50
    a, ra, _ = run_fast(cfg_q, q, k, v, tab, d ** -0.5, segs, question)
    b, rb, _ = run_fast(cfg_i, q, k, v, tab, d ** -0.5, segs, None)
    assert ra == rb
    assert torch.equal(a, b)
    ref, info = reference_attention(q, k, v, config=cfg_q, cos=tab.cos, sin=tab.sin, scaling=d ** -0.5,
                                    question=question, segments=segs)
    assert info["retrieved"] == ra
    assert_close(a, ref, "w=0 vs reference")


def test_question_changes_retrieval():
    """A question with a large weight must steer retrieval (the comparison is not vacuous)."""
    hq, hkv, d = 4, 2, 16
    cfg = BASE.replace(strategy="qllm", question_weight=50.0)
    tab = table_for(cfg, d)
    q, k, v = random_qkv(21, hq, hkv, d, 200)
    question = random_question(21, hq, hkv, d, 12, cfg, tab, d ** -0.5)
    _, with_q, _ = run_fast(cfg, q, k, v, tab, d ** -0.5, [200], question)
    _, without, _ = run_fast(cfg, q, k, v, tab, d ** -0.5, [200], None)
    assert with_q != without
    _, info = reference_attention(q, k, v, config=cfg, cos=tab.cos, sin=tab.sin, scaling=d ** -0.5,
                                  question=question)
    assert info["retrieved"] == with_q


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("n", [1, 3, 12, 32])
def test_encode_question(heads, n):
    """encode_question: plain causal attention over the question + rule-7 vector."""
    hq, hkv = heads
    d = 16
    cfg = BASE
    tab = table_for(cfg, d, "yarn")
    g = torch.Generator().manual_seed(100 + n)
    q = torch.randn(hq, n, d, generator=g) * 1.5
    k = torch.randn(hkv, n, d, generator=g)
    v = torch.randn(hkv, n, d, generator=g)
    mem = LayerMemory(cfg, hq, hkv, d, torch.float32, CPU)
    out, qvec = encode_question(mem, q, k, v, tab, d ** -0.5)
    want, gap = reference_question(q, k, config=cfg, cos=tab.cos, sin=tab.sin, scaling=d ** -0.5, return_gap=True)
    assert qvec.shape == (hq, d)
    assert_close(qvec, want, f"question vector (score gap {gap:.2g})")
    assert_close(out, causal_attention_ref(q, k, v, cos=tab.cos, sin=tab.sin, scaling=d ** -0.5),
                 "question attention output")
    # the state of the layer itself is untouched
    assert mem.n_seen == 0 and mem.question is None
    # return_fixed: the same output and vector, plus the fixed-position queries (bitwise _fixed_query's)
    from qllm.attention import _fixed_query
    out2, qvec2, q_fix = encode_question(mem, q, k, v, tab, d ** -0.5, return_fixed=True)
    assert torch.equal(out2, out) and torch.equal(qvec2, qvec)
    assert torch.equal(q_fix, _fixed_query(q.float(), tab, cfg.n_local))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,n", [((4, 2), 1), ((4, 2), 7), ((8, 2), 23), ((4, 4), BASE.n_local)])
def test_encode_question_is_the_generic_block(dtype, heads, n):
    """encode_question is _exec_block on a fresh streaming memory (one execution block of the
    question, no init tokens) written out: bitwise the same output, token scores and vector."""
    from qllm.attention import _exec_block, _fixed_query
    from qllm.retrieval import question_vector

    hq, hkv = heads
    d = 16
    cfg = BASE
    tab = table_for(cfg, d, "yarn")
    g = torch.Generator().manual_seed(7 * n + hq)
    q = (torch.randn(hq, n, d, generator=g) * 2).to(dtype)
    k = torch.randn(hkv, n, d, generator=g).to(dtype)
    v = torch.randn(hkv, n, d, generator=g).to(dtype)
    mem = LayerMemory(cfg, hq, hkv, d, dtype, CPU)
    out, qvec, q_fix = encode_question(mem, q, k, v, tab, d ** -0.5, return_fixed=True)
    scratch = LayerMemory(cfg.replace(strategy="streaming", n_init=0, exc_block_size=n), hq, hkv, d, dtype, CPU)
    want_fix = _fixed_query(q.float(), tab, cfg.n_local)
    want = _exec_block(scratch, q, k, v, tab, d ** -0.5, q_fix=want_fix)
    assert out.dtype == dtype and torch.equal(out, want)
    assert torch.equal(q_fix, want_fix)
    assert torch.equal(qvec, question_vector(want_fix, scratch.tail_scores, cfg))
    with pytest.raises(ValueError, match="n_local"):
        encode_question(mem, q.new_zeros(hq, cfg.n_local + 1, d), k.new_zeros(hkv, cfg.n_local + 1, d),
                        v.new_zeros(hkv, cfg.n_local + 1, d), tab, d ** -0.5)


def test_retrieval_ties_go_to_lower_block():
    """All blocks with identical keys: identical representatives, exactly tied scores -> lowest ids."""
    cfg = BASE.replace(strategy="infllm", topk=3)
    hq, hkv, d = 4, 2, 16
    tab = table_for(cfg, d)
    q, k, v = random_qkv(5, hq, hkv, d, 200)
    k[:, cfg.n_init:] = k[:, cfg.n_init:cfg.n_init + 1]  # one key everywhere after the init tokens
    ref, info, out, retrieved = compare(cfg, q, k, v, tab, d ** -0.5, [200])
    assert [r for r in retrieved if r][-1] == [0, 1, 2]
    assert all(r == [0, 1, 2] for r in retrieved if len(r) == 3)


def test_comparison_detects_wrong_algorithm():
    """The comparison is sensitive: a reference with a slightly different config disagrees."""
    hq, hkv, d = 4, 2, 16
    cfg = BASE.replace(strategy="infllm")
    tab = table_for(cfg, d)
    q, k, v = random_qkv(9, hq, hkv, d, 200)
    out, retrieved, _ = run_fast(cfg, q, k, v, tab, d ** -0.5, [200])
    for change in (dict(n_local=31), dict(topk=3), dict(block_size=9), dict(repr_topk=2), dict(n_init=7),
                   dict(strategy="streaming"), dict(exc_block_size=8)):
        ref, info = reference_attention(q, k, v, config=cfg.replace(**change), cos=tab.cos, sin=tab.sin,
                                        scaling=d ** -0.5)
        differs = (info["retrieved"] != retrieved) if len(info["retrieved"]) == len(retrieved) else True
        differs = differs or not torch.allclose(out, ref, atol=ATOL, rtol=RTOL)
        assert differs, f"reference with {change} still matches"


def test_reference_rules_by_hand():
    """Small facts of the spec, checked on the reference itself."""
    cfg = BASE.replace(strategy="infllm")
    hq, hkv, d = 2, 1, 16
    tab = table_for(cfg, d)
    q, k, v = random_qkv(1, hq, hkv, d, 120)
    _, info = reference_attention(q, k, v, config=cfg, cos=tab.cos, sin=tab.sin, scaling=0.25,
                                  segments=[100, 20])
    # rule 3: blocks start at n_init and tile consecutively; cut only after leaving the window
    starts = info["block_starts"]
    assert starts == [cfg.n_init + b * cfg.block_size for b in range(len(starts))]
    assert starts[-1] + cfg.block_size <= 120 - cfg.n_local
    assert (120 - cfg.n_local) - (starts[-1] + cfg.block_size) < cfg.block_size
    # rule 1: execution blocks restart at segment boundaries
    assert info["exec_blocks"][:7] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80), (80, 96), (96, 100)]
    assert info["exec_blocks"][7] == (100, 116)
    # rule 4: each query spreads mass 1 over its keys; local keys get at most that
    assert float(info["scores"].sum()) <= hq * 120 + 1e-6


# ------------------------------------------------------------ question heads (rule 6b)


def _heads_case(seed: int, hq: int, hkv: int, d: int, t: int, own: tuple, n_lower: int, cfg):
    q, k, v = random_qkv(seed, hq, hkv, d, t)
    g = torch.Generator().manual_seed(seed + 7)
    qq = torch.randn(hq, 6, d, generator=g) * 1.5       # un-rotated question queries
    n_blocks_max = t // cfg.block_size + 1
    lower = [torch.randn(n_blocks_max, generator=g, dtype=torch.float64) * 3 for _ in range(n_lower)]
    return q, k, v, qq, lower


def run_fast_heads(cfg, q, k, v, tab, scaling, segments, qq, own, lower, layer=2, later=()):
    """attend with a QuestionRelevance holding `lower` as heads of layers < layer, `own` of this layer
    and `later` as heads of a later layer; as in a model's forward passes, the later layer has scored
    the blocks that existed when each segment began (its columns' n_filled follow that)."""
    from qllm.attention import _fixed_query
    from qllm.retrieval import QuestionRelevance

    hq, t, d = q.shape
    lower_pairs = [(i % layer, 50 + i) for i in range(len(lower))]  # lower layers (head ids only label columns)
    later_pairs = [(layer + 3, 60 + i) for i in range(len(later))]
    rel = QuestionRelevance(lower_pairs + [(layer, h) for h in own] + later_pairs, CPU)
    full = list(lower) + list(later)
    nmax = full[0].shape[0] if full else 1
    rel.raw = torch.zeros(max(nmax, 16), len(rel.heads))
    for pairs, cols in ((lower_pairs, lower), (later_pairs, later)):
        for i, col in enumerate(cols):
            c = rel.heads.index(pairs[i])
            rel.raw[:nmax, c] = col.float()
            rel.n_filled[c] = nmax
    later_cols = [rel.heads.index(p) for p in later_pairs]
    mem = LayerMemory(cfg, hq, k.shape[0], d, q.dtype, CPU)
    mem.layer_idx, mem.relevance = layer, rel
    mem.question = torch.zeros(hq, d)  # unused by the heads term; marks "a question is known"
    mem.question_tokens = _fixed_query(qq.float(), tab, cfg.n_local)
    outs, retrieved = [], []
    starts = {sum(segments[:i]) for i in range(len(segments))}
    for a, e in exec_pieces(segments, cfg.exc_block_size):
        if a in starts:
            for c in later_cols:
                rel.n_filled[c] = mem.n_blocks
        outs.append(attend(mem, q[:, a:e], k[:, a:e], v[:, a:e], tab, scaling))
        ids = mem.last_retrieved
        retrieved.append([] if ids is None else sorted(ids.tolist()))
    return torch.cat(outs, dim=1), retrieved, mem, rel


@pytest.mark.parametrize("pattern", ["prefill", "decode", "many"])
@pytest.mark.parametrize("own,n_lower", [((0,), 0), ((1, 3), 0), ((), 2), ((2,), 3)],
                         ids=["own1", "own2", "lower2", "own1+lower3"])
def test_question_heads_match_reference(own, n_lower, pattern):
    """Rule 6b: per-block question scores of question heads (own layer and earlier layers), standardised."""
    hq, hkv, d = 4, 2, 16
    cfg = BASE.replace(question_weight=1.5)
    seed = _seed("heads", own, n_lower, pattern)
    t = sum(SEGMENTS[pattern])
    q, k, v, qq, lower = _heads_case(seed, hq, hkv, d, t, own, n_lower, cfg)
    tab = table_for(cfg, d)
    scaling = d ** -0.5
    ref, info = reference_attention(q, k, v, config=cfg, cos=tab.cos, sin=tab.sin, scaling=scaling,
                                    segments=SEGMENTS[pattern], question_q=qq, question_heads=own,
                                    lower_head_scores=lower)
    out, retrieved, mem, rel = run_fast_heads(cfg, q, k, v, tab, scaling, SEGMENTS[pattern], qq, own, lower)
    for i, (got, want) in enumerate(zip(retrieved, info["retrieved"])):
        assert got == want, (f"execution block {i}: retrieved {got}, reference {want} "
                             f"(smallest reference score gap {info['retrieval_gap']:.3g})")
    assert_close(out, ref, "attention output")
    nb = len(info["block_starts"])
    assert mem.n_blocks == nb and nb > 5
    for i, h in enumerate(own):  # raw per-block head scores
        c = rel.heads.index((2, h))
        assert rel.n_filled[c] == nb
        assert_close(rel.raw[:nb, c], info["head_scores"][i].float(), f"head {h} block scores", atol=1e-4)
    # the heads change the choice compared with the representative-based term
    _, info_plain = reference_attention(q, k, v, config=cfg, cos=tab.cos, sin=tab.sin, scaling=scaling,
                                        segments=SEGMENTS[pattern], question=mem.question.double() + 1.0)
    assert info_plain["retrieved"] != info["retrieved"]


@pytest.mark.parametrize("pattern", ["prefill", "decode", "many"])
@pytest.mark.parametrize("own,n_lower", [((1,), 1), ((), 0)], ids=["own1+lower1", "later-only"])
def test_question_heads_of_later_layers_match_reference(own, n_lower, pattern):
    """Rule 6c: the question heads of later layers join the mean for the execution blocks at which
    no block has been cut since their segment began (a decode step: always); otherwise the layer
    selects with its own and earlier heads (none: rule 6, the question vector)."""
    hq, hkv, d = 4, 2, 16
    cfg = BASE.replace(question_weight=1.5)
    seed = _seed("later", own, n_lower, pattern)
    t = sum(SEGMENTS[pattern])
    q, k, v, qq, lower = _heads_case(seed, hq, hkv, d, t, own, n_lower, cfg)
    g = torch.Generator().manual_seed(seed + 11)
    later = [torch.randn(t // cfg.block_size + 1, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    tab = table_for(cfg, d)
    scaling = d ** -0.5
    kw = dict(config=cfg, cos=tab.cos, sin=tab.sin, scaling=scaling, segments=SEGMENTS[pattern], question_q=qq,
              question_heads=own, lower_head_scores=lower)
    ref, info = reference_attention(q, k, v, question=torch.zeros(hq, d, dtype=torch.float64),
                                    later_head_scores=later, **kw)
    out, retrieved, mem, rel = run_fast_heads(cfg, q, k, v, tab, scaling, SEGMENTS[pattern], qq, own, lower,
                                              later=later)
    for i, (got, want) in enumerate(zip(retrieved, info["retrieved"])):
        assert got == want, (f"execution block {i}: retrieved {got}, reference {want} "
                             f"(smallest reference score gap {info['retrieval_gap']:.3g})")
    assert_close(out, ref, "attention output")
    assert mem.n_blocks == len(info["block_starts"]) > 5
    # the later heads take part in decode steps (without them the choices differ); one prefill
    # call cuts its blocks itself, so they never join there
    _, info_wo = reference_attention(q, k, v, question=torch.zeros(hq, d, dtype=torch.float64), **kw)
    if pattern == "prefill":
        assert info_wo["retrieved"] == info["retrieved"]
    else:
        assert info_wo["retrieved"] != info["retrieved"]


def test_columns_for_is_a_prefix_of_filled_later_columns():
    from qllm.retrieval import QuestionRelevance

    rel = QuestionRelevance([(0, 1), (1, 0), (2, 3), (2, 4), (5, 0)], CPU)
    rel.n_filled = [10, 10, 7, 7, 10]
    assert rel.columns_for(1, 10) == [0, 1]          # layer 2 has not scored blocks 7..9 yet
    assert rel.columns_for(1, 7) == [0, 1, 2, 3, 4]  # every later head covers 7 blocks
    assert rel.columns_for(2, 10) == [0, 1, 2, 3, 4]
    assert rel.columns_for(0, 0) == [0, 1, 2, 3, 4]
    rel.n_filled = [10, 10, 10, 10, 3]
    assert rel.columns_for(0, 10) == [0, 1, 2, 3]     # a prefix: stops at the first head short of blocks


def test_question_heads_find_planted_block():
    """A block whose keys align with one question token wins through the heads term, not the query term."""
    hq, hkv, d = 4, 2, 16
    cfg = BASE.replace(question_weight=1.0)
    q, k, v = random_qkv(11, hq, hkv, d, 200, q_scale=0.3)
    tab = table_for(cfg, d)
    g = torch.Generator().manual_seed(3)
    qq = torch.randn(hq, 5, d, generator=g)
    from qllm.attention import _fixed_query
    qfix = _fixed_query(qq, tab, cfg.n_local)
    planted_block = 3
    j = cfg.n_init + planted_block * cfg.block_size + 4
    k[0, j] = qfix[1, 2] / qfix[1, 2].norm() * 12.0  # KV head 0 serves query heads 0, 1
    out, retrieved, mem, rel = run_fast_heads(cfg, q, k, v, tab, d ** -0.5, [200], qq, (1,), [])
    assert planted_block in retrieved[-1]
    cfg0 = cfg.replace(strategy="infllm")
    _, ret0, _ = run_fast(cfg0, q, k, v, tab, d ** -0.5, [200])
    assert planted_block not in ret0[-1]


def test_question_relevance_errors():
    from qllm.retrieval import QuestionRelevance

    rel = QuestionRelevance([(0, 5)], CPU)
    with pytest.raises(ValueError, match="head 5 of layer 0"):
        rel.record(0, 0, torch.zeros(1, 2, 8, 4), torch.zeros(4, 3, 4))
    rel = QuestionRelevance([(0, 1), (1, 0)], CPU)
    rel.record(0, 0, torch.zeros(2, 2, 8, 4), torch.zeros(4, 3, 4))
    with pytest.raises(RuntimeError, match="scored 0 blocks"):
        rel.score(1, 2)  # layer 1's head has not scored the blocks
    assert rel.score(0, 2).shape == (2,)
    assert rel.columns_upto(0) == [0] and rel.columns_upto(5) == [0, 1]
