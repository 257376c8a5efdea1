"""CUDA implementations of torch.ops.qllm and the GPU attention path.

Skipped without CUDA.  Every CUDA op is compared with the CPU op on the same
fresh random inputs (f32 / f16 / bf16, strided views, edge sizes, ties);
``attend_cuda`` (qllm/gpu.py) is compared with ``qllm.attention.attend`` on
``LayerMemory`` in float32 on the CPU, fed the same (rounded) values, for
every strategy, multi-block texts, prefill + decode segments, question on and
off: outputs, token scores and the retrieved block sets of every execution
block.
"""

from __future__ import annotations

import math

import pytest
import torch

from _cuda_helpers import DecodeStepRunner

import qllm  # noqa: F401  (registers torch.ops.qllm)
from qllm.attention import RopeTable, _fixed_query, attend
from qllm.config import QLLMConfig
from qllm.memory import LayerMemory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

ops = torch.ops.qllm
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """Same values, every dim with a step of 2 inside a larger buffer (same device)."""
    big = torch.zeros([2 * s + 1 for s in x.shape], dtype=x.dtype, device=x.device)
    view = big[tuple(slice(1, None, 2) for _ in x.shape)]
    view.copy_(x)
    return view


def _layouts(x: torch.Tensor):
    yield "contiguous", x
    yield "strided", _strided(x)
    if x.dim() >= 2:
        yield "transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2)


# ================================================================ generic ops

REPR_SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (1, 2, 4, 1, 8, 3),
    (3, 2, 3, 16, 8, 4),
    (4, 2, 4, 32, 16, 40),
    (5, 4, 1, 17, 12, 5),
    (2, 1, 4, 64, 64, 4),
    (7, 8, 4, 128, 128, 4),
    (2, 2, 2, 300, 32, 9),  # more tokens than threads per block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", REPR_SHAPES, ids=str)
def test_repr_compute_matches_cpu(dtype, shape):
    nb, hkv, group, t, d, k = shape
    g = _gen(hash(shape) % 1000)
    keys = _randn(g, nb, hkv, t, d, dtype=dtype)
    scores = _randn(g, nb, hkv * group, t, dtype=dtype)
    expected = ops.repr_compute(keys, scores, k)
    for name, kc in _layouts(keys.to(DEV)):
        for sname, sc in _layouts(scores.to(DEV)):
            got = ops.repr_compute(kc, sc, k)
            assert got.dtype == torch.float32 and got.device.type == "cuda"
            # same selection, same summation order: equal up to f32 rounding
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6, msg=f"{name}/{sname}")


def test_repr_compute_ties_pick_lower_token():
    g = _gen(3)
    keys = _randn(g, 6, 2, 40, 16)
    scores = torch.randint(0, 3, (6, 4, 40), generator=g).float()  # many ties
    got = ops.repr_compute(keys.to(DEV), scores.to(DEV), 5).cpu()
    torch.testing.assert_close(got, ops.repr_compute(keys, scores, 5), rtol=1e-6, atol=1e-6)


def test_repr_compute_unchecked_no_sync_nan_lowest():
    """host_check=False (the question vector of the GPU path): no host sync, and non-finite
    scores rank by value with NaN lowest -- the CPU op's choice once NaN is replaced by a score
    below every other (ties among them toward the lower token, so all-NaN rows pick the first)."""
    g = _gen(5)
    keys = _randn(g, 4, 2, 24, 16)
    scores = _randn(g, 4, 4, 24)
    scores[0, 1, [2, 7, 9]] = math.nan
    scores[1, 0, :] = math.nan  # every token: the first 5 are picked
    scores[2, 3, 4] = math.inf
    scores[3, 2, [1, 5]] = -math.inf
    ref_scores = scores.nan_to_num(nan=-3e38, posinf=3e38, neginf=-2e38)
    expected = ops.repr_compute(keys, ref_scores, 5)
    kd, sd = keys.to(DEV), scores.to(DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ops.repr_compute(kd, sd, 5, host_check=False)
        with pytest.raises(RuntimeError, match="synchroniz"):  # the checked call reads the device
            ops.repr_compute(kd, sd, 5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1, 0].cpu(), keys[1, 0, :5].sum(dim=0) / 5, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"qllm\.repr_compute: .*QLLM_ERR_NONFINITE"):
        ops.repr_compute(kd, sd, 5)  # the default still checks


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_repr_compute_out_strided_rows(out_dtype):
    g = _gen(4)
    keys = _randn(g, 3, 2, 16, 8, dtype=torch.bfloat16)
    scores = _randn(g, 3, 4, 16)
    buf = torch.full((8, 4, 16), 7.0, dtype=out_dtype, device=DEV)
    view = buf[2:5, :, ::2]
    ops.repr_compute_out(keys.to(DEV), scores.to(DEV), 3, view)
    expected = torch.empty(3, 4, 8, dtype=out_dtype)
    ops.repr_compute_out(keys, scores, 3, expected)
    torch.testing.assert_close(view.cpu(), expected, rtol=0, atol=0)
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched[2:5, :, ::2] = False
    assert bool((buf[untouched] == 7.0).all())


@pytest.mark.parametrize("with_question", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb", [0, 1, 37, 1000])
def test_retrieval_score_matches_cpu(with_question, dtype, nb):
    g = _gen(nb + 7)
    reprs = _randn(g, nb, 8, 64, dtype=dtype)
    query = _randn(g, 8, 64, dtype=dtype)
    question = _randn(g, 8, 64, dtype=dtype) if with_question else None
    expected = ops.retrieval_score(reprs, query, question, 2.5)
    bound = torch.einsum("bhd,hd->b", reprs.float().abs(), query.float().abs())
    if question is not None:
        bound = bound + 2.5 * torch.einsum("bhd,hd->b", reprs.float().abs(), question.float().abs())
    for name, r in _layouts(reprs.to(DEV)):
        got = ops.retrieval_score(r, _strided(query.to(DEV)),
                                  None if question is None else question.to(DEV), 2.5).cpu()
        assert got.shape == (nb,) and got.dtype == torch.float32
        assert bool(((got - expected).abs() <= 1e-5 * bound + 1e-6).all()), name


@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (100, 8), (1000, 1), (4096, 8), (5000, 64), (7, 20)])
def test_retrieval_topk_matches_cpu(n, k):
    g = _gen(n * 31 + k)
    for scores in (_randn(g, n), torch.randint(0, 5, (n,), generator=g).float()):  # random, many ties
        expected = ops.retrieval_topk(scores, k)
        for name, s in _layouts(scores.to(DEV)):
            got = ops.retrieval_topk(s, k).cpu()
            assert got.dtype == torch.int32
            assert torch.equal(got, expected), name


