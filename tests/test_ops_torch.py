"""torch.ops.qllm (csrc/torch/ops.cpp) on CPU against qllm.reference.

Every op is compared with the slow reference on fresh seeded random inputs
over dtype x shape x memory layout (non-contiguous views included), plus
explicit tie cases, opcheck, fake/meta shapes and one test per class of bad
input (exception type + a message naming the argument).  CUDA tests live
with the CUDA ops.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qllm  # noqa: F401  (registers torch.ops.qllm)
from qllm import reference as ref

ops = torch.ops.qllm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "strided", "permuted"]
_EPS = {torch.float32: torch.finfo(torch.float32).eps,
        torch.float16: torch.finfo(torch.float16).eps,
        torch.bfloat16: torch.finfo(torch.bfloat16).eps}


# ----------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to x (same values, same shape) with another memory layout."""
    if layout == "contiguous" or x.dim() == 0:
        return x
    if layout == "transposed":  # last two dims swapped in memory
        if x.dim() < 2:
            return _layout(x, "strided")
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every dim with a step of 2 inside a larger buffer
        big = torch.zeros([2 * s + 1 for s in x.shape], dtype=x.dtype)
        view = big[tuple(slice(1, None, 2) for _ in x.shape)]
        view.copy_(x)
        return view
    if layout == "permuted":  # all dims reversed in memory
        rev = list(range(x.dim()))[::-1]
        return x.permute(rev).contiguous().permute(rev)
    raise AssertionError(layout)


def _assert_layout_applied(x: torch.Tensor, layout: str) -> None:
    """Guard against a layout helper that silently stays contiguous."""
    if layout == "strided" and x.numel() > 1:
        assert not x.is_contiguous(), (layout, x.shape, x.stride())
    if layout in ("transposed", "permuted") and x.dim() >= 2 and min(x.shape[-2:]) > 1:
        assert not x.is_contiguous(), (layout, x.shape, x.stride())


def _score_bound(reprs, query, question, weight) -> torch.Tensor:
    """sum of |terms| of each block score: scales the f32 summation error."""
    a = torch.einsum("bhd,hd->b", reprs.float().abs(), query.float().abs())
    if question is not None:
        a = a + abs(weight) * torch.einsum("bhd,hd->b", reprs.float().abs(), question.float().abs())
    return a


# ------------------------------------------------------------ repr_compute

# (n_blocks, n_kv_heads, group, block_len, head_dim, repr_topk)
REPR_SHAPES = [
    (1, 1, 1, 1, 1, 1),      # 1 block, 1 token, 1 dim
    (1, 2, 4, 1, 8, 3),      # 1 token, repr_topk > block_len
    (3, 2, 3, 16, 8, 4),     # GQA group 3
    (4, 2, 4, 32, 16, 40),   # GQA group 4, repr_topk > block_len
    (5, 4, 1, 17, 12, 5),    # group 1 (MHA), odd sizes
    (2, 1, 4, 64, 64, 4),    # MQA-like
    (1, 3, 2, 7, 5, 7),      # repr_topk == block_len
]


def _repr_inputs(seed, shape, dtype, layout):
    nb, hkv, group, t, d, _ = shape
    g = _gen(seed)
    keys = _layout(_randn(g, nb, hkv, t, d, dtype=dtype), layout)
    scores = _layout(_randn(g, nb, hkv * group, t, dtype=dtype), layout)
    return keys, scores


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", REPR_SHAPES, ids=str)
def test_repr_compute_matches_reference(seed, layout, dtype, shape):
    keys, scores = _repr_inputs(seed, shape, dtype, layout)
    _assert_layout_applied(keys, layout)
    out = ops.repr_compute(keys, scores, shape[-1])
    expected = ref.repr_compute_ref(keys, scores, shape[-1])
    assert out.dtype == torch.float32 and out.shape == expected.shape
    # Inputs are rounded identically on both sides and the selection reads the
    # scores as stored, so the chosen tokens agree exactly; only the f32 mean
    # may differ in its last bits, whatever the input dtype.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_repr_compute_large_noncontiguous():
    """Big enough for the core to split work; mixed dtypes and layouts."""
    g = _gen(7)
    keys = _layout(_randn(g, 24, 4, 128, 64, dtype=torch.bfloat16), "permuted")
    scores = _layout(_randn(g, 24, 16, 128), "strided")
    out = ops.repr_compute(keys, scores, 4)
    torch.testing.assert_close(out, ref.repr_compute_ref(keys, scores, 4), rtol=1e-5, atol=1e-6)


