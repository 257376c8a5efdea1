"""The patched model on CUDA (fast path: CudaLayerMemory + attend_cuda) against the same model
patched on the CPU (generic path, float32), and generate() on the GPU.  Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from _cuda_helpers import ByteTokenizer

import qllm
from qllm.gpu import CudaLayerMemory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

CFG = qllm.QLLMConfig(n_init=16, n_local=64, block_size=16, topk=3, repr_topk=4, exc_block_size=32,
                      question_weight=1.0, chunk_size=128)


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["qllm", "streaming"])
def test_patched_model_cuda_matches_cpu(dtype, strategy):
    """Logits of the whole patched model (the caches go in under the model's own cache keyword,
    ``handle.cache_kw``: under another name the patched forward would make a cache of its own for
    the question and the layers would run without it).  Retrieval is a discrete choice that rounding can flip
    on a random-weight model, so here every block is retrieved (topk above the block count):
    the comparison then measures the arithmetic of the two paths, not tie-breaking luck.  The
    retrieved sets themselves are compared op-level in test_cuda.py on identical inputs."""
    cpu = _tiny_llama(0)
    gpu = _tiny_llama(0).to("cuda", dtype)
    # CPU model with the GPU model's (rounded) weights, computed in float32
    cpu.load_state_dict({k: v.float().cpu() for k, v in gpu.state_dict().items()})
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(1))
    question = torch.tensor([5, 17, 42, 99])
    cfg = CFG.replace(strategy=strategy, topk=64)
    with torch.no_grad():  # the error of the unpatched model in low precision sets the scale
        d_want = cpu(ids).logits
        d_got = gpu(ids.cuda()).logits.float().cpu()
    base = float((d_got - d_want).norm() / d_want.norm())
    with qllm.patched(cpu, cfg), qllm.patched(gpu, cfg):
        qllm.set_question(cpu, question)
        qllm.set_question(gpu, question)
        cache_c, cache_g = qllm.QLLMCache(cpu._qllm), qllm.QLLMCache(gpu._qllm)
        with torch.no_grad():
            want = cpu(ids, **{cpu._qllm.cache_kw: cache_c}, use_cache=True).logits
            got = gpu(ids.cuda(), **{gpu._qllm.cache_kw: cache_g}, use_cache=True).logits.float().cpu()
        assert all(isinstance(m, CudaLayerMemory) for m in cache_g.memories.values())
        if strategy == "qllm":
            assert cache_g.memories[0].n_blocks == cache_c.memories[0].n_blocks > 10
        err = float((got - want).norm() / want.norm())
        print(f"{strategy} {dtype}: qllm cuda vs cpu {err:.3g}, dense cuda vs cpu {base:.3g}")
        assert err < max(3 * base, 5e-3), f"relative error {err:.3g} vs {base:.3g} for dense attention"
        # a few decode steps through the same caches
        nxt = want[:, -1:].argmax(-1)
        with torch.no_grad():
            w2 = cpu(nxt, **{cpu._qllm.cache_kw: cache_c}, use_cache=True).logits
            g2 = gpu(nxt.cuda(), **{gpu._qllm.cache_kw: cache_g}, use_cache=True).logits.float().cpu()
        assert float((g2 - w2).norm() / w2.norm()) < max(3 * base, 5e-3)


def test_generate_on_cuda():
    model = _tiny_llama(2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3)).cuda()
    with qllm.patched(model, CFG):
        qllm.set_question(model, torch.tensor([1, 2, 3]))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, 308) and out.device.type == "cuda"
    assert torch.equal(out[:, :300], ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patched_model_cuda_question_heads_matches_cpu(dtype):
    """Explicit question heads (heads of both layers): the CUDA fast path (no fallback to the generic
    path) against the generic path on the CPU.  Every block retrieved, as above, for the logits; the
    heads' raw block scores compared directly; then the same with topk < blocks on the GPU alone."""
    cpu = _tiny_llama(0)
    gpu = _tiny_llama(0).to("cuda", dtype)
    cpu.load_state_dict({k: v.float().cpu() for k, v in gpu.state_dict().items()})
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(4))
    question = torch.tensor([5, 17, 42, 99, 7, 3])
    heads = ((0, 1), (1, 0), (1, 3))
    cfg = CFG.replace(topk=64, question_heads=heads)
    with torch.no_grad():
        d_want = cpu(ids).logits
        d_got = gpu(ids.cuda()).logits.float().cpu()
    base = float((d_got - d_want).norm() / d_want.norm())
    with qllm.patched(cpu, cfg), qllm.patched(gpu, cfg):
        qllm.set_question(cpu, question)
        qllm.set_question(gpu, question)
        cache_c, cache_g = qllm.QLLMCache(cpu._qllm), qllm.QLLMCache(gpu._qllm)
        with torch.no_grad():
            want = cpu(ids, **{cpu._qllm.cache_kw: cache_c}, use_cache=True).logits
            got = gpu(ids.cuda(), **{gpu._qllm.cache_kw: cache_g}, use_cache=True).logits.float().cpu()
        assert all(isinstance(m, CudaLayerMemory) for m in cache_g.memories.values())
        rel_c, rel_g = cache_c.relevance, cache_g.relevance
        assert rel_g is not None and rel_g.raw.is_cuda and rel_g.heads == rel_c.heads == heads, (
            f"relevance cpu {rel_c}, gpu {rel_g}; handle heads {gpu._qllm.question_heads}; gpu cache: "
            f"has_question {cache_g.has_question}, n_seen {cache_g.n_seen}, layers {sorted(cache_g.memories)}")
        nb = cache_c.memories[0].n_blocks
        assert nb > 10 and rel_g.n_filled == rel_c.n_filled == [nb] * len(heads)
        raw_err = float((rel_g.raw[:nb].cpu() - rel_c.raw[:nb]).norm() / rel_c.raw[:nb].norm())
        err = float((got - want).norm() / want.norm())
        print(f"{dtype}: heads: logits cuda vs cpu {err:.3g} (dense {base:.3g}), raw scores {raw_err:.3g}")
        assert err < max(3 * base, 5e-3)
        assert raw_err < max(5 * base, 3e-2)
        nxt = want[:, -1:].argmax(-1)
        with torch.no_grad():
            w2 = cpu(nxt, **{cpu._qllm.cache_kw: cache_c}, use_cache=True).logits
            g2 = gpu(nxt.cuda(), **{gpu._qllm.cache_kw: cache_g}, use_cache=True).logits.float().cpu()
        assert float((g2 - w2).norm() / w2.norm()) < max(3 * base, 5e-3)
    # a real choice (topk 3 of ~30 blocks) on the GPU: runs on the fast path, retrieves topk blocks
    with qllm.patched(gpu, cfg.replace(topk=3)):
        qllm.set_question(gpu, question)
        cache = qllm.QLLMCache(gpu._qllm)
        with torch.no_grad():
            logits = gpu(ids.cuda(), **{gpu._qllm.cache_kw: cache}, use_cache=True).logits
        assert bool(torch.isfinite(logits).all())
        assert all(isinstance(m, CudaLayerMemory) for m in cache.memories.values())
        assert all(len(r) == 3 for r in cache.retrieved_blocks().values())
        # the fresh cache's stores were sized for the prompt + decode margin once, not grown
        from qllm.patch import _DECODE_MARGIN
        assert cache.reserve_tokens == ids.shape[1] + _DECODE_MARGIN
        assert all(m.capacity == ids.shape[1] + _DECODE_MARGIN for m in cache.memories.values())