@pytest.mark.parametrize("with_question", [False, True])
def test_retrieval_select_matches_cpu(with_question):
    g = _gen(11)
    reprs = _randn(g, 300, 8, 64)
    query = _randn(g, 8, 64)
    question = _randn(g, 8, 64) if with_question else None
    idx, scores = ops.retrieval_select(reprs.to(DEV), query.to(DEV),
                                       None if question is None else question.to(DEV), 1.5, 8)
    _, s_cpu = ops.retrieval_select(reprs, query, question, 1.5, 8)
    torch.testing.assert_close(scores.cpu(), s_cpu, rtol=1e-5, atol=1e-4)
    # the selection is exact on the scores it computed
    assert torch.equal(idx.cpu(), ops.retrieval_topk(scores.cpu(), 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int64])
def test_gather_slots_matches_cpu(dtype, slots_dtype):
    g = _gen(5)
    pool = _randn(g, 9, 3, 16, 8, dtype=dtype)
    slots = torch.tensor([4, 0, 8, 4], dtype=slots_dtype)
    expected = ops.gather_slots(pool, slots)
    for name, p in _layouts(pool.to(DEV)):
        got = ops.gather_slots(p, slots.to(DEV))
        assert got.is_contiguous() and torch.equal(got.cpu(), expected), name
    assert ops.gather_slots(pool.to(DEV), torch.zeros(0, dtype=slots_dtype, device=DEV)).shape == (3, 0, 8)


def test_cuda_ops_raise_like_cpu():
    keys = torch.randn(3, 2, 8, 4, device=DEV)
    scores = torch.randn(3, 4, 8, device=DEV)
    scores[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match=r"qllm\.repr_compute: .*scores.*QLLM_ERR_NONFINITE"):
        ops.repr_compute(keys, scores, 2)
    with pytest.raises(ValueError, match=r"qllm\.retrieval_topk: .*scores.*QLLM_ERR_NONFINITE"):
        ops.retrieval_topk(torch.tensor([1.0, math.nan, 2.0], device=DEV), 2)
    reprs = torch.randn(4, 2, 4, device=DEV)
    reprs[2, 1, 0] = math.inf
    with pytest.raises(ValueError, match=r"qllm\.retrieval_select: .*QLLM_ERR_NONFINITE"):
        ops.retrieval_select(reprs, torch.randn(2, 4, device=DEV), None, 0.0, 2)


_BAD_CALLS = {
    "mixed devices": ("torch.ops.qllm.repr_compute(torch.randn(3, 2, 8, 4, device='cuda'), torch.randn(3, 4, 8), 2)",
                      r"qllm\.repr_compute: scores: expected a tensor on cuda"),
    "slot out of range int32": ("torch.ops.qllm.gather_slots(torch.randn(4, 1, 2, 2, device='cuda'), "
                                "torch.tensor([0, 4], dtype=torch.int32, device='cuda'))",
                                r"qllm\.gather_slots: slots: expected values in \[0, 4\)"),
    "slot out of range int64": ("torch.ops.qllm.gather_slots(torch.randn(4, 1, 2, 2, device='cuda'), "
                                "torch.tensor([-1, 2], dtype=torch.int64, device='cuda'))",
                                r"qllm\.gather_slots: slots: expected values in \[0, 4\)"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CALLS))