def test_repr_compute_expanded_inputs():
    """Zero strides (expand) are valid inputs."""
    g = _gen(3)
    keys = _randn(g, 1, 2, 8, 4).expand(3, 2, 8, 4)
    scores = _randn(g, 3, 4, 1).expand(3, 4, 8)  # every token ties: first repr_topk win
    out = ops.repr_compute(keys, scores, 3)
    torch.testing.assert_close(out, ref.repr_compute_ref(keys, scores, 3), rtol=1e-5, atol=1e-6)


def test_repr_compute_ties_pick_lower_token():
    keys = torch.arange(6 * 2, dtype=torch.float32).view(1, 1, 6, 2)
    # head 0: tokens 1, 2, 4 tie at 5 -> repr_topk=2 takes 1 and 2
    # head 1: all equal -> tokens 0, 1
    scores = torch.tensor([[[0.0, 5.0, 5.0, 1.0, 5.0, -1.0], [2.0] * 6]])
    out = ops.repr_compute(keys, scores, 2)
    expected = torch.stack([keys[0, 0, [1, 2]].mean(0), keys[0, 0, [0, 1]].mean(0)])[None]
    assert torch.equal(out, expected)
    assert torch.equal(out, ref.repr_compute_ref(keys, scores, 2))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [REPR_SHAPES[2], REPR_SHAPES[3], REPR_SHAPES[0]], ids=str)
def test_repr_compute_out_strided_slice(seed, out_dtype, dtype, shape):
    """Writes exactly the strided view it is given; the rest of the buffer is untouched."""
    nb, hkv, group, _, d, topk = shape
    hq = hkv * group
    keys, scores = _repr_inputs(seed, shape, dtype, "transposed")
    sentinel = -12345.0
    buf = torch.full((2 * nb + 3, hq + 1, 2 * d + 1), sentinel, dtype=out_dtype)
    index = (slice(1, 1 + 2 * nb, 2), slice(1, None), slice(0, 2 * d, 2))
    out = buf[index]
    assert out.shape == (nb, hq, d) and (out.numel() == 1 or not out.is_contiguous())
    result = ops.repr_compute_out(keys, scores, topk, out)
    assert result is None
    expected = ref.repr_compute_ref(keys, scores, topk)
    # rounded once from f32 into out: at most half an ulp of out's dtype
    eps = _EPS[out_dtype]
    torch.testing.assert_close(out.float(), expected, rtol=eps if out_dtype != torch.float32 else 1e-5,
                               atol=1e-6)
    untouched = torch.ones(buf.shape, dtype=torch.bool)
    untouched[index] = False
    assert torch.all(buf[untouched] == sentinel)


def test_repr_compute_out_rows_of_buffer():
    """The intended use: fill rows [3, 3+nb) of a preallocated representative buffer."""
    keys, scores = _repr_inputs(5, REPR_SHAPES[2], torch.float16, "contiguous")
    nb, hq, d = keys.shape[0], scores.shape[1], keys.shape[3]
    buf = torch.zeros(10, hq, d, dtype=torch.float16)
    ops.repr_compute_out(keys, scores, 4, buf[3:3 + nb])
    expected = ref.repr_compute_ref(keys, scores, 4)
    torch.testing.assert_close(buf[3:3 + nb].float(), expected, rtol=_EPS[torch.float16], atol=1e-6)
    assert torch.all(buf[:3] == 0) and torch.all(buf[3 + nb:] == 0)


# ---------------------------------------------------------- retrieval_score

# (n_blocks, n_q_heads, head_dim)
SCORE_SHAPES = [(0, 4, 8), (1, 1, 1), (1, 8, 16), (7, 4, 32), (33, 8, 64), (5, 3, 5)]


def _score_inputs(seed, shape, dtype, layout, with_question):
    nb, hq, d = shape
    g = _gen(seed)
    reprs = _layout(_randn(g, nb, hq, d, dtype=dtype), layout)
    query = _layout(_randn(g, hq, d, dtype=dtype), layout)
    question = _layout(_randn(g, hq, d, dtype=dtype), layout) if with_question else None
    return reprs, query, question


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weight,with_question", [(0.0, False), (0.7, False), (0.0, True),
                                                   (0.7, True), (-2.5, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=str)
def test_retrieval_score_matches_reference(seed, weight, with_question, layout, dtype, shape):
    reprs, query, question = _score_inputs(seed, shape, dtype, layout, with_question)
    out = ops.retrieval_score(reprs, query, question, weight)
    expected = ref.retrieval_score_ref(reprs, query, question, weight)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    # products of f16/bf16 values are exact in f32: the only error is the f32
    # summation order, bounded relative to the sum of |terms|
    bound = 2e-5 * _score_bound(reprs, query, question, weight) + 1e-6
    assert torch.all((out - expected).abs() <= bound), (out - expected).abs().max()


