"""qllm.patch on whole (tiny, random-weight) Hugging Face models.

No downloads: every model is built from a config (hidden 64, 4 heads, 2 KV
heads, vocab 128), seeded, float32, eval mode, SDPA attention.

* short texts (< n_init + n_local) give the unpatched model's logits, for every
  family (Llama, Mistral, Qwen2, Qwen3, Gemma3 with sliding layers);
  unpatch / ``patched`` restore the model bit for bit; importing qllm changes nothing;
* long texts: every recorded attention call of the patched Llama / Qwen3 equals
  qllm.reference.reference_attention on the recorded q/k/v, for each strategy,
  with a question (ids), a question span inside the prompt, and none;
* generate: greedy == manual loop with the cache, == unpatched model on short
  prompts; batch > 1 and padding are refused; sampling runs;
* bad inputs raise with the offending name.
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import qllm
from qllm.reference import causal_attention_ref, reference_attention, reference_question

CFG = qllm.QLLMConfig(n_init=8, n_local=32, block_size=8, topk=2, repr_topk=3, exc_block_size=16,
                      question_weight=2.0, strategy="qllm")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
VOCAB = 128


# ----------------------------------------------------------------- models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (several threads only add sync cost, badly so on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":  # llama3 rope scaling: the rotary module carries it
        return tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        common.pop("head_dim")
        return tf.Qwen2Config(**common)
    if family == "qwen3":  # q/k norms
        return tf.Qwen3Config(**common)
    if family == "gemma3":
        common.update(num_hidden_layers=4, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
        return tf.Gemma3TextConfig(**common)
    raise AssertionError(family)


def make_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family), attn_implementation="sdpa")
    return model.float().eval()


def cache_kw(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


@torch.no_grad()
def logits(model, ids, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


def base_of(model):
    return model.model


def rope_tables(model, n: int):
    """cos/sin of positions 0..n-1 from the model's own rotary module (full-attention layers)."""
    rot = base_of(model).rotary_emb
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    x = torch.zeros(1, 1, head_dim)
    pos = torch.arange(n).unsqueeze(0)
    with torch.no_grad():
        if "layer_type" in inspect.signature(rot.forward).parameters:
            cos, sin = rot(x, pos, layer_type="full_attention")
        else:
            cos, sin = rot(x, pos)
    return cos[0].float(), sin[0].float()


# ------------------------------------------------- short texts, (un)patching


@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
@pytest.mark.parametrize("family", FAMILIES)
def test_short_text_equals_unpatched(family, strategy):
    model = make_model(family)
    t = 30  # < n_init + n_local = 40, > gemma3's sliding window (16)
    ids = ids_of(t, seed=1)
    before = logits(model, ids)
    cfg = CFG.replace(strategy=strategy)
    qllm.patch(model, cfg)
    try:
        assert qllm.is_patched(model)
        if strategy == "qllm":
            qllm.set_question(model, ids_of(6, seed=2)[0])
        got = logits(model, ids)
    finally:
        qllm.unpatch(model)
    assert not qllm.is_patched(model)
    torch.testing.assert_close(got, before, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got[0, -1], got[0, -2])  # logits are not degenerate
    after = logits(model, ids)
    assert torch.equal(after, before), "unpatch did not restore the model bit for bit"


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_context_manager(family):
    model = make_model(family, seed=3)
    ids = ids_of(25, seed=4)
    before = logits(model, ids)
    long_ids = ids_of(120, seed=5)
    long_before = logits(model, long_ids)
    with qllm.patched(model, CFG) as m:
        assert m is model and qllm.is_patched(model)
        torch.testing.assert_close(logits(model, ids), before, atol=1e-4, rtol=1e-4)
        # a long text really goes through the memory (it differs from dense attention)
        assert not torch.allclose(logits(model, long_ids), long_before, atol=1e-3)
    assert not qllm.is_patched(model)
    assert torch.equal(logits(model, ids), before)
    assert torch.equal(logits(model, long_ids), long_before)
    # unpatched also after an exception inside the block
    with pytest.raises(RuntimeError, match="boom"):
        with qllm.patched(model, CFG):
            raise RuntimeError("boom")
    assert not qllm.is_patched(model)
    assert torch.equal(logits(model, long_ids), long_before)