# ============================================================ whole-model decode in one CUDA graph

def _prefilled(model, ids, capacity: int):
    cache = qllm.QLLMCache(model._qllm)
    cache.reserve_tokens = capacity
    with torch.no_grad():
        logits = model(ids, **{model._qllm.cache_kw: cache}, use_cache=True, logits_to_keep=1).logits
    return cache, logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["qllm", "heads", "streaming"])
def test_graph_decoder_matches_eager(dtype, variant):
    """120 tokens through GraphDecoder(cut_graph=True) (one CUDA-graph replay of the whole model
    per token; the block-cut tokens, one in block_size=16, replay the second graph, or with question
    heads run eagerly) against 120 eager forwards on a twin cache: the same next tokens, bitwise the same
    logits, and bitwise the same layer memories afterwards.  Both get the eager token at each step,
    so one mismatch cannot hide the later ones."""
    from qllm.gpu import GraphDecoder

    model = _tiny_llama(7).to("cuda", dtype)
    cfg = {"qllm": CFG, "heads": CFG.replace(question_heads=((0, 1), (1, 0))),
           "streaming": CFG.replace(strategy="streaming")}[variant]
    P, new = 300, 120
    ids = torch.randint(0, 256, (1, P), generator=torch.Generator().manual_seed(8)).cuda()
    kw = None
    with qllm.patched(model, cfg):
        qllm.set_question(model, torch.tensor([5, 17, 42, 99]))
        kw = model._qllm.cache_kw
        ref, want0 = _prefilled(model, ids, P + new + 8)
        cache, got0 = _prefilled(model, ids, P + new + 8)
        assert torch.equal(got0, want0)
        assert all(isinstance(m, CudaLayerMemory) for m in cache.memories.values())
        if variant == "heads":
            assert cache.relevance is not None and cache.relevance.heads == ((0, 1), (1, 0))
        dec = GraphDecoder(model, cache, new, cut_graph=True)
        assert dec.enabled, dec.reason
        tok = want0[:, -1:].argmax(-1)
        diffs, tok_diff = [], []
        for i in range(new):
            with torch.no_grad():
                want = model(tok, **{kw: ref}, use_cache=True, logits_to_keep=1).logits
            got = dec.step(tok).clone()
            if not torch.equal(got.argmax(-1), want.argmax(-1)):
                tok_diff.append(i)
            if not torch.equal(got, want):
                diffs.append((i, float((got.float() - want.float()).abs().max())))
            tok = want[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        print(f"{variant} {dtype}: {dec.n_replays} graph steps, {dec.n_eager} eager, "
              f"capture {dec.capture_s:.2f}s; logits differ at {len(diffs)} steps {diffs[:5]}")
        assert dec.graph is not None
        assert dec.n_replays + dec.n_eager == new
        if variant == "heads":  # a cut records question-head scores: eager
            assert dec.n_captures == 1 and dec.cut_graph is None
            assert new // 16 - 1 <= dec.n_eager <= new // 16 + 2 and dec.n_replays >= new - new // 16 - 2
        elif variant == "streaming":  # no blocks, no cut graph
            assert dec.n_captures == 1 and dec.cut_graph is None and dec.n_replays >= new - 2
        else:
            assert dec.n_captures == 2 and dec.cut_graph is not None and dec.n_replays >= new - 2
        assert not tok_diff, f"next token differs at steps {tok_diff}"
        assert not diffs, f"logits not bitwise equal at {len(diffs)} steps: (step, max abs diff) {diffs[:8]}"
        assert cache.n_seen == ref.n_seen == P + new
        for i, m in cache.memories.items():
            r = ref.memories[i]
            assert m._state() == r._state(), f"layer {i}"
            n = m.n_seen
            assert torch.equal(m.k_store[:, :n], r.k_store[:, :n]) and torch.equal(m.v_store[:, :n], r.v_store[:, :n])
            assert torch.equal(m.scores, r.scores), f"layer {i}: token scores"
            assert torch.equal(m.block_reprs(), r.block_reprs()), f"layer {i}: representatives"
        if variant == "heads":
            nb = cache.memories[0].n_blocks
            assert cache.relevance.n_filled == ref.relevance.n_filled
            assert torch.equal(cache.relevance.raw[:nb], ref.relevance.raw[:nb])



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_cuda_graph_matches_model_generate(dtype, caplog):
    """qllm.generate decodes with CUDA-graph replays by default on the fast path, and gives the text
    of model.generate (cuda_graph=False): greedy, and sampling with the same seed."""
    import logging
    import re

    model = _tiny_llama(9).to("cuda", dtype)
    model.generation_config.eos_token_id = None  # a random model: decode all 110 tokens
    tok = ByteTokenizer()
    context = "".join(chr(97 + (7 * i) % 26) for i in range(400))
    args = dict(config=CFG, max_new_tokens=110)
    with caplog.at_level(logging.DEBUG, logger="qllm"):
        got = qllm.generate(model, tok, context, "which letter?", **args)
    m = re.search(r"decoded (\d+) tokens: (\d+) graph replays, (\d+) eager steps", caplog.text)
    assert m is not None, caplog.text[-2000:]
    n, n_graph, n_eager = map(int, m.groups())
    print(f"{dtype}: generate: {n} tokens, {n_graph} graph replays, {n_eager} eager steps")
    assert n == 110 and n_graph >= 105 and n_eager <= 2  # block-cut tokens replay the cut graph
    want = qllm.generate(model, tok, context, "which letter?", cuda_graph=False, **args)
    assert got == want
    assert len(got.split()) == 110
    sample = dict(args, do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    torch.manual_seed(11)
    s_graph = qllm.generate(model, tok, context, "which letter?", cuda_graph=True, **sample)
    torch.manual_seed(11)
    s_eager = qllm.generate(model, tok, context, "which letter?", cuda_graph=False, **sample)
    assert s_graph == s_eager
    assert not qllm.is_patched(model)


@pytest.mark.parametrize("cut_graph", [True, False], ids=["cut-graph", "cuts-eager"])
def test_graph_decoder_no_host_sync(cut_graph):
    """After the capture step, graph steps, the block-cut steps between them (replays of the cut
    graph, or eager with cut_graph=False) and the sampling of qllm's decode loop enqueue work only
    (torch.cuda.set_sync_debug_mode('error'))."""
    from qllm.generate import _picker
    from qllm.gpu import GraphDecoder

    model = _tiny_llama(3).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2)).cuda()
    with qllm.patched(model, CFG):
        qllm.set_question(model, torch.tensor([1, 2, 3]))
        cache, logits = _prefilled(model, ids, 300)
        dec = GraphDecoder(model, cache, 80, cut_graph=cut_graph)
        pick = _picker(model, ids, True, {"temperature": 0.7, "top_k": 30, "top_p": 0.9})
        tok = dec.step(logits[:, -1:].argmax(-1)).argmax(-1)  # warm-up + capture (synchronises)
        torch.cuda.synchronize()
        assert dec.graph is not None
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(60):
                out = dec.step(tok)
                tok = pick(out) if i % 2 else out[:, -1:].argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        if cut_graph:
            assert dec.n_eager == 0 and dec.n_captures == 2 and cache.n_seen == 261
        else:
            assert dec.n_eager >= 3 and dec.n_replays >= 50 and dec.cut_graph is None and cache.n_seen == 261


def test_prefill_with_question_no_host_sync():
    """The first call of a patched CUDA model -- the question pass alongside its first chunk, the
    question's ids copied from the CPU, five chunks with block cuts -- enqueues work only
    (torch.cuda.set_sync_debug_mode('error')); and its logits equal those of the same call made
    without the check."""
    model = _tiny_llama(4).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(5)).cuda()
    question = torch.tensor([7, 8, 9, 10, 11])
    with qllm.patched(model, CFG):
        qllm.set_question(model, question)
        want_cache, want = _prefilled(model, ids, 700)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cache, got = _prefilled(model, ids, 700)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    assert cache.memories[0].n_blocks == want_cache.memories[0].n_blocks > 20
    assert all(m.question is not None for m in cache.memories.values())
    assert torch.equal(got, want)