def test_retrieval_score_mixed_dtypes():
    g = _gen(11)
    reprs = _randn(g, 9, 4, 16, dtype=torch.bfloat16)
    query = _randn(g, 4, 16, dtype=torch.float32)
    question = _randn(g, 4, 16, dtype=torch.float16)
    out = ops.retrieval_score(reprs, query, question, 1.5)
    expected = ref.retrieval_score_ref(reprs, query, question, 1.5)
    bound = 2e-5 * _score_bound(reprs, query, question, 1.5) + 1e-6
    assert torch.all((out - expected).abs() <= bound)


def test_retrieval_score_question_none_ignores_weight():
    reprs, query, _ = _score_inputs(2, (6, 4, 8), torch.float32, "contiguous", False)
    assert torch.equal(ops.retrieval_score(reprs, query, None, 0.0),
                       ops.retrieval_score(reprs, query, None, 3.0))


# ----------------------------------------------------------- retrieval_topk


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("n,k", [(0, 1), (0, 5), (1, 1), (1, 4), (10, 3), (10, 10), (10, 25),
                                 (257, 8), (1000, 64)])
def test_retrieval_topk_matches_reference(seed, layout, n, k):
    scores = _layout(_randn(_gen(seed), n), layout)
    out = ops.retrieval_topk(scores, k)
    expected = ref.retrieval_topk_ref(scores, k)
    assert out.dtype == torch.int32 and out.shape == (min(k, n),)
    assert torch.equal(out.long(), expected)


@pytest.mark.parametrize("scores,k,expected", [
    ([1.0, 3.0, 3.0, 0.0, 3.0, -1.0], 4, [1, 2, 4, 0]),
    ([2.0] * 7, 3, [0, 1, 2]),
    ([2.0] * 7, 9, [0, 1, 2, 3, 4, 5, 6]),
    ([-1.0, 5.0, -1.0, 5.0, -1.0], 5, [1, 3, 0, 2, 4]),
    ([0.0, -0.0, 0.0], 2, [0, 1]),  # signed zeros compare equal
    ([1e-38, 1e-38, 0.0], 2, [0, 1]),
    ([0.0, 1e-40, 0.0], 1, [1]),     # a subnormal is above zero
])
def test_retrieval_topk_ties_toward_lower_index(scores, k, expected):
    s = torch.tensor(scores, dtype=torch.float32)
    assert ops.retrieval_topk(s, k).tolist() == expected
    assert ref.retrieval_topk_ref(s, k).tolist() == expected


def test_retrieval_topk_ties_many_random():
    """Heavy ties (few distinct values) over many positions, non-contiguous."""
    g = _gen(4)
    scores = _layout(torch.randint(0, 4, (500,), generator=g).float(), "strided")
    for k in (1, 7, 130, 499, 500, 600):
        assert torch.equal(ops.retrieval_topk(scores, k).long(), ref.retrieval_topk_ref(scores, k))


# --------------------------------------------------------- retrieval_select


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_question", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((0, 4, 8), 3), ((1, 2, 4), 1), ((1, 2, 4), 5),
                                     ((12, 4, 16), 4), ((12, 4, 16), 12), ((12, 4, 16), 20),
                                     ((40, 8, 32), 8)], ids=str)
def test_retrieval_select_matches_reference(seed, with_question, layout, dtype, shape, k):
    reprs, query, question = _score_inputs(seed, shape, dtype, layout, with_question)
    weight = 0.6
    idx, scores = ops.retrieval_select(reprs, query, question, weight, k)
    assert idx.dtype == torch.int32 and idx.shape == (min(k, shape[0]),)
    assert scores.dtype == torch.float32 and scores.shape == (shape[0],)
    expected_scores = ref.retrieval_score_ref(reprs, query, question, weight)
    bound = 2e-5 * _score_bound(reprs, query, question, weight) + 1e-6
    assert torch.all((scores - expected_scores).abs() <= bound)
    # the indices are exactly the top-k of the scores it returned ...
    assert torch.equal(idx.long(), ref.retrieval_topk_ref(scores, k))
    # ... and agree with the separate ops
    assert torch.equal(scores, ops.retrieval_score(reprs, query, question, weight))
    assert torch.equal(idx, ops.retrieval_topk(scores, k))