def test_gemma3_only_full_attention_layers_patched():
    model = make_model("gemma3", seed=6)
    types = model.config.layer_types
    ids = ids_of(34, seed=7)  # longer than the sliding window (16): sliding layers must still slide
    before = logits(model, ids)
    qllm.patch(model, CFG)
    try:
        handle = model._qllm
        assert sorted(handle.attn_modules) == [i for i, t in enumerate(types) if t == "full_attention"]
        with qllm.record(model) as rec:
            got = logits(model, ids)
        assert {e["layer"] for e in rec} == {1, 3}
        cos, sin = rope_tables(model, 64)
        for e in rec:
            mod = base_of(model).layers[e["layer"]].self_attn
            want = causal_attention_ref(e["q"], e["k"], e["v"], cos=cos, sin=sin, scaling=mod.scaling)
            torch.testing.assert_close(e["out"], want, atol=2e-5, rtol=1e-5)
    finally:
        qllm.unpatch(model)
    torch.testing.assert_close(got, before, atol=1e-4, rtol=1e-4)
    # the same weights without the sliding window give other logits: the window matters for this text
    from transformers import AutoModelForCausalLM

    wide = copy.deepcopy(model.config)
    wide.sliding_window = 1000
    other = AutoModelForCausalLM.from_config(wide, attn_implementation="sdpa").float().eval()
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(logits(other, ids), before, atol=1e-4)


def test_strategy_full_is_the_unpatched_model():
    model = make_model("llama", seed=8)
    ids = ids_of(150, seed=9)
    before = logits(model, ids)
    with qllm.patched(model, CFG.replace(strategy="full")):
        assert torch.equal(logits(model, ids), before)
    assert torch.equal(logits(model, ids), before)