def test_bad_cuda_arguments_raise_not_crash(case):
    """ValueError naming the argument, and the process survives (a subprocess:
    a crash fails this test only)."""
    import re
    import subprocess
    import sys
    call, msg = _BAD_CALLS[case]
    code = ("import torch, qllm\n"
            f"try:\n    {call}\n    print('NO ERROR')\n"
            "except ValueError as e:\n    print('VALUEERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"process died (rc {r.returncode}): {r.stdout[-500:]} {r.stderr[-2000:]}"
    assert "VALUEERROR" in r.stdout and re.search(msg, r.stdout), r.stdout


def test_opcheck_cuda_ops():
    g = _gen(9)
    cases = [
        (ops.repr_compute.default, (_randn(g, 2, 2, 8, 16).to(DEV), _randn(g, 2, 4, 8).to(DEV), 3)),
        (ops.retrieval_score.default, (_randn(g, 5, 4, 16).to(DEV), _randn(g, 4, 16).to(DEV), None, 0.0)),
        (ops.retrieval_topk.default, (_randn(g, 20).to(DEV), 4)),
        (ops.retrieval_select.default, (_randn(g, 5, 4, 16).to(DEV), _randn(g, 4, 16).to(DEV),
                                        _randn(g, 4, 16).to(DEV), 1.0, 3)),
        (ops.gather_slots.default, (_randn(g, 4, 2, 8, 16).to(DEV), torch.tensor([3, 1], device=DEV))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ============================================================ GPU attention

def _rope(P: int, D: int, theta: float = 10000.0, mscale: float = 1.0) -> RopeTable:
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return RopeTable((emb.cos() * mscale).float(), (emb.sin() * mscale).float())


def _inputs(seed, hq, hkv, D, T, dtype):
    g = _gen(seed)
    q = _randn(g, hq, T, D).to(dtype)
    k = _randn(g, hkv, T, D).to(dtype)
    v = _randn(g, hkv, T, D).to(dtype)
    return q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _ref_block_scores(mem: LayerMemory, q_blk: torch.Tensor, rope: RopeTable) -> torch.Tensor | None:
    """Block scores the reference uses for an execution block (None without retrieval)."""
    cfg = mem.config
    if not cfg.uses_blocks or mem.n_blocks == 0:
        return None
    qbar = _fixed_query(q_blk.float(), rope, cfg.n_local).mean(dim=1)
    question = mem.question if cfg.uses_question else None
    return ops.retrieval_score(mem.block_reprs(), qbar, question, float(cfg.question_weight))


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CUDA copy of t whose data starts 4 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 4, dtype=t.dtype, device=DEV)
    base = (-buf.data_ptr() // t.element_size()) % 4  # elements to the first 16-byte boundary
    v = buf[base + 1: base + 1 + t.numel()].view(t.shape)
    v.copy_(t)
    assert v.is_contiguous() and v.data_ptr() % 16 == 4
    return v


def _run_pair(cfg, *, hq=8, hkv=2, D=64, dtype=torch.bfloat16, segments=(400,), seed=0,
              question=False, mscale=1.0, tol=None, misaligned_rope=False):
    """Feed the same text to LayerMemory+attend (CPU f32) and CudaLayerMemory+attend_cuda.

    Returns per-segment (rel. output error) and checks retrieval per execution block."""
    from qllm.gpu import CudaLayerMemory, attend_cuda

    T = sum(segments)
    q, k, v = _inputs(seed, hq, hkv, D, T, dtype)
    rope = _rope(cfg.max_rel_position + 1, D, mscale=mscale)
    # misaligned_rope: the GPU reads tables that are not 16-byte aligned (scalar loads in prep)
    rope_gpu = RopeTable(_misaligned(rope.cos), _misaligned(rope.sin)) if misaligned_rope else rope
    scaling = D ** -0.5
    ref = LayerMemory(cfg, hq, hkv, D, torch.float32, torch.device("cpu"))
    gpu = CudaLayerMemory(cfg, hq, hkv, D, dtype, torch.device(DEV))
    if question:
        qv = _randn(_gen(seed + 100), hq, D) * 0.5
        ref.question = qv
        gpu.question = qv.to(DEV)
    tol = tol if tol is not None else (2e-2 if dtype == torch.bfloat16 else 4e-3)
    E = cfg.exc_block_size
    errs = []
    start = 0
    for n in segments:
        sl = slice(start, start + n)
        # reference: one attend call per execution block, to log every retrieval
        outs, ref_ret, ref_scores = [], [], []
        for a in range(start, start + n, E):
            b = min(a + E, start + n)
            ref_scores.append(_ref_block_scores(ref, q[:, a:b], rope))
            outs.append(attend(ref, q[:, a:b].float(), k[:, a:b].float(), v[:, a:b].float(), rope, scaling))
            ref_ret.append([] if ref.last_retrieved is None else sorted(ref.last_retrieved.tolist()))
        out_ref = torch.cat(outs, dim=1)
        out_gpu = attend_cuda(gpu, q[:, sl].to(DEV), k[:, sl].to(DEV), v[:, sl].to(DEV), rope_gpu, scaling)
        assert out_gpu.shape == out_ref.shape and out_gpu.dtype == dtype
        assert bool(torch.isfinite(out_gpu).all())
        err = _rel(out_gpu.cpu(), out_ref)
        errs.append(err)
        assert err <= tol, f"segment {n} at {start}: rel error {err:.2e} > {tol:.1e}"
        # retrieval of every execution block
        log = gpu.retrieved_log.cpu()
        assert log.shape[0] == len(ref_ret)
        for i, want in enumerate(ref_ret):
            got = [x for x in log[i].tolist() if x >= 0]
            if got != want:
                s = ref_scores[i]
                diff = sorted(set(got) ^ set(want))
                kth = torch.sort(s, descending=True).values[len(want) - 1]
                assert bool(((s[diff] - kth).abs() <= 1e-4 * s.abs().max()).all()), \
                    f"exec block {i} of segment at {start}: retrieved {got}, reference {want}"
        # host bookkeeping and token scores
        assert (gpu.n_seen, gpu.tail_start, gpu.n_blocks) == (ref.n_seen, ref.tail_start, ref.n_blocks)
        ts_err = _rel(gpu.tail_scores.cpu(), ref.tail_scores)
        assert ts_err <= tol, f"token scores rel error {ts_err:.2e}"
        start += n
    return errs, gpu, ref


# small budget with block_size 16: every block retrieved (topk >= n_blocks), so the
# output does not depend on near-ties of representatives; repr_topk < block_size
SMALL_ALL = QLLMConfig(n_init=16, n_local=64, block_size=16, topk=64, repr_topk=4, exc_block_size=32,
                       question_weight=1.0)
# repr_topk == block_size: representatives are plain block means (no near-ties), topk < n_blocks
SMALL_SEL = QLLMConfig(n_init=16, n_local=64, block_size=16, topk=4, repr_topk=16, exc_block_size=32,
                       question_weight=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("segments", [(400,), (150, 1, 1, 1, 97, 1, 40, 1)], ids=str)
def test_attend_cuda_all_blocks_retrieved(dtype, D, segments):
    _run_pair(SMALL_ALL, D=D, dtype=dtype, segments=segments, question=True)


@pytest.mark.parametrize("question", [False, True])
def test_attend_cuda_retrieval_many_block_pairs(question):
    """The second call starts with ~180 blocks and has 64 execution blocks: more than 8192
    (execution block, block) pairs, so its block scores take the tiled kernel (bscore_kernel), not
    the warp-per-pair one; retrieval and outputs must still match the reference."""
    cfg = SMALL_SEL
    first, second = 3000, 2048
    blocks = (first - cfg.n_init - cfg.n_local) // cfg.block_size - 1
    assert blocks * (second // cfg.exc_block_size) > 8192
    _, gpu, _ = _run_pair(cfg, D=64, segments=(first, second), question=question, seed=7)
    assert gpu.n_blocks >= blocks


def test_attend_cuda_seam_without_staging():
    """One call of 188 execution blocks with 32 query heads: the seam kernel's cut CTAs read the
    later blocks' qcomb rows from global memory (they do not fit in shared memory) and its last
    cut CTA sums the partials from global memory (2 cut blocks x 187 rows x 32 heads do not fit
    beside the selection either); retrieval and outputs must still match the reference."""
    cfg = SMALL_SEL
    T = 6000
    n_exec = -(-T // cfg.exc_block_size)
    assert n_exec * 64 > 11008 and 2 * (n_exec - 1) * 32 > 11008  # attend.cu seam_cut/last_floats budget
    _, gpu, _ = _run_pair(cfg, hq=32, hkv=8, D=64, segments=(T,), question=True, seed=11)
    assert gpu.n_blocks > 300


@pytest.mark.parametrize("strategy", ["qllm", "infllm", "streaming"])
@pytest.mark.parametrize("question", [False, True])
@pytest.mark.parametrize("segments", [(500,), (200, 1, 1, 1, 3, 150, 1)], ids=str)
def test_attend_cuda_retrieval(strategy, question, segments):
    cfg = SMALL_SEL.replace(strategy=strategy)
    _run_pair(cfg, D=64, segments=segments, question=question, seed=len(segments))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 1), (6, 2)])
def test_attend_cuda_head_groups(hq, hkv):
    _run_pair(SMALL_SEL, hq=hq, hkv=hkv, D=64, segments=(300, 1, 1), question=True, seed=hq)


def test_attend_cuda_short_text_is_causal_attention():
    """Shorter than n_init + n_local: ordinary causal attention."""
    errs, gpu, _ = _run_pair(SMALL_SEL, D=128, segments=(50, 1, 20), question=True)
    assert gpu.n_blocks == 0 and not gpu.init_done


@pytest.mark.parametrize("D", [64, 128])
def test_attend_cuda_misaligned_rope_tables(D):
    """cos / sin tables that do not start on 16 bytes (prep's scalar loads) give
    the reference's values too."""
    _run_pair(SMALL_SEL, D=D, segments=(300, 1, 1), mscale=1.2, question=True, misaligned_rope=True)


def test_attend_cuda_attention_scaling_in_cos0():
    """cos[0] != 1 (yarn-style mscale) reaches the fixed-position query."""
    _run_pair(SMALL_SEL, D=64, segments=(300,), mscale=1.2, question=True)


def test_attend_cuda_default_budget_llama_heads():
    """The 2K-budget config on Llama-3 head geometry (32 q / 8 kv heads, d=128),
    prefill of 4 execution blocks per call plus decode; repr_topk = block_size
    so retrieval is decided by block means."""
    cfg = QLLMConfig(repr_topk=128)
    _run_pair(cfg, hq=32, hkv=8, D=128, segments=(2100, 1500, 1, 1, 1), question=True, seed=3)


def test_attend_cuda_deterministic_and_no_host_sync():
    from qllm.gpu import CudaLayerMemory, attend_cuda

    cfg = SMALL_SEL
    q, k, v = _inputs(1, 8, 2, 64, 600, torch.bfloat16)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    rope = _rope(cfg.max_rel_position + 1, 64)
    rope = RopeTable(rope.cos.to(DEV), rope.sin.to(DEV))
    outs = []
    for _ in range(2):
        mem = CudaLayerMemory(cfg, 8, 2, 64, torch.bfloat16, torch.device(DEV), capacity=1024)
        mem.question = torch.randn(8, 64, generator=_gen(2)).to(DEV)
        attend_cuda(mem, q[:, :8], k[:, :8], v[:, :8], rope, 0.125)  # rope tables onto the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            parts = [attend_cuda(mem, q[:, 8:500], k[:, 8:500], v[:, 8:500], rope, 0.125)]
            for t in range(500, 600):
                parts.append(attend_cuda(mem, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rope, 0.125))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs.append(torch.cat(parts, dim=1))
    assert torch.equal(outs[0], outs[1])


def test_attend_cuda_kv_slots_in_place():
    """K/V written into the store rows of kv_slots and passed as those views give bitwise the
    outputs, retrievals, scores and stores of K/V passed as separate tensors (the copy onto
    themselves is skipped); kv_slots reserves before the caller writes (the store grows here
    from 1024 rows); a batched GEMM with out= writes the slots in place (what the layer
    benchmark does); tiered memory has no slots."""
    from qllm.gpu import CudaLayerMemory, attend_cuda

    cfg = SMALL_SEL
    hq, hkv, D, T = 8, 2, 64, 1500
    q, k, v = (t.to(DEV) for t in _inputs(41, hq, hkv, D, T, torch.bfloat16))
    rope = _rope(cfg.max_rel_position + 1, D)
    mems = [CudaLayerMemory(cfg, hq, hkv, D, torch.bfloat16, torch.device(DEV), capacity=16) for _ in range(2)]
    for m in mems:
        m.question = torch.randn(hq, D, generator=_gen(2)).to(DEV)
    ref, mem = mems
    for a, b in ((0, 300), (300, 301), (301, 1200), (1200, 1201), (1201, T)):
        want = attend_cuda(ref, q[:, a:b], k[:, a:b], v[:, a:b], rope, D ** -0.5)
        slots = mem.kv_slots(b - a)
        assert slots is not None and mem.k_store.shape[1] >= b
        ks, vs = slots
        ks.copy_(k[:, a:b])
        vs.copy_(v[:, a:b])
        ptr = mem.k_store.data_ptr()
        got = attend_cuda(mem, q[:, a:b], ks, vs, rope, D ** -0.5)
        assert mem.k_store.data_ptr() == ptr  # no reallocation after the slots were written
        assert torch.equal(got, want)
        assert torch.equal(mem.retrieved_log, ref.retrieved_log)
        assert mem._state() == ref._state()
    torch.cuda.synchronize()
    assert torch.equal(mem.k_store[:, :T], k) and torch.equal(mem.v_store[:, :T], v)
    assert torch.equal(mem.scores, ref.scores)
    assert torch.equal(mem.block_reprs(), ref.block_reprs())

    # a batched GEMM writes the slots in place, close to the flat projection
    H = 96
    g = _gen(43)
    x = _randn(g, 40, H).to(DEV, torch.bfloat16)
    w = (_randn(g, hkv * D, H) * H ** -0.5).to(DEV, torch.bfloat16)
    ks, _ = mem.kv_slots(40)
    ptr = ks.data_ptr()
    torch.bmm(x.expand(hkv, 40, H), w.view(hkv, D, H).transpose(1, 2), out=ks)
    assert ks.data_ptr() == ptr == mem.k_store[:, T].data_ptr()
    flat = (x @ w.T).view(40, hkv, D).transpose(0, 1)
    assert _rel(mem.k_store[:, T:T + 40].float().cpu(), flat.float().cpu()) < 1e-2

    tiered = CudaLayerMemory(cfg.replace(device_blocks=8), hq, hkv, D, torch.bfloat16, torch.device(DEV))
    assert tiered.kv_slots(10) is None
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match="kv_slots: n_tokens: expected an int >= 1"):
            mem.kv_slots(bad)


def test_attend_cuda_matches_reference_attention():
    """Against the independent float64 reference of qllm.reference (per-query lists of keys)."""
    from qllm import reference as R
    from qllm.gpu import CudaLayerMemory, attend_cuda

    cfg = SMALL_SEL
    hq, hkv, D, T = 4, 2, 64, 260
    q, k, v = _inputs(7, hq, hkv, D, T, torch.bfloat16)
    rope = _rope(cfg.max_rel_position + 1, D)
    question = torch.randn(hq, D, generator=_gen(8)) * 0.5
    out_ref, info = R.reference_attention(q.float(), k.float(), v.float(), config=cfg, cos=rope.cos,
                                          sin=rope.sin, scaling=D ** -0.5, question=question,
                                          segments=[200, 1, 59])
    mem = CudaLayerMemory(cfg, hq, hkv, D, torch.bfloat16, torch.device(DEV))
    mem.question = question.to(DEV)
    outs, logs = [], []
    for a, b in ((0, 200), (200, 201), (201, 260)):
        outs.append(attend_cuda(mem, q[:, a:b].to(DEV), k[:, a:b].to(DEV), v[:, a:b].to(DEV), rope, D ** -0.5))
        logs += [[x for x in row if x >= 0] for row in mem.retrieved_log.cpu().tolist()]
    assert _rel(torch.cat(outs, 1).cpu(), out_ref) < 2e-2
    if info["retrieval_gap"] > 1e-4:
        assert logs == info["retrieved"]


# ============================================================ graph-captured decode step

@pytest.mark.parametrize("strategy,dtype,D,question", [
    ("qllm", torch.bfloat16, 64, True),
    ("infllm", torch.float16, 128, False),
    ("streaming", torch.bfloat16, 64, False),
])
@pytest.mark.parametrize("prefill,steps", [(30, 90), (300, 40)], ids=str)
@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_decode_step_matches_attend_cuda(strategy, dtype, D, question, prefill, steps, graph):
    """N decode tokens through CudaDecodeStep (replays of captured CUDA graphs,
    or eager launches) give bitwise the outputs, token scores, representatives
    and retrievals of N attend_cuda calls; the steps that cut a block (every
    block_size tokens) run as the step's cut variant (graph: a second graph),
    the init transition goes through attend_cuda."""
    from qllm.gpu import CudaDecodeStep, CudaLayerMemory, attend_cuda

    cfg = SMALL_SEL.replace(strategy=strategy)
    hq, hkv = 8, 2
    T = prefill + steps
    q, k, v = (t.to(DEV) for t in _inputs(11, hq, hkv, D, T, dtype))
    rope = _rope(cfg.max_rel_position + 1, D)
    scaling = D ** -0.5
    mems = [CudaLayerMemory(cfg, hq, hkv, D, dtype, torch.device(DEV), capacity=T + 8) for _ in range(2)]
    if question:
        qv = (torch.randn(hq, D, generator=_gen(5)) * 0.5).to(DEV)
        for m in mems:
            m.question = qv
    ref, mem = mems
    for m in mems:
        attend_cuda(m, q[:, :prefill], k[:, :prefill], v[:, :prefill], rope, scaling)
    runner = DecodeStepRunner(CudaDecodeStep(mem, rope, scaling), mem, rope, scaling, q, k, v, graph,
                              allow_cut=True)
    n_fast = 0
    for t in range(prefill, T):
        want = attend_cuda(ref, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rope, scaling).clone()
        want_log = ref.retrieved_log.clone()
        got, got_log, fast = runner.run(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        n_fast += fast
        assert torch.equal(got, want), f"token {t}: max diff {float((got.float() - want).abs().max())}"
        assert torch.equal(got_log, want_log), f"token {t}: retrieved {got_log.tolist()} vs {want_log.tolist()}"
        assert mem._state() == ref._state()
    assert n_fast >= steps // 2
    assert runner.n_cuts >= (0 if strategy == "streaming" else 2)  # the cut steps ran as the step
    torch.cuda.synchronize()
    assert torch.equal(mem.scores, ref.scores)
    assert torch.equal(mem.block_reprs(), ref.block_reprs())
    assert torch.equal(mem.k_store[:, :T], ref.k_store[:, :T])
    assert torch.equal(mem.v_store[:, :T], ref.v_store[:, :T])


@pytest.mark.parametrize("allow_cut", [False, True], ids=["cuts-eager", "cut-graph"])
def test_decode_step_llama_geometry_graph(allow_cut):
    """2K-budget config, 32 q / 8 kv heads, d=128: graph replays across two block cuts, which go
    through attend_cuda (prepare without allow_cut declines them) or replay the cut graph."""
    from qllm.gpu import CudaDecodeStep, CudaLayerMemory, attend_cuda

    cfg = QLLMConfig(repr_topk=4)
    hq, hkv, D, P, S = 32, 8, 128, 3000, 300
    q, k, v = (t.to(DEV) for t in _inputs(12, hq, hkv, D, P + S, torch.bfloat16))
    rope = _rope(cfg.max_rel_position + 1, D)
    mems = [CudaLayerMemory(cfg, hq, hkv, D, torch.bfloat16, torch.device(DEV), capacity=P + S) for _ in range(2)]
    qv = (torch.randn(hq, D, generator=_gen(6)) * 0.1).to(DEV)
    for m in mems:
        m.question = qv
        attend_cuda(m, q[:, :P], k[:, :P], v[:, :P], rope, D ** -0.5)
    ref, mem = mems
    runner = DecodeStepRunner(CudaDecodeStep(mem, rope, D ** -0.5), mem, rope, D ** -0.5, q, k, v, graph=True,
                              allow_cut=allow_cut)
    cuts = 0
    for t in range(P, P + S):
        want = attend_cuda(ref, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rope, D ** -0.5)
        got, _, fast = runner.run(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        cuts += not fast
        assert torch.equal(got, want), f"token {t}"
    if allow_cut:
        assert cuts == 0 and runner.n_cuts >= 2 and mem._state() == ref._state()
    else:
        assert cuts >= 2 and runner.n_cuts == 0 and mem._state() == ref._state()
    assert torch.equal(mem.scores, ref.scores) and torch.equal(mem.block_reprs(), ref.block_reprs())


# ============================================================ question heads (qllm.retrieval)

def _heads_relevance(pairs, lower_pairs, lower: torch.Tensor, device) -> "QuestionRelevance":  # noqa: F821
    """A QuestionRelevance whose columns of ``lower_pairs`` (heads of earlier layers) hold ``lower``."""
    from qllm.retrieval import QuestionRelevance

    rel = QuestionRelevance(pairs, torch.device(device))
    if lower_pairs:  # else the default 16 rows: attend_cuda grows the matrix
        rel.raw = torch.zeros(lower.shape[0], len(rel.heads), device=device)
    for i, p in enumerate(lower_pairs):
        c = rel.heads.index(p)
        rel.raw[:, c] = lower[:, i].to(device)
        rel.n_filled[c] = lower.shape[0]
    return rel


def _heads_case(cfg, *, own, n_lower, hq, hkv, D, dtype, T, seed, layer, n_tok, n_later=0):
    """Inputs, rope and the two memories (CPU f32 LayerMemory, CUDA CudaLayerMemory), each with its
    own QuestionRelevance holding the same lower-layer columns (and ``n_later`` columns of a later
    layer, their scores written, ``n_filled`` 0: the caller advances it)."""
    from qllm.gpu import CudaLayerMemory

    q, k, v = _inputs(seed, hq, hkv, D, T, dtype)
    rope = _rope(cfg.max_rel_position + 1, D)
    g = _gen(seed + 300)
    qtok = _fixed_query(torch.randn(hq, n_tok, D, generator=g) * 1.5, rope, cfg.n_local)  # [hq, n_tok, D] f32
    lower_pairs = [(i % layer, 50 + i) for i in range(n_lower)]  # head ids only label the columns
    later_pairs = [(layer + 3, 60 + i) for i in range(n_later)]
    pairs = lower_pairs + [(layer, h) for h in own] + later_pairs
    nmax = T // cfg.block_size + 1
    lower = torch.randn(nmax, n_lower, generator=g) * 3
    later = torch.randn(nmax, n_later, generator=g) * 3
    qv = torch.randn(hq, D, generator=g) * 0.5  # a question vector: the heads term must replace it
    mems = []
    for dev in ("cpu", DEV):
        if dev == "cpu":
            mem = LayerMemory(cfg, hq, hkv, D, torch.float32, torch.device("cpu"))
        else:
            mem = CudaLayerMemory(cfg, hq, hkv, D, dtype, torch.device(DEV))
        mem.layer_idx = layer
        mem.relevance = _heads_relevance(pairs, lower_pairs, lower, dev)
        if n_later:
            rel = mem.relevance
            if rel.raw.shape[0] < nmax:
                rel.raw = torch.zeros(nmax, len(rel.heads), device=dev)
            for i, p in enumerate(later_pairs):
                rel.raw[:nmax, rel.heads.index(p)] = later[:, i].to(dev)
        mem.question_tokens = qtok.to(dev)
        mem.question = qv.to(dev)
        mems.append(mem)
    return q, k, v, rope, mems, lower_pairs


def _ref_head_block_scores(mem: LayerMemory, q_blk: torch.Tensor, rope: RopeTable) -> torch.Tensor | None:
    """The block scores the generic path ranks for an execution block (qllm.retrieval.select_blocks)."""
    from qllm.retrieval import standardize

    cfg = mem.config
    if not cfg.uses_blocks or mem.n_blocks == 0:
        return None
    qbar = _fixed_query(q_blk.float(), rope, cfg.n_local).mean(dim=1)
    c = mem.relevance.score(mem.layer_idx, mem.n_blocks) if cfg.uses_question else None
    if c is None:
        return _ref_block_scores(mem, q_blk, rope)
    a = ops.retrieval_score(mem.block_reprs(), qbar, None, 0.0)
    return standardize(a) + float(cfg.question_weight) * c


def _run_heads_pair(cfg, *, own, n_lower, hq=8, hkv=2, D=64, dtype=torch.bfloat16, segments=(500,), seed=0,
                    layer=2, n_tok=6, n_later=0):
    """The generic path (LayerMemory + attend, CPU f32, QuestionRelevance on the CPU) against
    attend_cuda (QuestionRelevance on the device) on the same inputs: outputs, retrieved blocks
    of every execution block (equal unless the reference scores tie to 1e-3), raw head scores.
    ``n_later``: heads of a later layer, which (as in a model's forward pass) have scored the
    blocks that existed when each segment began."""
    from qllm.gpu import attend_cuda

    T = sum(segments)
    q, k, v, rope, (ref, gpu), lower_pairs = _heads_case(cfg, own=own, n_lower=n_lower, hq=hq, hkv=hkv, D=D,
                                                         dtype=dtype, T=T, seed=seed, layer=layer, n_tok=n_tok,
                                                         n_later=n_later)
    rel_c, rel_g = ref.relevance, gpu.relevance
    later_cols = [c for c, (l, _) in enumerate(rel_c.heads) if l > layer]
    own_cols = [rel_c.heads.index((layer, h)) for h in own]
    lower_cols = [rel_c.heads.index(p) for p in lower_pairs]
    lower_before = rel_g.raw[:, lower_cols].clone()
    scaling = D ** -0.5
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    E = cfg.exc_block_size
    start = 0
    n_checked = 0
    for n in segments:
        for rel in (rel_c, rel_g):
            for c in later_cols:
                rel.n_filled[c] = ref.n_blocks
        outs, ref_ret, ref_scores = [], [], []
        for a in range(start, start + n, E):
            b = min(a + E, start + n)
            ref_scores.append(_ref_head_block_scores(ref, q[:, a:b], rope))
            outs.append(attend(ref, q[:, a:b].float(), k[:, a:b].float(), v[:, a:b].float(), rope, scaling))
            ref_ret.append([] if ref.last_retrieved is None else sorted(ref.last_retrieved.tolist()))
        out_ref = torch.cat(outs, dim=1)
        sl = slice(start, start + n)
        out_gpu = attend_cuda(gpu, q[:, sl].to(DEV), k[:, sl].to(DEV), v[:, sl].to(DEV), rope, scaling)
        err = _rel(out_gpu.cpu(), out_ref)
        assert err <= tol, f"segment {n} at {start}: rel error {err:.2e} > {tol:.1e}"
        log = gpu.retrieved_log.cpu()
        for i, want in enumerate(ref_ret):
            got = [x for x in log[i].tolist() if x >= 0]
            n_checked += bool(want)
            if got != want:
                s = ref_scores[i]
                diff = sorted(set(got) ^ set(want))
                kth = torch.sort(s, descending=True).values[len(want) - 1]
                assert bool(((s[diff] - kth).abs() <= 1e-3).all()), \
                    f"exec block {i} of segment at {start}: retrieved {got}, reference {want}"
        assert (gpu.n_seen, gpu.tail_start, gpu.n_blocks) == (ref.n_seen, ref.tail_start, ref.n_blocks)
        nb = ref.n_blocks
        assert rel_g.n_filled == rel_c.n_filled
        if own_cols and nb:
            torch.testing.assert_close(rel_g.raw[:nb, own_cols].cpu(), rel_c.raw[:nb, own_cols],
                                       rtol=1e-4, atol=1e-3)
        start += n
    if lower_cols:  # the other layers' columns are read, never written
        assert torch.equal(rel_g.raw[:lower_before.shape[0], lower_cols], lower_before)
    assert n_checked > 3
    return gpu, ref


HEADS_CFG = SMALL_SEL.replace(question_weight=1.5)


@pytest.mark.parametrize("own,n_lower", [((1,), 0), ((0, 5), 0), ((), 2), ((3,), 3)],
                         ids=["own1", "own2", "lower2", "own1+lower3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("segments", [(500,), (200, 1, 1, 1, 3, 150, 1)], ids=str)
def test_attend_cuda_question_heads(own, n_lower, dtype, segments):
    _run_heads_pair(HEADS_CFG, own=own, n_lower=n_lower, dtype=dtype, segments=segments,
                    seed=len(own) * 10 + n_lower + len(segments))


@pytest.mark.parametrize("segments", [(500,), (200, 1, 1, 1, 3, 150, 1, 1, 1)], ids=str)
def test_attend_cuda_question_heads_of_later_layers(segments):
    """Rule 6c on the GPU: later layers' heads join until the call cuts a block (attend_cuda runs
    the execution blocks before the first cut and those after as two op calls)."""
    _run_heads_pair(HEADS_CFG, own=(1,), n_lower=1, n_later=2, segments=segments)


@pytest.mark.parametrize("n_tok", [1, 16, 37])
def test_attend_cuda_question_heads_token_counts(n_tok):
    """Question lengths around the kernel's 16-token chunks; D=128, GQA group 4."""
    _run_heads_pair(HEADS_CFG, own=(2, 7), n_lower=1, D=128, dtype=torch.bfloat16, segments=(420, 1, 60),
                    n_tok=n_tok, seed=n_tok)


def test_attend_cuda_question_heads_many_columns():
    """Calibration-like: every head of the layer plus 40 lower columns (statistics in chunks of 32
    columns, 8 heads recorded per cut)."""
    _run_heads_pair(HEADS_CFG, own=tuple(range(8)), n_lower=40, segments=(400, 1, 1), seed=9)


def test_attend_cuda_question_heads_infllm_records_only():
    """infllm: the layer's heads still score the blocks (for later layers), retrieval ignores them."""
    _run_heads_pair(HEADS_CFG.replace(strategy="infllm"), own=(1, 4), n_lower=1, segments=(300, 1, 100))


def test_attend_cuda_question_heads_layer0():
    """The first layer: its own heads are the only columns (the heads' term is computed from
    blocks this call cuts, execution block by execution block)."""
    _run_heads_pair(HEADS_CFG, own=(6,), n_lower=0, layer=0, segments=(600,), seed=5)


def test_attend_cuda_question_heads_llama_geometry():
    """2K-budget config on Llama-3 head geometry (32 q / 8 kv heads, d=128), repr_topk = block_size."""
    cfg = QLLMConfig(repr_topk=128, question_weight=4.0)
    _run_heads_pair(cfg, own=(3, 17), n_lower=2, hq=32, hkv=8, D=128, segments=(2100, 1500, 1, 1), seed=3,
                    layer=5, n_tok=20)


def test_attend_cuda_question_heads_no_host_sync():
    from qllm.gpu import attend_cuda

    cfg = HEADS_CFG
    q, k, v, rope, (_, mem), _ = _heads_case(cfg, own=(1,), n_lower=2, hq=8, hkv=2, D=64, dtype=torch.bfloat16,
                                             T=600, seed=4, layer=1, n_tok=9)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    rope = RopeTable(rope.cos.to(DEV), rope.sin.to(DEV))
    attend_cuda(mem, q[:, :8], k[:, :8], v[:, :8], rope, 0.125)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attend_cuda(mem, q[:, 8:500], k[:, 8:500], v[:, 8:500], rope, 0.125)  # grows nothing: 38 rows
        for t in range(500, 600):
            attend_cuda(mem, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rope, 0.125)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert mem.n_blocks > 20 and mem.relevance.n_filled[mem.relevance.heads.index((1, 1))] == mem.n_blocks


def test_attend_run_question_heads_bad_arguments():
    from qllm.gpu import CudaLayerMemory

    cfg = HEADS_CFG
    mem = CudaLayerMemory(cfg, 4, 2, 64, torch.bfloat16, torch.device(DEV))
    q = torch.randn(4, 3, 64, device=DEV, dtype=torch.bfloat16)
    rope = _rope(cfg.max_rel_position + 1, 64)
    cos, sin = mem._rope_tables(rope)
    sched = torch.tensor([[0, 3, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int64)
    args = (q, mem.k_store, mem.v_store, mem.scores, mem.reprs, torch.empty(1, 4, dtype=torch.int32, device=DEV),
            torch.empty_like(q), cos, sin)
    raw = torch.zeros(16, 3, device=DEV)
    tok = torch.zeros(4, 5, 64, device=DEV)
    cfg_l = [16, 64, 16, 4, 16, 0]
    bad = [
        ((None, sched, 0.1, 1.0, cfg_l, None, None, [1, 0]), "qh_raw: needed"),
        ((None, sched, 0.1, 1.0, cfg_l, raw, None, [4, 0]), "columns out of range"),
        ((None, sched, 0.1, 1.0, cfg_l, raw, None, [1, 2, 0]), "qh_tokens: needed"),
        ((None, sched, 0.1, 1.0, cfg_l, raw, tok, [1, 2, 4]), "head 4"),
        ((torch.zeros(4, 64, device=DEV), sched, 0.1, 1.0, cfg_l, raw, None, [1, 0]), "question must be None"),
        ((None, sched, 0.1, 1.0, cfg_l, raw, tok, []), "without qh_cfg"),
    ]
    for extra, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ops.attend_run(*args, *extra)


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_decode_step_question_heads_matches_attend_cuda(graph):
    """CudaDecodeStep with question heads (own + lower columns) gives bitwise attend_cuda's outputs
    and retrievals; the steps that cut blocks run attend_cuda and record the raw scores."""
    from qllm.gpu import CudaDecodeStep, CudaLayerMemory, attend_cuda

    cfg = HEADS_CFG
    hq, hkv, D, dtype = 8, 2, 64, torch.bfloat16
    prefill, steps = 300, 70
    T = prefill + steps
    q, k, v = (t.to(DEV) for t in _inputs(13, hq, hkv, D, T, dtype))
    rope = _rope(cfg.max_rel_position + 1, D)
    scaling = D ** -0.5
    layer, own = 1, (2, 5)
    lower_pairs = [(0, 40), (0, 41)]
    pairs = lower_pairs + [(layer, h) for h in own]
    lower = torch.randn(T // cfg.block_size + 1, 2, generator=_gen(14)) * 3
    qtok = _fixed_query(torch.randn(hq, 11, D, generator=_gen(15)), rope, cfg.n_local).to(DEV)
    mems = []
    for _ in range(2):
        m = CudaLayerMemory(cfg, hq, hkv, D, dtype, torch.device(DEV), capacity=T + 8)
        m.layer_idx, m.question_tokens, m.question = layer, qtok, torch.randn(hq, D, generator=_gen(16)).to(DEV)
        m.relevance = _heads_relevance(pairs, lower_pairs, lower, DEV)
        attend_cuda(m, q[:, :prefill], k[:, :prefill], v[:, :prefill], rope, scaling)
        mems.append(m)
    ref, mem = mems
    step = CudaDecodeStep(mem, rope, scaling)
    assert step.question is None and step._qh_sel == 4
    runner = DecodeStepRunner(step, mem, rope, scaling, q, k, v, graph)
    n_fast = n_cut = 0
    for t in range(prefill, T):
        want = attend_cuda(ref, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rope, scaling).clone()
        want_log = ref.retrieved_log.clone()
        got, got_log, fast = runner.run(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        n_fast += fast
        n_cut += not fast
        assert torch.equal(got, want), f"token {t}: max diff {float((got.float() - want).abs().max())}"
        assert torch.equal(got_log, want_log), f"token {t}: retrieved {got_log.tolist()} vs {want_log.tolist()}"
    assert n_fast >= steps // 2 and n_cut >= 3
    torch.cuda.synchronize()
    nb = mem.n_blocks
    assert mem.relevance.n_filled == ref.relevance.n_filled
    assert torch.equal(mem.relevance.raw[:nb], ref.relevance.raw[:nb])
    # a reallocated relevance matrix invalidates the step (the graph holds the old pointer)
    mem.relevance.raw = mem.relevance.raw.clone()
    assert not step.prepare()


def test_cuda_attention_kernel_names_the_kernel_that_runs():
    """The op the benchmarks record: the sm_90a build (the default) runs wgmma
    for head dim 128 and mma.sync for head dim 64; QLLM_ATTN_WGMMA=0 picks
    mma.sync for both."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k.startswith("QLLM_ATTN_") and k not in ("QLLM_ATTN_PAIR", "QLLM_ATTN_EARLY")}
    n128 = torch.ops.qllm.cuda_attention_kernel(128)
    n64 = torch.ops.qllm.cuda_attention_kernel(64)
    plain = "mma.sync, 4 warps x 16 rows"
    if not env:
        wg = "wgmma, 1 warpgroup x 64 rows, pipelined (sm_90a)"
        assert (n128, n64) in {(wg, plain + " (wgmma needs head dim 128)"), (plain, plain)}, (n128, n64)
    elif env == {"QLLM_ATTN_WGMMA": "0"}:
        assert (n128, n64) == (plain, plain)
    with pytest.raises(RuntimeError):
        torch.ops.qllm.cuda_attention_kernel("128")


_KNOB_SCRIPT = r"""
import sys, torch
import qllm  # noqa: F401
from qllm.attention import RopeTable
from qllm.config import QLLMConfig
from qllm.gpu import CudaLayerMemory, attend_cuda
g = torch.Generator().manual_seed(11)
hq, hkv, D, T = 32, 8, 128, 3600
q = torch.randn(hq, T, D, generator=g).bfloat16().cuda()
k = torch.randn(hkv, T, D, generator=g).bfloat16().cuda()
v = torch.randn(hkv, T, D, generator=g).bfloat16().cuda()
cfg = QLLMConfig()
P = cfg.max_rel_position + 1
inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
emb = torch.cat([ang, ang], dim=-1)
rope = RopeTable(emb.cos().float().cuda(), emb.sin().float().cuda())
mem = CudaLayerMemory(cfg, hq, hkv, D, torch.bfloat16, torch.device("cuda"), capacity=4096)
mem.question = torch.randn(hq, D, generator=g).cuda()
outs = [attend_cuda(mem, q[:, a:b], k[:, a:b], v[:, a:b], rope, D ** -0.5) for a, b in ((0, 2100), (2100, T))]
for t in range(T, T + 8):  # decode steps after the prefill read its scores and representatives
    x = torch.randn(hq + 2 * hkv, 1, D, generator=g).bfloat16().cuda()
    outs.append(attend_cuda(mem, x[:hq], x[hq:hq + hkv], x[hq + hkv:], rope, D ** -0.5))
torch.save({"out": torch.cat(outs, dim=1).cpu(), "scores": mem.scores.cpu(), "reprs": mem.reprs[:mem.n_blocks].cpu(),
            "kernel": torch.ops.qllm.cuda_attention_kernel(128)}, sys.argv[1])
"""


def _knob_runs(tmp_path, var: str, values) -> dict:
    """_KNOB_SCRIPT's results in one process per value of environment variable var."""
    import os
    import subprocess
    import sys

    res = {}
    for val in values:
        path = tmp_path / f"{var}_{val}.pt"
        env = dict(os.environ, **{var: val})
        r = subprocess.run([sys.executable, "-c", _KNOB_SCRIPT, str(path)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        res[val] = torch.load(path)
    return res


def _assert_same_runs(res: dict) -> None:
    vals = list(res)
    a = res[vals[0]]
    assert a["out"].shape == (32, 3608, 128) and torch.isfinite(a["out"].float()).all()
    assert a["reprs"].shape[0] >= 15 and a["scores"].abs().sum() > 0
    for val in vals[1:]:
        b = res[val]
        assert b["kernel"] == a["kernel"]
        for key in ("out", "scores", "reprs"):
            assert torch.equal(a[key], b[key]), f"{key}: {vals[0]} vs {val}: max diff " \
                f"{float((a[key].float() - b[key].float()).abs().max())}"


def test_attention_row_pairing_changes_nothing(tmp_path):
    """The attention grid with heavy / light row tiles paired (the default) and in the natural
    order (QLLM_ATTN_PAIR=0, read once per process) give bitwise the same outputs, token scores
    and representatives: one process each, Llama-3 head geometry, 2K-budget config, execution
    blocks of 8 row tiles, then decode steps."""
    _assert_same_runs(_knob_runs(tmp_path, "QLLM_ATTN_PAIR", ("1", "0")))


def test_attention_early_start_changes_nothing(tmp_path):
    """The attention launched while the seam still runs (the default: it waits on the seam's
    counters, for the block's ids only before its retrieved tiles) and launched after the seam's
    end (QLLM_ATTN_EARLY=0) give bitwise the same outputs, token scores and representatives: the
    tile order is the same both ways.  Two runs of the early start as well: the waits are on
    data, so the result does not depend on when the seam's CTAs finish."""
    _assert_same_runs(_knob_runs(tmp_path, "QLLM_ATTN_EARLY", ("1", "0", "on")))