def test_retrieval_select_ties_identical_blocks():
    """Identical blocks score identically (integer data: exact sums) -> lower index first."""
    g = _gen(9)
    base = torch.randint(-3, 4, (4, 8), generator=g).float()
    other = torch.randint(-3, 4, (4, 8), generator=g).float()
    query = torch.randint(-3, 4, (4, 8), generator=g).float()
    assert (base * query).sum() != (other * query).sum()
    reprs = torch.stack([other, base, other, base, base, other])
    top = 1 if (base * query).sum() > (other * query).sum() else 0
    expected = [1, 3, 4, 0, 2, 5] if top else [0, 2, 5, 1, 3, 4]
    idx, scores = ops.retrieval_select(reprs, query, None, 0.0, 6)
    assert idx.tolist() == expected
    assert idx.tolist() == ref.retrieval_topk_ref(scores, 6).tolist()
    idx4, _ = ops.retrieval_select(reprs, query, None, 0.0, 4)
    assert idx4.tolist() == expected[:4]


# ------------------------------------------------------------- gather_slots

# (n_slots, n_kv_heads, block_size, head_dim, slots)
GATHER_CASES = [
    (4, 2, 8, 16, [2, 0, 3]),
    (1, 1, 1, 1, [0]),
    (5, 3, 4, 8, []),              # n == 0
    (6, 2, 5, 3, [5, 5, 1, 5]),    # duplicates
    (16, 4, 16, 32, list(range(15, -1, -1))),
]


@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATHER_CASES, ids=str)
def test_gather_slots_matches_reference(slots_dtype, layout, dtype, case):
    n_slots, hkv, bs, d, slot_list = case
    pool = _layout(_randn(_gen(len(slot_list)), n_slots, hkv, bs, d, dtype=dtype), layout)
    slots = _layout(torch.tensor(slot_list, dtype=slots_dtype), layout)
    out = ops.gather_slots(pool, slots)
    expected = ref.gather_slots_ref(pool, slots)
    assert out.dtype == dtype and out.shape == (hkv, len(slot_list) * bs, d)
    assert torch.equal(out, expected)  # a copy: bit-exact


# ------------------------------------------------------------------ opcheck
# Default test_utils (schema, autograd registration, fake tensor, AOT dispatch
# with dynamic shapes) all apply: the ops are non-differentiable and the inputs
# below do not require grad.

OPCHECK_CASES = [
    (ops.repr_compute.default, lambda g: (_randn(g, 3, 2, 8, 4), _randn(g, 3, 4, 8), 3)),
    (ops.repr_compute.default,
     lambda g: (_layout(_randn(g, 2, 1, 5, 6, dtype=torch.bfloat16), "transposed"),
                _randn(g, 2, 3, 5, dtype=torch.float16), 9)),
    (ops.repr_compute_out.default,
     lambda g: (_randn(g, 3, 2, 8, 4), _randn(g, 3, 4, 8), 3, torch.zeros(3, 4, 4))),
    (ops.repr_compute_out.default,
     lambda g: (_randn(g, 2, 1, 4, 4, dtype=torch.float16), _randn(g, 2, 2, 4), 2,
                torch.zeros(5, 2, 8, dtype=torch.bfloat16)[1:5:2, :, ::2])),
    (ops.retrieval_score.default, lambda g: (_randn(g, 6, 4, 8), _randn(g, 4, 8), None, 0.0)),
    (ops.retrieval_score.default,
     lambda g: (_randn(g, 6, 4, 8, dtype=torch.bfloat16), _randn(g, 4, 8), _randn(g, 4, 8), 0.5)),
    (ops.retrieval_topk.default, lambda g: (_randn(g, 10), 4)),
    (ops.retrieval_topk.default, lambda g: (_randn(g, 3), 8)),
    (ops.retrieval_select.default,
     lambda g: (_randn(g, 9, 2, 8), _randn(g, 2, 8), _randn(g, 2, 8), 1.0, 3)),
    (ops.retrieval_select.default,
     lambda g: (_randn(g, 2, 2, 8, dtype=torch.float16), _randn(g, 2, 8), None, 0.0, 5)),
    (ops.gather_slots.default,
     lambda g: (_randn(g, 6, 2, 4, 8), torch.tensor([4, 0, 4], dtype=torch.int32))),
    (ops.gather_slots.default,
     lambda g: (_randn(g, 3, 1, 2, 4, dtype=torch.bfloat16), torch.tensor([2, 1]))),
]


@pytest.mark.parametrize("i", range(len(OPCHECK_CASES)))
def test_opcheck(i):
    op, make = OPCHECK_CASES[i]
    torch.library.opcheck(op, make(_gen(i)))