def test_import_changes_nothing():
    code = textwrap.dedent("""
        import torch
        from transformers import LlamaConfig, AutoModelForCausalLM
        from transformers import AttentionInterface
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.25)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
        ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = m(input_ids=ids).logits
        mapping = dict(AttentionInterface._global_mapping)
        import qllm
        with torch.no_grad():
            b = m(input_ids=ids).logits
        assert torch.equal(a, b), "logits changed by import qllm"
        assert not qllm.is_patched(m)
        assert m.config._attn_implementation == "sdpa"
        assert "forward" not in m.model.__dict__
        assert dict(AttentionInterface._global_mapping) == mapping, "import registered an attention"
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


# --------------------------------------- long texts against the reference


def _check_recorded(model, cfg, rec, question_ids):
    """Every layer's recorded outputs against the reference on its recorded q/k/v."""
    cos, sin = rope_tables(model, cfg.max_rel_position + 1)
    layers = base_of(model).layers
    qmode = [e for e in rec if e["mode"] == "question"]
    text = [e for e in rec if e["mode"] != "question"]
    if qmode:  # the question pass once per layer, each layer's before the prompt's first call of that layer
        assert sorted(e["layer"] for e in qmode) == list(range(len(layers)))
        pos = {id(e): n for n, e in enumerate(rec)}
        for e in qmode:
            first = next(f for f in rec if f["mode"] != "question" and f["layer"] == e["layer"])
            assert pos[id(e)] < pos[id(first)]
    questions = {}
    for e in qmode:
        assert e["q"].shape[1] == question_ids.numel()
        mod = layers[e["layer"]].self_attn
        questions[e["layer"]] = reference_question(e["q"], e["k"], config=cfg, cos=cos, sin=sin,
                                                   scaling=mod.scaling)
        want = causal_attention_ref(e["q"], e["k"], e["v"], cos=cos, sin=sin, scaling=mod.scaling)
        torch.testing.assert_close(e["out"], want, atol=2e-5, rtol=1e-5)
    checked = 0
    for i in range(len(layers)):
        calls = [e for e in text if e["layer"] == i]
        assert calls, f"layer {i} not recorded"
        q = torch.cat([e["q"] for e in calls], dim=1)
        k = torch.cat([e["k"] for e in calls], dim=1)
        v = torch.cat([e["v"] for e in calls], dim=1)
        got = torch.cat([e["out"] for e in calls], dim=1)
        segments = [e["q"].shape[1] for e in calls]
        want, info = reference_attention(q, k, v, config=cfg, cos=cos, sin=sin, scaling=layers[i].self_attn.scaling,
                                         question=questions.get(i), segments=segments)
        err = float((got.float() - want).abs().max())
        assert torch.allclose(got.float(), want, atol=3e-5, rtol=1e-5), (
            f"layer {i}: max |err| {err:.3g} (retrieval gap {info['retrieval_gap']:.3g}, "
            f"repr gap {info['repr_gap']:.3g})")
        checked += 1
    return questions, checked


def _first_unrotated_q(model, ids):
    """Layer 0's queries computed by hand from the weights, without RoPE: [H, T, D]."""
    base = base_of(model)
    attn = base.layers[0].self_attn
    with torch.no_grad():
        x = base.layers[0].input_layernorm(base.embed_tokens(ids))
        q = attn.q_proj(x).view(1, ids.shape[1], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
    return q[0].transpose(0, 1)


@pytest.mark.parametrize("question", ["ids", "span", "none"])
@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_long_text_matches_reference(family, strategy, question):
    model = make_model(family, seed=10)
    cfg = CFG.replace(strategy=strategy)
    t = 150
    ids = ids_of(t, seed=11)
    q_ids = ids_of(10, seed=12)[0]
    qllm.patch(model, cfg)
    try:
        if question == "ids":
            qllm.set_question(model, q_ids)
        elif question == "span":
            q_ids = ids[0, 119:131]  # the question inside the prompt, after the context
            qllm.set_question(model, span=(119, 131))
        kw = cache_kw(model)
        with qllm.record(model) as rec:
            with torch.no_grad():
                out = model(input_ids=ids[:, :131])
                cache = out_cache(out)
                assert isinstance(cache, qllm.QLLMCache)
                out = model(input_ids=ids[:, 131:140], **{kw: cache})   # an odd chunk
                for j in range(140, t):                                   # single-token decode
                    out = model(input_ids=ids[:, j:j + 1], **{kw: out_cache(out)})
        cache = out_cache(out)
        assert cache.n_seen == t
        expect_question = strategy == "qllm" and question != "none"
        assert any(e["mode"] == "question" for e in rec) == expect_question
        # recorded q of layer 0 is the un-rotated projection
        text0 = torch.cat([e["q"] for e in rec if e["layer"] == 0 and e["mode"] != "question"], dim=1)
        torch.testing.assert_close(text0, _first_unrotated_q(model, ids), atol=1e-5, rtol=1e-5)
        questions, checked = _check_recorded(model, cfg, rec, q_ids)
        assert checked == len(base_of(model).layers)
        if expect_question:
            for i, vec in questions.items():
                mem_q = cache.memories[i].question
                assert mem_q is not None
                torch.testing.assert_close(mem_q.float(), vec, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.question_ids, q_ids)
        else:
            assert all(m.question is None for m in cache.memories.values())
        if strategy != "streaming":
            assert all(m.n_blocks == (t - cfg.n_init - cfg.n_local) // cfg.block_size
                       for m in cache.memories.values())
    finally:
        qllm.unpatch(model)


@pytest.mark.parametrize("family,strategy", [("llama", "qllm"), ("qwen3", "infllm"), ("gemma3", "qllm")])
def test_chunked_prefill_matches_reference(family, strategy):
    """A prompt longer than chunk_size is fed in chunks: still the reference (segments = chunks)."""
    model = make_model(family, seed=31)
    cfg = CFG.replace(strategy=strategy, chunk_size=45)
    ids = ids_of(160, seed=32)
    kw = cache_kw(model)
    with qllm.patched(model, cfg):
        qllm.set_question(model, span=(140, 152))
        with qllm.record(model) as rec:
            with torch.no_grad():
                out = model(input_ids=ids)
                out = model(input_ids=ids_of(1, seed=33), **{kw: out_cache(out)})
        assert out_cache(out).n_seen == 161
        n_layers = len(model._qllm.attn_modules)
        text = [e for e in rec if e["mode"] != "question"]
        assert [e["q"].shape[1] for e in text] == [n for n in (45, 45, 45, 25, 1) for _ in range(n_layers)]
        # the reference, patched layers only (gemma3: the full-attention ones)
        cos, sin = rope_tables(model, cfg.max_rel_position + 1)
        questions = {}
        for e in rec:
            mod = base_of(model).layers[e["layer"]].self_attn
            if e["mode"] == "question":
                questions[e["layer"]] = reference_question(e["q"], e["k"], config=cfg, cos=cos, sin=sin,
                                                           scaling=mod.scaling)
        assert bool(questions) == (strategy == "qllm")
        for i in model._qllm.attn_modules:
            calls = [e for e in text if e["layer"] == i]
            q, k, v, got = (torch.cat([e[n] for e in calls], dim=1) for n in ("q", "k", "v", "out"))
            want, _ = reference_attention(q, k, v, config=cfg, cos=cos, sin=sin,
                                          scaling=base_of(model).layers[i].self_attn.scaling,
                                          question=questions.get(i), segments=[e["q"].shape[1] for e in calls])
            torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5)


def test_fresh_cache_reserves_the_prompt():
    """The first call on a fresh cache sizes the CUDA layer stores for its tokens + the decode
    margin once (no regrowth chunk by chunk); a chosen reserve and later calls are left alone."""
    from qllm.patch import _DECODE_MARGIN

    model = make_model("llama", seed=41)
    kw = cache_kw(model)
    with qllm.patched(model, CFG.replace(chunk_size=45)):
        with torch.no_grad():
            out = model(input_ids=ids_of(100, seed=42))
            cache = out_cache(out)
            assert cache.reserve_tokens == 100 + _DECODE_MARGIN
            model(input_ids=ids_of(50, seed=43), **{kw: cache})
            assert cache.reserve_tokens == 100 + _DECODE_MARGIN  # not a fresh cache any more
            mine = qllm.QLLMCache(model._qllm)
            mine.reserve_tokens = 7
            model(input_ids=ids_of(60, seed=44), **{kw: mine})
            assert mine.reserve_tokens == 7
            fresh = qllm.QLLMCache(model._qllm)
            model(input_ids=ids_of(30, seed=45), **{kw: fresh})
            assert fresh.reserve_tokens == 30 + _DECODE_MARGIN


def test_question_steers_the_model():
    """The same text with and without a question gives different logits (qllm), identical (infllm)."""
    ids = ids_of(200, seed=13)
    res = {}
    for strategy in ("qllm", "infllm"):
        for with_q in (True, False):
            model = make_model("llama", seed=14)
            with qllm.patched(model, CFG.replace(strategy=strategy, question_weight=20.0)):
                if with_q:
                    qllm.set_question(model, ids_of(12, seed=15)[0])
                res[strategy, with_q] = logits(model, ids)
    assert torch.equal(res["infllm", True], res["infllm", False])
    assert torch.equal(res["qllm", False], res["infllm", False])
    assert not torch.allclose(res["qllm", True], res["qllm", False], atol=1e-4)


# --------------------------------------------------------------- generate


def _manual_greedy(model, ids, n):
    kw = cache_kw(model)
    toks = []
    with torch.no_grad():
        out = model(input_ids=ids)
        for _ in range(n):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            out = model(input_ids=nxt, **{kw: out_cache(out)})
    return torch.cat([ids] + toks, dim=1)


@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
def test_generate_greedy_equals_manual_loop(strategy):
    model = make_model("llama", seed=16)
    ids = ids_of(140, seed=17)
    with qllm.patched(model, CFG.replace(strategy=strategy)):
        if strategy == "qllm":
            qllm.set_question(model, span=(120, 135))
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        manual = _manual_greedy(model, ids, 6)
    assert gen.shape == (1, 146)
    assert torch.equal(gen, manual)


def test_generate_short_prompt_equals_unpatched():
    model = make_model("llama", seed=18)
    ids = ids_of(20, seed=19)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with qllm.patched(model, CFG):
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert got.shape[1] == 28 < CFG.n_init + CFG.n_local
    assert torch.equal(got, want)


def test_generate_refuses_batch_and_padding():
    model = make_model("llama", seed=20)
    ids = ids_of(30, seed=21)
    with qllm.patched(model, CFG):
        with pytest.raises(ValueError, match="batch"):
            with torch.no_grad():
                model.generate(torch.cat([ids, ids]), max_new_tokens=2)
        with pytest.raises(ValueError, match="batch"):
            logits(model, torch.cat([ids, ids]))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with pytest.raises(ValueError, match="padding|attention_mask"):
            logits(model, ids, attention_mask=mask)
        with pytest.raises(ValueError, match="padding|attention_mask"):
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=2)
        # a full mask is fine
        torch.testing.assert_close(logits(model, ids, attention_mask=torch.ones_like(ids)), logits(model, ids))