# ------------------------------------------------------------ fake / meta


def test_fake_tensor_shapes_and_dtypes():
    with FakeTensorMode():
        keys = torch.empty(5, 2, 16, 8, dtype=torch.bfloat16)
        scores = torch.empty(5, 6, 16, dtype=torch.float16)
        r = ops.repr_compute(keys, scores, 4)
        assert r.shape == (5, 6, 8) and r.dtype == torch.float32
        out = torch.empty(5, 6, 8, dtype=torch.float16)
        assert ops.repr_compute_out(keys, scores, 4, out) is None

        reprs = torch.empty(7, 6, 8, dtype=torch.float16)
        query = torch.empty(6, 8)
        s = ops.retrieval_score(reprs, query, query, 0.5)
        assert s.shape == (7,) and s.dtype == torch.float32
        t = ops.retrieval_topk(torch.empty(7), 3)
        assert t.shape == (3,) and t.dtype == torch.int32
        t = ops.retrieval_topk(torch.empty(2), 3)
        assert t.shape == (2,)
        idx, sc = ops.retrieval_select(reprs, query, None, 0.0, 10)
        assert idx.shape == (7,) and idx.dtype == torch.int32
        assert sc.shape == (7,) and sc.dtype == torch.float32
        idx, sc = ops.retrieval_select(torch.empty(0, 6, 8), query, None, 0.0, 2)
        assert idx.shape == (0,) and sc.shape == (0,)

        pool = torch.empty(9, 2, 4, 8, dtype=torch.bfloat16)
        for sd in (torch.int32, torch.int64):
            g = ops.gather_slots(pool, torch.empty(3, dtype=sd))
            assert g.shape == (2, 12, 8) and g.dtype == torch.bfloat16


def test_meta_tensors_shapes_and_checks():
    m = dict(device="meta")
    r = ops.repr_compute(torch.empty(3, 1, 4, 2, **m), torch.empty(3, 2, 4, **m), 2)
    assert r.device.type == "meta" and r.shape == (3, 2, 2) and r.dtype == torch.float32
    g = ops.gather_slots(torch.empty(4, 2, 3, 5, dtype=torch.float16, **m),
                         torch.empty(6, dtype=torch.int64, **m))
    assert g.shape == (2, 18, 5) and g.dtype == torch.float16
    # the Meta implementation runs the same checks
    with pytest.raises(ValueError, match=r"qllm\.repr_compute: keys: expected 4 dims"):
        ops.repr_compute(torch.empty(3, 4, 2, **m), torch.empty(3, 2, 4, **m), 2)
    with pytest.raises(TypeError, match=r"qllm\.retrieval_topk: scores: expected dtype float32"):
        ops.retrieval_topk(torch.empty(4, dtype=torch.float16, **m), 2)
    with pytest.raises(ValueError, match=r"qllm\.repr_compute_out: out: expected shape"):
        ops.repr_compute_out(torch.empty(3, 1, 4, 2, **m), torch.empty(3, 2, 4, **m), 2,
                             torch.empty(3, 2, 3, **m))


def test_compile_dynamic_shapes():
    """Symbolic shapes go through the Meta implementations (aot_eager: no codegen)."""
    def f(reprs, query, keys, scores):
        idx, sc = ops.retrieval_select(reprs, query, query, 0.5, 3)
        return idx, sc, ops.repr_compute(keys, scores, 2)

    cf = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for nb in (5, 9, 2):
        g = _gen(nb)
        args = (_randn(g, nb, 4, 8), _randn(g, 4, 8), _randn(g, nb, 2, 6, 8), _randn(g, nb, 4, 6))
        for e, c in zip(f(*args), cf(*args)):
            assert torch.equal(e, c)


# ------------------------------------------------------------- bad inputs
# One test per class of bad input: exception type + message naming the argument.


def _ok_repr():
    return torch.randn(3, 2, 8, 4), torch.randn(3, 4, 8)


def _ok_score():
    return torch.randn(5, 4, 8), torch.randn(4, 8)


def test_bad_dtype_raises_type_error():
    keys, scores = _ok_repr()
    reprs, query = _ok_score()
    cases = [
        (lambda: ops.repr_compute(keys.int(), scores, 2), r"qllm\.repr_compute: keys: expected dtype float32, float16 or bfloat16, got int32"),
        (lambda: ops.repr_compute(keys, scores.double(), 2), r"qllm\.repr_compute: scores: .*got float64"),
        (lambda: ops.repr_compute_out(keys, scores, 2, torch.empty(3, 4, 4, dtype=torch.int64)), r"qllm\.repr_compute_out: out: expected dtype"),
        (lambda: ops.retrieval_score(reprs.double(), query, None, 0.0), r"qllm\.retrieval_score: reprs: expected dtype"),
        (lambda: ops.retrieval_score(reprs, query, query.int(), 1.0), r"qllm\.retrieval_score: question: expected dtype"),
        (lambda: ops.retrieval_topk(torch.randn(4).half(), 2), r"qllm\.retrieval_topk: scores: expected dtype float32, got float16"),
        (lambda: ops.retrieval_select(reprs, query.bool(), None, 0.0, 2), r"qllm\.retrieval_select: query: expected dtype"),
        (lambda: ops.gather_slots(torch.randn(3, 1, 2, 2), torch.tensor([0.0])), r"qllm\.gather_slots: slots: expected dtype int32 or int64, got float32"),
        (lambda: ops.gather_slots(torch.zeros(3, 1, 2, 2, dtype=torch.int32), torch.tensor([0])), r"qllm\.gather_slots: pool: expected dtype"),
    ]
    for call, msg in cases:
        with pytest.raises(TypeError, match=msg):
            call()