def test_generate_sampling():
    model = make_model("llama", seed=22)
    ids = ids_of(100, seed=23)
    with qllm.patched(model, CFG):
        torch.manual_seed(0)
        with torch.no_grad():
            a = model.generate(ids, do_sample=True, max_new_tokens=5, min_new_tokens=5, top_k=0, temperature=1.0)
        torch.manual_seed(0)
        with torch.no_grad():
            b = model.generate(ids, do_sample=True, max_new_tokens=5, min_new_tokens=5, top_k=0, temperature=1.0)
    assert a.shape == (1, 105)
    assert torch.equal(a[:, :100], ids)
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("field,value", [
    ("n_init", -1), ("n_init", 1.5), ("n_local", 0), ("n_local", "32"), ("block_size", 0), ("block_size", True),
    ("topk", -1), ("repr_topk", 0), ("exc_block_size", 0), ("question_weight", float("nan")),
    ("question_weight", float("inf")), ("question_weight", "1"), ("strategy", "bogus"), ("strategy", None),
    ("device_blocks", -1), ("chunk_size", 0), ("max_question_tokens", 0),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        qllm.QLLMConfig(**{field: value})


@pytest.mark.parametrize("strategy", ["qllm", "infllm"])
def test_config_needs_topk_for_retrieval(strategy):
    with pytest.raises(ValueError, match="topk"):
        qllm.QLLMConfig(strategy=strategy, topk=0)
    qllm.QLLMConfig(strategy="streaming", topk=0)  # fine without retrieval


def test_patch_twice_and_unpatch_unpatched():
    model = make_model("llama", seed=24)
    with pytest.raises(ValueError, match="not patched"):
        qllm.unpatch(model)
    qllm.patch(model, CFG)
    with pytest.raises(ValueError, match="already patched"):
        qllm.patch(model, CFG)
    qllm.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        qllm.unpatch(model)
    with pytest.raises(TypeError, match="config"):
        qllm.patch(model, {"n_local": 32})
    assert not qllm.is_patched(model)
    with pytest.raises(ValueError, match="not patched"):
        qllm.set_question(model, torch.tensor([3, 4]))


@pytest.mark.parametrize("span", [(5, 3), (-1, 4), (4, 4), (1,), ("a", 2), (1.0, 2.0), (True, 3)], ids=str)
def test_set_question_bad_span(span):
    model = make_model("llama", seed=25)
    with qllm.patched(model, CFG):
        with pytest.raises(ValueError, match="span"):
            qllm.set_question(model, span=span)


def test_question_span_outside_prompt_and_bad_ids():
    model = make_model("llama", seed=26)
    with qllm.patched(model, CFG):
        qllm.set_question(model, span=(10, 60))
        with pytest.raises(ValueError, match="span"):
            logits(model, ids_of(50, seed=27))
        with pytest.raises(ValueError, match="question"):
            qllm.set_question(model, torch.tensor([], dtype=torch.long))
        with pytest.raises(ValueError, match="question"):
            qllm.set_question(model, torch.tensor([[3, 4]]))
        with pytest.raises(ValueError, match="question"):
            qllm.set_question(model, torch.tensor([3.0, 4.0]))
        with pytest.raises(ValueError, match="span|question"):
            qllm.set_question(model, torch.tensor([3, 4]), span=(0, 1))


def test_question_longer_than_n_local():
    model = make_model("llama", seed=28)
    with qllm.patched(model, CFG):
        qllm.set_question(model, ids_of(CFG.n_local + 1, seed=29)[0])
        with pytest.raises(ValueError, match="question"):
            logits(model, ids_of(60, seed=30))
        qllm.set_question(model, ids_of(CFG.n_local, seed=29)[0])  # exactly n_local is fine
        assert logits(model, ids_of(60, seed=30)).shape == (1, 60, VOCAB)


def test_question_limit_above_n_local():
    """max_question_tokens > n_local: a question of n_local < n <= max_question_tokens tokens must
    either be refused cleanly (ValueError naming the question / max_question_tokens, at config or
    at call time) or be encoded as rule 7 says (plain causal attention over the whole question)."""
    try:
        cfg = CFG.replace(max_question_tokens=100)
    except ValueError as exc:
        assert "max_question_tokens" in str(exc)
        return
    model = make_model("llama", seed=34)
    with qllm.patched(model, cfg):
        for n in (40, 60):  # > n_local = 32
            qllm.set_question(model, ids_of(n, seed=35)[0])
            try:
                with qllm.record(model) as rec:
                    logits(model, ids_of(80, seed=36))
            except ValueError as exc:
                assert "question" in str(exc)
                continue
            cos, sin = rope_tables(model, 128)
            for e in rec:
                if e["mode"] == "question":
                    want = causal_attention_ref(e["q"], e["k"], e["v"], cos=cos, sin=sin,
                                                scaling=base_of(model).layers[e["layer"]].self_attn.scaling)
                    torch.testing.assert_close(e["out"], want, atol=2e-5, rtol=1e-5)


def test_gemma3_sliding_layer_untouched_on_long_text():
    """Long text, chunked prefill + decode: the sliding layer before the first patched layer computes
    exactly what the unpatched model computes, so layer 1's recorded queries equal the unpatched ones."""
    model = make_model("gemma3", seed=37)
    ids = ids_of(130, seed=38)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after sliding layer 0
        attn = base_of(model).layers[1].self_attn
        x = base_of(model).layers[1].input_layernorm(hidden)
        want = attn.q_norm(attn.q_proj(x).view(1, ids.shape[1], -1, attn.head_dim))[0].transpose(0, 1)
    kw = cache_kw(model)
    with qllm.patched(model, CFG.replace(chunk_size=50)):
        with qllm.record(model) as rec:
            with torch.no_grad():
                out = model(input_ids=ids[:, :120])
                for j in range(120, 130):
                    out = model(input_ids=ids[:, j:j + 1], **{kw: out_cache(out)})
    got = torch.cat([e["q"] for e in rec if e["layer"] == 1], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_device_blocks_budget_accepted_and_checked_against_topk():
    """A device block budget is implemented (tiered block memory: tests/test_tiered.py); it must hold topk."""
    assert qllm.QLLMConfig(device_blocks=64).device_blocks == 64
    with pytest.raises(ValueError, match="device_blocks"):
        qllm.QLLMConfig(topk=8, device_blocks=4)
    assert qllm.QLLMConfig(device_blocks=None).device_blocks is None


def test_rope_wrapper_skips_identity_only_and_is_removed_by_unpatch():
    """patch wraps the modeling module's apply_rotary_pos_emb: marked identity cos/sin return q, k
    as they are (the values rotating by the identity gives), anything else is rotated as before;
    two patched models share one wrapper, the last unpatch restores the original function."""
    import transformers.models.llama.modeling_llama as ml

    orig = ml.apply_rotary_pos_emb
    m1, m2 = make_model("llama", 1), make_model("llama", 2)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    qllm.patch(m1, CFG)
    qllm.patch(m2, CFG)
    try:
        wrapped = ml.apply_rotary_pos_emb
        assert wrapped is not orig and wrapped.__wrapped__ is orig
        ic, is_ = m1._qllm.identity_rope(cos, sin)
        assert ic is m1._qllm.identity_rope(cos, sin)[0]  # made once per shape
        q2, k2 = wrapped(q, k, ic, is_)
        assert q2 is q and k2 is k
        rq, rk = orig(q, k, ic, is_)  # what the identity rotation computes
        assert torch.equal(rq, q) and torch.equal(rk, k)
        for got, want in zip(wrapped(q, k, cos, sin), orig(q, k, cos, sin)):
            assert torch.equal(got, want)
        qllm.unpatch(m1)
        assert ml.apply_rotary_pos_emb is wrapped
    finally:
        if hasattr(m1, "_qllm"):
            qllm.unpatch(m1)
        qllm.unpatch(m2)
    assert ml.apply_rotary_pos_emb is orig


# ------------------------------------------ the question pass alongside the first chunk


def _question_run(model, cfg, ids, q_ids, alongside: bool, monkeypatch):
    """One prompt call with a question: logits, per-layer question vectors and question-token
    queries, and the order of the recorded calls (mode, layer)."""
    qpatch = sys.modules["qllm.patch"]  # (qllm.patch, the attribute, is the function)

    monkeypatch.setattr(qpatch, "_QUESTION_ALONGSIDE", alongside)
    with qllm.patched(model, cfg):
        qllm.set_question(model, q_ids)
        with qllm.record(model) as rec:
            with torch.no_grad():
                out = model(input_ids=ids)
        cache = out_cache(out)
        vecs = {i: (m.question, m.question_tokens) for i, m in cache.memories.items()}
    order = [(e["mode"], e["layer"]) for e in rec]
    return out.logits, vecs, order, cache


@pytest.mark.parametrize("family,n", [("llama", 30), ("llama", 150), ("qwen3", 150), ("gemma3", 150)])
def test_question_alongside_matches_apart(family, n, monkeypatch):
    """The question's forward run layer by layer alongside the first chunk gives bitwise the
    results of running it whole first; its layer i runs before the prompt's layer i and, with more
    than one layer, after the prompt's layer i-1 (it really runs alongside)."""
    model = make_model(family, seed=40)
    cfg = CFG.replace(chunk_size=64)
    ids, q_ids = ids_of(n, seed=41), ids_of(9, seed=42)[0]
    a = _question_run(model, cfg, ids, q_ids, False, monkeypatch)
    b = _question_run(model, cfg, ids, q_ids, True, monkeypatch)
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for i in a[1]:
        assert torch.equal(a[1][i][0], b[1][i][0]) and torch.equal(a[1][i][1], b[1][i][1])
    patched = sorted(a[1])
    q_apart = [k for k, e in enumerate(a[2]) if e[0] == "question"]
    assert q_apart == list(range(len(patched)))  # apart: the whole question pass first
    order = b[2]
    for j, i in enumerate(patched):
        qpos = order.index(("question", i))
        assert qpos < order.index(("text", i))
        if j > 0:
            assert qpos > order.index(("text", patched[j - 1]))
    assert not [t for t in threading.enumerate() if t.name == "qllm-question"]
    assert b[3].question_ids is not None and torch.equal(b[3].question_ids, q_ids)


def _fail_at_layer_1(monkeypatch, qpatch, name: str, msg: str) -> None:
    """Replace qllm.patch's ``name`` (a function taking the layer memory first) by one that raises
    RuntimeError(msg) for layer 1."""
    real = getattr(qpatch, name)

    def failing(mem, *args, **kw):
        if mem.layer_idx == 1:
            raise RuntimeError(msg)
        return real(mem, *args, **kw)

    monkeypatch.setattr(qpatch, name, failing)


def test_question_alongside_worker_error_reaches_the_caller(monkeypatch):
    """An error inside the question's forward (here its layer 1) is raised in the caller's
    thread; the worker ends, the model is usable again."""
    qpatch = sys.modules["qllm.patch"]  # (qllm.patch, the attribute, is the function)

    monkeypatch.setattr(qpatch, "_QUESTION_ALONGSIDE", True)  # on the CPU too (the default: CUDA models only)
    model = make_model("llama", seed=43)
    real = qpatch.encode_question
    with qllm.patched(model, CFG):
        qllm.set_question(model, ids_of(6, seed=44)[0])
        _fail_at_layer_1(monkeypatch, qpatch, "encode_question", "question layer 1 failed")
        with pytest.raises(RuntimeError, match="question layer 1 failed"):
            logits(model, ids_of(40, seed=45))
        assert model._qllm.question_pass is None
        assert not [t for t in threading.enumerate() if t.name == "qllm-question"]
        monkeypatch.setattr(qpatch, "encode_question", real)
        qllm.set_question(model, ids_of(6, seed=44)[0])
        got = logits(model, ids_of(40, seed=45))
    monkeypatch.setattr(qpatch, "_QUESTION_ALONGSIDE", False)
    with qllm.patched(model, CFG):
        qllm.set_question(model, ids_of(6, seed=44)[0])
        assert torch.equal(logits(model, ids_of(40, seed=45)), got)


def test_question_alongside_prompt_error_ends_the_worker(monkeypatch):
    """An error in the prompt's own forward (here its attention at layer 1) ends the waiting
    worker: the error reaches the caller and no worker thread is left."""
    qpatch = sys.modules["qllm.patch"]  # (qllm.patch, the attribute, is the function)

    monkeypatch.setattr(qpatch, "_QUESTION_ALONGSIDE", True)
    model = make_model("llama", seed=46)
    with qllm.patched(model, CFG):
        qllm.set_question(model, ids_of(6, seed=47)[0])
        _fail_at_layer_1(monkeypatch, qpatch, "attend", "prompt layer 1 failed")
        with pytest.raises(RuntimeError, match="prompt layer 1 failed"):
            logits(model, ids_of(40, seed=48))
        assert model._qllm.question_pass is None
        assert not [t for t in threading.enumerate() if t.name == "qllm-question"]


def test_question_alongside_default_is_cuda_only(monkeypatch):
    """By default the question runs alongside only for a CUDA model: on the CPU it runs whole,
    first, in the caller's thread order (no worker thread is left, all question records come first)."""
    qpatch = sys.modules["qllm.patch"]
    assert qpatch._QUESTION_ALONGSIDE == "cuda"
    model = make_model("llama", seed=49)
    with qllm.patched(model, CFG):
        qllm.set_question(model, ids_of(5, seed=50)[0])
        with qllm.record(model) as rec:
            logits(model, ids_of(40, seed=51))
    modes = [e["mode"] for e in rec]
    n_q = modes.count("question")
    assert n_q == len(base_of(model).layers) and modes[:n_q] == ["question"] * n_q


def test_rows_kept_arithmetic():
    from qllm.patch import _rows_kept

    assert _rows_kept(None, 300, 0, 128) is None
    # T = 300 in chunks of 128: keep 1 -> none of chunks 0, 1; one row of the last
    assert [_rows_kept(1, 300, s, n) for s, n in ((0, 128), (128, 128), (256, 44))] == [0, 0, 1]
    assert [_rows_kept(50, 300, s, n) for s, n in ((0, 128), (128, 128), (256, 44))] == [0, 6, None]
    assert _rows_kept(300, 300, 0, 128) is None and _rows_kept(1000, 300, 0, 300) is None
    assert _rows_kept(1, 1, 0, 1) is None  # a decode step: its one row


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_logits_to_keep_reaches_the_last_layer(family, monkeypatch):
    """The causal LM's forward keeps its signature (generate inspects logits_to_keep) and tells the
    base model's forward how many trailing positions are kept: qllm.fused.rows_used wraps each chunk's
    call with the last decoder layer and that chunk's kept rows (a no-op on the CPU, where the fused
    layer does not run); the kept logits are bitwise those of a call that keeps all.  Hidden states,
    labels or logits_to_keep=0: no rows_used.  unpatch removes the wrapper."""
    import contextlib

    qp = sys.modules["qllm.patch"]  # the module (qllm.patch is the function)
    model = make_model(family, seed=51)
    calls = []
    real = qp.rows_used

    @contextlib.contextmanager
    def spy(layer, n):
        calls.append((layer, n))
        with real(layer, n):
            yield

    monkeypatch.setattr(qp, "rows_used", spy)
    ids = ids_of(100, seed=52)
    with qllm.patched(model, CFG.replace(chunk_size=45)):
        assert "logits_to_keep" in inspect.signature(model.forward).parameters
        last = base_of(model).layers[-1]
        with torch.no_grad():
            want = model(input_ids=ids, logits_to_keep=0).logits
            assert calls == []
            got = model(input_ids=ids, logits_to_keep=1).logits
            assert [(layer is last, n) for layer, n in calls] == [(True, 0), (True, 0), (True, 1)]
            # lm_head over 1 row instead of 100: other matmul blocking, last bits
            assert got.shape == (1, 1, VOCAB)
            torch.testing.assert_close(got, want[:, -1:], atol=1e-5, rtol=1e-5)
            calls.clear()
            got = model(input_ids=ids, logits_to_keep=12).logits
            assert [n for _, n in calls] == [0, 2]  # chunk 3 (10 rows): all
            torch.testing.assert_close(got, want[:, -12:], atol=1e-5, rtol=1e-5)
            calls.clear()
            model(input_ids=ids[:, :40], logits_to_keep=1, output_hidden_states=True)
            model(input_ids=ids, logits_to_keep=40, labels=ids[:, -40:])
            assert calls == []
            model(input_ids=ids[:, :40], logits_to_keep=1)  # one chunk
            assert [n for _, n in calls] == [1]
    assert "forward" not in model.__dict__


def test_top_forward_keeps_an_instance_forward():
    """A causal LM whose forward already is an instance attribute (accelerate's device hook, say)
    keeps it under the patch's wrapper (it still runs), and gets it back from unpatch."""
    import functools

    model = make_model("llama", seed=53)
    seen = []
    cls_forward = type(model).forward.__get__(model)

    @functools.wraps(cls_forward)
    def hooked(*args, **kwargs):
        seen.append(kwargs.get("logits_to_keep"))
        return cls_forward(*args, **kwargs)

    model.forward = hooked
    with qllm.patched(model, CFG.replace(chunk_size=45)):
        assert model.forward is not hooked
        assert "logits_to_keep" in inspect.signature(model.forward).parameters
        with torch.no_grad():
            model(input_ids=ids_of(60, seed=54), logits_to_keep=1)
        assert seen == [1]
    assert model.forward is hooked