def test_bad_rank_raises_value_error():
    keys, scores = _ok_repr()
    reprs, query = _ok_score()
    cases = [
        (lambda: ops.repr_compute(keys[0], scores, 2), r"qllm\.repr_compute: keys: expected 4 dims \(blocks, kv_heads, tokens, dim\), got 3"),
        (lambda: ops.repr_compute(keys, scores[None], 2), r"qllm\.repr_compute: scores: expected 3 dims \(blocks, q_heads, tokens\), got 4"),
        (lambda: ops.repr_compute_out(keys, scores, 2, torch.empty(3, 16)), r"qllm\.repr_compute_out: out: expected 3 dims"),
        (lambda: ops.retrieval_score(reprs[0], query, None, 0.0), r"qllm\.retrieval_score: reprs: expected 3 dims"),
        (lambda: ops.retrieval_score(reprs, query[0], None, 0.0), r"qllm\.retrieval_score: query: expected 2 dims"),
        (lambda: ops.retrieval_select(reprs, query, query[None], 0.5, 2), r"qllm\.retrieval_select: question: expected 2 dims"),
        (lambda: ops.retrieval_topk(torch.randn(2, 3), 2), r"qllm\.retrieval_topk: scores: expected 1 dims"),
        (lambda: ops.gather_slots(torch.randn(3, 2, 2), torch.tensor([0])), r"qllm\.gather_slots: pool: expected 4 dims"),
        (lambda: ops.gather_slots(torch.randn(3, 1, 2, 2), torch.tensor([[0]])), r"qllm\.gather_slots: slots: expected 1 dims"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_bad_shape_raises_value_error():
    keys, scores = _ok_repr()
    reprs, query = _ok_score()
    cases = [
        (lambda: ops.repr_compute(keys, scores[:2], 2), r"qllm\.repr_compute: scores: expected shape\[0\] \(blocks\) == 3"),
        (lambda: ops.repr_compute(keys, scores[..., :5], 2), r"qllm\.repr_compute: scores: expected shape\[2\] \(tokens\) == 8"),
        (lambda: ops.repr_compute(keys, torch.randn(3, 5, 8), 2), r"qllm\.repr_compute: scores: expected q_heads .* multiple of keys' kv_heads \(2\), got 5"),
        (lambda: ops.repr_compute(keys, torch.randn(3, 0, 8), 2), r"qllm\.repr_compute: scores: expected q_heads"),
        (lambda: ops.repr_compute(keys[:0], scores[:0], 2), r"qllm\.repr_compute: keys: expected blocks \(shape\[0\]\) >= 1"),
        (lambda: ops.repr_compute(keys[:, :, :0], scores[..., :0], 2), r"qllm\.repr_compute: keys: expected tokens"),
        (lambda: ops.repr_compute(keys[..., :0], scores, 2), r"qllm\.repr_compute: keys: expected dim"),
        (lambda: ops.repr_compute_out(keys, scores, 2, torch.empty(3, 4, 5)), r"qllm\.repr_compute_out: out: expected shape \[3, 4, 4\]"),
        (lambda: ops.retrieval_score(reprs, query[:3], None, 0.0), r"qllm\.retrieval_score: query: expected shape\[0\] \(q_heads\) == 4"),
        (lambda: ops.retrieval_score(reprs, query[:, :7], None, 0.0), r"qllm\.retrieval_score: query: expected shape\[1\] \(dim\) == 8"),
        (lambda: ops.retrieval_score(reprs, query, query[:, :7], 1.0), r"qllm\.retrieval_score: question: expected shape\[1\] \(dim\) == 8"),
        (lambda: ops.retrieval_select(reprs, query, query[:2], 1.0, 2), r"qllm\.retrieval_select: question: expected shape\[0\] \(q_heads\) == 4"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_bad_value_raises_value_error():
    keys, scores = _ok_repr()
    reprs, query = _ok_score()
    cases = [
        (lambda: ops.repr_compute(keys, scores, 0), r"qllm\.repr_compute: repr_topk: expected >= 1, got 0"),
        (lambda: ops.repr_compute_out(keys, scores, -3, torch.empty(3, 4, 4)), r"qllm\.repr_compute_out: repr_topk: expected >= 1, got -3"),
        (lambda: ops.retrieval_topk(torch.randn(4), 0), r"qllm\.retrieval_topk: k: expected >= 1, got 0"),
        (lambda: ops.retrieval_topk(torch.randn(0), -1), r"qllm\.retrieval_topk: k: expected >= 1, got -1"),
        (lambda: ops.retrieval_select(reprs, query, None, 0.0, 0), r"qllm\.retrieval_select: k: expected >= 1, got 0"),
        (lambda: ops.retrieval_score(reprs, query, query, math.nan), r"qllm\.retrieval_score: weight: expected a finite"),
        (lambda: ops.retrieval_score(reprs, query, query, math.inf), r"qllm\.retrieval_score: weight: expected a finite"),
        (lambda: ops.retrieval_score(reprs, query, None, -math.inf), r"qllm\.retrieval_score: weight: expected a finite"),
        (lambda: ops.retrieval_select(reprs, query, query, 1e300, 2), r"qllm\.retrieval_select: weight: expected a finite float32"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_mixed_devices_raise_value_error():
    """Meta + CPU dispatches to the Meta kernel, whose shared checks name the argument."""
    keys, scores = _ok_repr()
    reprs, query = _ok_score()
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
    cases = [
        (lambda: ops.repr_compute(keys, meta(scores), 2), r"qllm\.repr_compute: scores: expected a tensor on cpu \(the device of keys\), got meta"),
        (lambda: ops.repr_compute_out(keys, scores, 2, meta(torch.empty(3, 4, 4))), r"qllm\.repr_compute_out: out: expected a tensor on cpu"),
        (lambda: ops.retrieval_score(meta(reprs), query, None, 0.0), r"qllm\.retrieval_score: query: expected a tensor on meta \(the device of reprs\), got cpu"),
        (lambda: ops.retrieval_select(reprs, query, meta(query), 1.0, 2), r"qllm\.retrieval_select: question: expected a tensor on cpu"),
        (lambda: ops.gather_slots(torch.randn(3, 1, 2, 2), meta(torch.tensor([0]))), r"qllm\.gather_slots: slots: expected a tensor on cpu"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_nonfinite_inputs_raise_value_error():
    """Reported by the core (QLLM_ERR_NONFINITE) and raised as ValueError."""
    keys, scores = _ok_repr()
    reprs, query = _ok_score()
    bad_scores = scores.clone()
    bad_scores[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match=r"qllm\.repr_compute: .*scores.*QLLM_ERR_NONFINITE"):
        ops.repr_compute(keys, bad_scores, 2)
    with pytest.raises(ValueError, match=r"qllm\.repr_compute: .*scores.*QLLM_ERR_NONFINITE"):
        ops.repr_compute(keys, bad_scores, 2, host_check=False)  # the CPU core always checks
    bad_scores[1, 2, 3] = math.inf
    with pytest.raises(ValueError, match=r"qllm\.repr_compute_out: .*QLLM_ERR_NONFINITE"):
        ops.repr_compute_out(keys, bad_scores, 2, torch.empty(3, 4, 4))
    with pytest.raises(ValueError, match=r"qllm\.retrieval_topk: .*scores.*QLLM_ERR_NONFINITE"):
        ops.retrieval_topk(torch.tensor([1.0, math.nan, 2.0]), 2)
    bad_reprs = reprs.clone()
    bad_reprs[2, 1, 0] = math.inf
    with pytest.raises(ValueError, match=r"qllm\.retrieval_score: .*QLLM_ERR_NONFINITE"):
        ops.retrieval_score(bad_reprs, query, None, 0.0)
    with pytest.raises(ValueError, match=r"qllm\.retrieval_select: .*QLLM_ERR_NONFINITE"):
        ops.retrieval_select(bad_reprs, query, None, 0.0, 2)


def test_slot_out_of_range_raises_value_error():
    pool = torch.randn(4, 1, 2, 2)
    # int32: checked by the core (QLLM_ERR_INVALID_ARG)
    for bad in ([4], [0, -1]):
        with pytest.raises(ValueError, match=r"qllm\.gather_slots: .*slots.*QLLM_ERR_INVALID_ARG"):
            ops.gather_slots(pool, torch.tensor(bad, dtype=torch.int32))
    # int64: checked by the binding before narrowing; 2**32 + 1 must not wrap to 1
    for bad in ([4], [0, -1], [2**32 + 1], [-(2**32) + 1]):
        with pytest.raises(ValueError, match=r"qllm\.gather_slots: slots: expected values in \[0, 4\)"):
            ops.gather_slots(pool, torch.tensor(bad, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"qllm\.gather_slots: slots: expected values in \[0, 0\)"):
        ops.gather_slots(torch.randn(0, 1, 2, 2), torch.tensor([0]))


def test_bad_out_memory_raises_value_error():
    keys, scores = _ok_repr()
    with pytest.raises(ValueError, match=r"qllm\.repr_compute_out: out: expected a tensor whose elements do not overlap"):
        ops.repr_compute_out(keys, scores, 2, torch.empty(1, 4, 4).expand(3, 4, 4))
    # out aliasing an input: contiguous, and interleaved (a strided view of keys' storage)
    with pytest.raises(ValueError, match=r"qllm\.repr_compute_out: out: expected memory not shared with keys"):
        ops.repr_compute_out(keys, scores, 2, keys.view(-1)[: 3 * 4 * 4].view(3, 4, 4))
    with pytest.raises(ValueError, match=r"qllm\.repr_compute_out: out: expected memory not shared with scores"):
        ops.repr_compute_out(keys, scores, 2, scores[:, :, ::2])
    # disjoint rows of one buffer are fine
    buf = torch.randn(6, 4, 8)
    k2 = buf.view(6, 2, 16, 1).expand(6, 2, 16, 4)[:3, :, :8]
    ops.repr_compute_out(k2, scores, 2, buf[3:, :, :4])
    torch.testing.assert_close(buf[3:, :, :4], ref.repr_compute_ref(k2, scores, 2), rtol=1e-5, atol=1e-6)


def test_negative_bit_views():
    """Functional ops: the dispatcher resolves the bit on inputs, results are exact.
    repr_compute_out: a negative-bit tensor is refused with ValueError."""
    keys, scores = _ok_repr()
    neg_keys = torch.zeros(keys.shape, dtype=torch.complex64)
    neg_keys.imag.copy_(-keys)
    neg_keys = neg_keys.conj().imag  # public way to get a float view with the negative bit
    assert neg_keys.is_neg() and torch.equal(neg_keys, keys)
    assert torch.equal(ops.repr_compute(neg_keys, scores, 2), ops.repr_compute(keys, scores, 2))
    with pytest.raises(ValueError, match=r"qllm\.repr_compute_out: keys: expected a tensor without the negative bit"):
        ops.repr_compute_out(neg_keys, scores, 2, torch.empty(3, 4, 4))
    out = torch.zeros(3, 4, 4, dtype=torch.complex64).conj().imag
    assert out.is_neg()
    with pytest.raises(ValueError, match=r"qllm\.repr_compute_out: out: expected a tensor without the negative bit"):
        ops.repr_compute_out(keys, scores, 2, out)
    with pytest.raises(TypeError, match=r"qllm\.repr_compute_out: out: expected dtype"):
        ops.repr_compute_out(keys, scores, 2, torch.zeros(3, 4, 4, dtype=torch.complex64).conj())


def test_negative_bit_out_does_not_crash_the_process():
    """Without the fallthrough in ops.cpp the math-bit fallback reads past the
    dispatcher stack for `-> ()` ops and the interpreter aborts at exit."""
    # load only the op library (importing the whole package is slow)
    code = (
        "import torch, gc\n"
        f"torch.ops.load_library({qllm._C.__file__!r})\n"
        "out = torch.zeros(3, 4, 4, dtype=torch.complex64).conj().imag\n"
        "try:\n"
        "    torch.ops.qllm.repr_compute_out(torch.randn(3, 2, 8, 4), torch.randn(3, 4, 8), 2, out)\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
        "gc.collect()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ValueError qllm.repr_compute_out: out:" in proc.stdout
