"""qllm._core -- the C core through its NumPy binding -- against qllm.reference.

Every function is compared on fresh random inputs (seeded per test, several
seeds) over storage dtype (float32, float16, bfloat16 carried as uint16 bit
patterns), shape (edge sizes included) and memory layout (transposed, strided,
negative strides, unaligned, byte-swapped, byte strides that are not a
multiple of the itemsize).  Low-precision inputs are compared against the
reference computed in float32 from the same rounded values; every output of
the core that is float32 accumulates in float32, so those tolerances stay
tight.  Top-k and gathers are compared exactly.  The block store runs random
operation sequences against a small pure-Python model of what qllm.h promises.
"""

from __future__ import annotations

import gc
import importlib.util
import pathlib
import re
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import torch


def _load():
    """qllm._core and qllm.reference.

    The package's __init__ also loads qllm._C (the torch ops); when that one is
    not built, load the two modules by path so the NumPy binding can still be
    tested on its own.
    """
    try:
        from qllm import _core, reference

        return _core, reference
    except ImportError:
        pkg = pathlib.Path(__file__).resolve().parents[1] / "qllm"
        sos = sorted(pkg.glob("_core*.so")) + sorted(pkg.glob("_core*.pyd"))
        if not sos:
            raise
        mods = []
        for name, path in (("qllm._core", sos[0]), ("qllm_reference_standalone", pkg / "reference.py")):
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods.append(mod)
        return mods[0], mods[1]


core, ref = _load()

DTYPES = ["f32", "f16", "bf16"]
SEEDS = [0, 1, 2]
LAYOUTS = ["transposed", "strided", "negative", "negative_unit", "unaligned", "byteswapped",
           "odd_stride"]


# --------------------------------------------------------------------------- helpers


def storage(x, dt: str) -> np.ndarray:
    """float32 values -> array in the storage dtype (bf16 -> uint16 bit patterns)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dt == "f32":
        return x.copy()
    if dt == "f16":
        return x.astype(np.float16)
    if dt == "bf16":
        t = torch.from_numpy(x.copy()).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16).copy()
    raise AssertionError(dt)


def values(a) -> np.ndarray:
    """float32 values a storage array holds (uint16 = bfloat16 bits), any layout."""
    a = np.ascontiguousarray(a)
    a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    return a.astype(np.float32)


def bits(a) -> np.ndarray:
    """Raw native-order contents of a storage array, for exact comparison."""
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("="))


def relayout(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values as x in a different memory layout."""
    x = np.ascontiguousarray(x)
    if layout == "contiguous":
        return x.copy()
    if layout == "transposed":  # axes stored in reverse order: a transposed view
        out = np.ascontiguousarray(x.transpose()).transpose()
        assert x.ndim < 2 or not out.flags.c_contiguous or min(x.shape) <= 1
        return out
    if layout == "strided":  # every axis sliced with step 2
        buf = np.zeros(tuple(2 * s for s in x.shape), x.dtype)
        view = buf[tuple(slice(None, None, 2) for _ in x.shape)]
        view[...] = x
        return view
    if layout == "negative":  # every axis reversed: negative strides
        rev = tuple(slice(None, None, -1) for _ in x.shape)
        out = np.ascontiguousarray(x[rev])[rev]
        assert x.size <= 1 or any(s < 0 for s in out.strides)
        return out
    if layout == "negative_unit":  # only the size-1 axes reversed (their stride is irrelevant)
        rev = tuple(slice(None, None, -1 if n == 1 else 1) for n in x.shape)
        return x.copy()[rev]
    if layout == "unaligned":  # data pointer off by one byte
        raw = np.zeros(x.nbytes + 1, np.uint8)[1:]
        out = raw.view(x.dtype).reshape(x.shape)
        out[...] = x
        assert x.size == 0 or not out.flags.aligned
        return out
    if layout == "byteswapped":  # non-native byte order
        return x.astype(x.dtype.newbyteorder("S"))
    if layout == "odd_stride":  # byte strides that are not a multiple of the itemsize
        rec = np.zeros(x.shape, dtype=[("pad", "u1"), ("v", x.dtype)])
        rec["v"] = x
        return rec["v"]
    raise AssertionError(layout)


def t32(a) -> torch.Tensor:
    return torch.from_numpy(values(a))


def assert_close_scaled(got, want, scale, rtol=1e-5, what=""):
    """|got - want| <= rtol * scale elementwise (scale: magnitude of the terms summed)."""
    got, want, scale = np.asarray(got), np.asarray(want), np.asarray(scale)
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = rtol * scale + 1e-30
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements off; worst err {err.max():.3g}, "
        f"bound there {bound.flat[int(np.argmax(err - bound))]:.3g}"
    )


def tie_scores(rng, shape, dt):
    """Scores with many exact ties (small integers), in a storage dtype."""
    return storage(rng.integers(-2, 3, size=shape).astype(np.float32), dt)


def expect_error(exc, *names, nonfinite=False):
    """pytest.raises that also checks the message names the argument(s)."""

    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(exc)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self._cm.__exit__(*a)
            if not handled:  # another exception type: let it propagate as is
                return handled
            msg = str(self.info.value)
            for n in names:
                assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg), (
                    f"message {msg!r} does not name {n!r}")
            if nonfinite:
                low = msg.lower()
                assert "nan" in low or "inf" in low, f"message {msg!r} does not say NaN/Inf"
            return handled

    return _Ctx()


# --------------------------------------------------------------------------- repr_compute

# (n_blocks, n_kv_heads, n_q_heads, block_len, head_dim, repr_topk)
REPR_SHAPES = [
    (1, 1, 1, 1, 1, 1),  # 1 block, 1 token
    (1, 1, 1, 1, 4, 3),  # repr_topk > block_len == 1
    (3, 2, 2, 16, 8, 4),  # GQA group 1
    (4, 1, 3, 8, 5, 3),  # group 3
    (2, 2, 8, 7, 16, 2),  # group 4
    (5, 4, 4, 6, 4, 10),  # repr_topk > block_len
    (3, 2, 6, 9, 3, 9),  # repr_topk == block_len, group 3
    (2, 1, 4, 33, 64, 1),  # repr_topk == 1
    (16, 2, 8, 64, 32, 8),  # enough work for the thread pool
]


def repr_inputs(rng, shape, dt_keys, dt_scores, ties=False):
    nb, hkv, hq, t, d, _ = shape
    keys = storage(rng.standard_normal((nb, hkv, t, d)).astype(np.float32) * 3, dt_keys)
    if ties:
        scores = tie_scores(rng, (nb, hq, t), dt_scores)
    else:
        scores = storage(rng.standard_normal((nb, hq, t)).astype(np.float32), dt_scores)
    return keys, scores


def check_repr(keys, scores, topk):
    out = core.repr_compute(keys, scores, topk)
    want = ref.repr_compute_ref(t32(keys), t32(scores), topk).numpy()
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert out.shape == want.shape
    scale = max(1.0, float(np.abs(values(keys)).max(initial=0.0)))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * scale)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", REPR_SHAPES, ids=str)
def test_repr_compute_matches_reference(shape, dt, seed):
    rng = np.random.default_rng([seed, 11])
    keys, scores = repr_inputs(rng, shape, dt, dt)
    check_repr(keys, scores, shape[-1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", REPR_SHAPES[2:6], ids=str)
def test_repr_compute_score_ties_pick_lower_token(shape, dt, seed):
    # Integer scores: many tokens tie at the cut; the lower token index must win.
    rng = np.random.default_rng([seed, 12])
    keys, scores = repr_inputs(rng, shape, dt, dt, ties=True)
    check_repr(keys, scores, shape[-1])


def test_repr_compute_explicit_tie():
    # block_len 4, every score equal: repr_topk=2 must average tokens 0 and 1.
    keys = np.arange(1 * 1 * 4 * 2, dtype=np.float32).reshape(1, 1, 4, 2)
    scores = np.zeros((1, 1, 4), np.float32)
    out = core.repr_compute(keys, scores, 2)
    np.testing.assert_array_equal(out[0, 0], (keys[0, 0, 0] + keys[0, 0, 1]) / 2)
    # Highest first, then ties toward the lower index: tokens 3 (score 5) and 1.
    scores = np.array([[[1.0, 2.0, 2.0, 5.0]]], np.float32)
    out = core.repr_compute(keys, scores, 2)
    np.testing.assert_array_equal(out[0, 0], (keys[0, 0, 3] + keys[0, 0, 1]) / 2)


@pytest.mark.parametrize("dt_keys,dt_scores", [("f16", "f32"), ("bf16", "f16"), ("f32", "bf16")])
def test_repr_compute_mixed_dtypes(dt_keys, dt_scores):
    rng = np.random.default_rng(13)
    shape = (3, 2, 4, 10, 8, 3)
    keys, scores = repr_inputs(rng, shape, dt_keys, dt_scores)
    check_repr(keys, scores, 3)


@pytest.mark.parametrize("shape", [(3, 2, 4, 9, 6, 4), (1, 1, 2, 5, 1, 2)], ids=str)  # size-1 dims too
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dt", DTYPES)
def test_repr_compute_layouts(layout, dt, shape):
    rng = np.random.default_rng([14, DTYPES.index(dt), LAYOUTS.index(layout)])
    keys, scores = repr_inputs(rng, shape, dt, dt)
    topk = shape[-1]
    want = core.repr_compute(keys, scores, topk)
    for k_layout, s_layout in ((layout, "contiguous"), ("contiguous", layout), (layout, layout)):
        k2, s2 = relayout(keys, k_layout), relayout(scores, s_layout)
        got = check_repr(k2, s2, topk)
        np.testing.assert_array_equal(got, want)  # layout must not change a single bit


def test_repr_compute_permuted_and_broadcast_views():
    rng = np.random.default_rng(15)
    # keys stored as [n_blocks, block_len, n_kv_heads, head_dim] and viewed as [b, h, t, d].
    raw = rng.standard_normal((3, 7, 2, 5)).astype(np.float32)
    keys = raw.transpose(0, 2, 1, 3)
    scores = rng.standard_normal((3, 4, 7)).astype(np.float32)
    check_repr(keys, scores, 3)
    # scores shared by every query head: a zero stride.
    scores_b = np.broadcast_to(scores[:, :1], scores.shape)
    assert scores_b.strides[1] == 0
    check_repr(keys, scores_b, 3)


def test_repr_compute_huge_topk_uses_every_token():
    rng = np.random.default_rng(16)
    keys, scores = repr_inputs(rng, (2, 1, 2, 5, 3, 0), "f32", "f32")
    out = core.repr_compute(keys, scores, 10**30)
    np.testing.assert_allclose(out, np.repeat(keys.mean(axis=2), 2, axis=1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- retrieval_score / select

# (n_blocks, n_q_heads, head_dim)
SCORE_SHAPES = [(0, 4, 8), (1, 1, 1), (1, 3, 16), (7, 4, 32), (64, 8, 64), (513, 2, 128)]


def score_inputs(rng, shape, dt, with_question=True):
    nb, hq, d = shape
    reprs = storage(rng.standard_normal((nb, hq, d)), dt)
    query = storage(rng.standard_normal((hq, d)), dt)
    question = storage(rng.standard_normal((hq, d)), dt) if with_question else None
    return reprs, query, question


def score_ref(reprs, query, question, weight):
    r, q = values(reprs).astype(np.float64), values(query).astype(np.float64)
    want = ref.retrieval_score_ref(t32(reprs), t32(query),
                                   None if question is None else t32(question), weight).numpy()
    scale = np.einsum("bhd,hd->b", np.abs(r), np.abs(q))
    if question is not None:
        scale = scale + abs(weight) * np.einsum("bhd,hd->b", np.abs(r),
                                                np.abs(values(question).astype(np.float64)))
    return want, scale


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=str)
@pytest.mark.parametrize("weight", [None, 0.0, 0.7, -2.5])
def test_retrieval_score_matches_reference(shape, dt, seed, weight):
    rng = np.random.default_rng([seed, 21])
    reprs, query, question = score_inputs(rng, shape, dt, with_question=weight is not None)
    if weight is None:
        got = core.retrieval_score(reprs, query)
        got_none = core.retrieval_score(reprs, query, None, 123.0)  # weight ignored without question
        np.testing.assert_array_equal(got_none, got)
        weight = 0.0
    else:
        got = core.retrieval_score(reprs, query, question, weight)
        np.testing.assert_array_equal(
            core.retrieval_score(reprs=reprs, query=query, question=question, weight=weight), got)
    want, scale = score_ref(reprs, query, question, weight)
    assert got.dtype == np.float32 and got.shape == (shape[0],) and got.flags.c_contiguous
    assert_close_scaled(got, want, scale, what=f"retrieval_score {shape} {dt}")


@pytest.mark.parametrize("shape", [(9, 4, 16), (1, 1, 7), (5, 1, 1)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dt", DTYPES)
def test_retrieval_score_layouts(layout, dt, shape):
    rng = np.random.default_rng([22, DTYPES.index(dt), LAYOUTS.index(layout)])
    reprs, query, question = score_inputs(rng, shape, dt)
    want = core.retrieval_score(reprs, query, question, 0.5)
    got = core.retrieval_score(relayout(reprs, layout), relayout(query, layout),
                               relayout(question, layout), 0.5)
    np.testing.assert_array_equal(got, want)
    want_ref, scale = score_ref(reprs, query, question, 0.5)
    assert_close_scaled(got, want_ref, scale, what=layout)


def test_retrieval_score_mixed_dtypes_and_broadcast_query():
    rng = np.random.default_rng(23)
    reprs = storage(rng.standard_normal((5, 3, 8)), "bf16")
    query = storage(rng.standard_normal((3, 8)), "f16")
    question = storage(rng.standard_normal((3, 8)), "f32")
    got = core.retrieval_score(reprs, query, question, 1.5)
    want, scale = score_ref(reprs, query, question, 1.5)
    assert_close_scaled(got, want, scale, what="mixed")
    q_b = np.broadcast_to(question[:1], question.shape)  # zero stride over heads
    got = core.retrieval_score(reprs, query, q_b, 1.5)
    want, scale = score_ref(reprs, query, np.ascontiguousarray(q_b), 1.5)
    assert_close_scaled(got, want, scale, what="broadcast")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8, 10**12])
def test_retrieval_select_matches_reference(shape, dt, seed, k):
    rng = np.random.default_rng([seed, 24])
    reprs, query, question = score_inputs(rng, shape, dt)
    idx, scores = core.retrieval_select(reprs, query, question, 0.25, k)
    want, scale = score_ref(reprs, query, question, 0.25)
    assert scores.dtype == np.float32 and scores.shape == (shape[0],)
    assert idx.dtype == np.int32 and idx.shape == (min(k, shape[0]),)
    assert_close_scaled(scores, want, scale, what="select scores")
    # The indices are exactly the deterministic top-k of the scores it returned.
    np.testing.assert_array_equal(idx, ref.retrieval_topk_ref(torch.from_numpy(scores), k).numpy())
    # ... and the same as the two-call path.
    np.testing.assert_array_equal(idx, core.retrieval_topk(scores, k))


def test_retrieval_select_defaults_and_ties():
    # Identical blocks: every score ties, so the top-k is 0..k-1; default k is 8.
    reprs = np.ones((12, 2, 4), np.float32)
    query = np.full((2, 4), 0.5, np.float32)
    idx, scores = core.retrieval_select(reprs, query)
    np.testing.assert_array_equal(idx, np.arange(8, dtype=np.int32))
    np.testing.assert_array_equal(scores, np.full(12, 4.0, np.float32))
    idx, _ = core.retrieval_select(reprs, query, k=3)
    np.testing.assert_array_equal(idx, [0, 1, 2])
    # An empty memory selects nothing.
    idx, scores = core.retrieval_select(np.zeros((0, 2, 4), np.float32), query, k=4)
    assert idx.shape == (0,) and scores.shape == (0,) and idx.dtype == np.int32


# --------------------------------------------------------------------------- retrieval_topk


def topk_want(scores, k):
    return ref.retrieval_topk_ref(torch.from_numpy(np.ascontiguousarray(scores)), k).numpy()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 1000, 100_003])
@pytest.mark.parametrize("k", [1, 2, 5, 64, 1000, 10**30])
@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_topk_matches_reference(seed, n, k, ties):
    rng = np.random.default_rng([seed, 31, n])
    if ties:
        scores = rng.integers(-3, 4, size=n).astype(np.float32)
    else:
        scores = (rng.standard_normal(n) * 100).astype(np.float32)
    got = core.retrieval_topk(scores, k)
    assert got.dtype == np.int32 and got.flags.c_contiguous and got.shape == (min(k, n),)
    np.testing.assert_array_equal(got, topk_want(scores, k))


def test_retrieval_topk_explicit_ties_and_extremes():
    s = np.array([1, 3, 3, 2, 3], np.float32)
    np.testing.assert_array_equal(core.retrieval_topk(s, 1), [1])
    np.testing.assert_array_equal(core.retrieval_topk(s, 2), [1, 2])
    np.testing.assert_array_equal(core.retrieval_topk(s, 4), [1, 2, 4, 3])
    np.testing.assert_array_equal(core.retrieval_topk(s, 99), [1, 2, 4, 3, 0])
    np.testing.assert_array_equal(core.retrieval_topk(np.zeros(6, np.float32), 4), [0, 1, 2, 3])
    big = np.finfo(np.float32).max
    tiny = np.float32(1e-45)  # subnormal
    s = np.array([-big, tiny, big, -tiny, 0.0, big], np.float32)
    np.testing.assert_array_equal(core.retrieval_topk(s, 6), [2, 5, 1, 4, 3, 0])


def test_retrieval_topk_signed_zeros_tie():
    # -0.0 == 0.0: a tie, resolved toward the lower index.
    s = np.array([-0.0, 0.0, -0.0, 1.0, 0.0], np.float32)
    np.testing.assert_array_equal(core.retrieval_topk(s, 5), [3, 0, 1, 2, 4])


@pytest.mark.parametrize("n", [1, 301])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_retrieval_topk_layouts(layout, n):
    rng = np.random.default_rng([32, LAYOUTS.index(layout)])
    scores = rng.integers(-5, 5, size=n).astype(np.float32)
    got = core.retrieval_topk(relayout(scores, layout), 40)
    np.testing.assert_array_equal(got, topk_want(scores, 40))


def test_retrieval_topk_negative_stride_is_reversed_order():
    s = np.array([0.0, 1.0, 2.0, 2.0], np.float32)[::-1]  # [2, 2, 1, 0]
    np.testing.assert_array_equal(core.retrieval_topk(s, 3), [0, 1, 2])


# --------------------------------------------------------------------------- gather_slots

# (n_slots, n_kv_heads, block_size, head_dim, n)
GATHER_SHAPES = [(1, 1, 1, 1, 1), (4, 2, 3, 5, 0), (4, 2, 3, 5, 7), (9, 3, 16, 8, 9),
                 (32, 2, 64, 32, 40)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
@pytest.mark.parametrize("slot_kind", ["int32", "int64", "list", "tuple"])
def test_gather_slots_matches_reference(shape, dt, seed, slot_kind):
    rng = np.random.default_rng([seed, 41])
    ns, hkv, bs, d, n = shape
    pool = storage(rng.standard_normal((ns, hkv, bs, d)), dt)
    slots = rng.integers(0, ns, size=n)  # repeats included
    slots_arg = {"int32": slots.astype(np.int32), "int64": slots.astype(np.int64),
                 "list": [int(s) for s in slots], "tuple": tuple(int(s) for s in slots)}[slot_kind]
    got = core.gather_slots(pool, slots_arg)
    assert got.dtype == pool.dtype and got.flags.c_contiguous
    assert got.shape == (hkv, n * bs, d)
    want = ref.gather_slots_ref(torch.from_numpy(pool.view(f"i{pool.itemsize}")),
                                torch.from_numpy(slots)).numpy().view(pool.dtype)
    np.testing.assert_array_equal(bits(got), want)


@pytest.mark.parametrize("shape", [(6, 2, 4, 3, 8), (1, 1, 1, 5, 1)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dt", DTYPES)
def test_gather_slots_layouts(layout, dt, shape):
    rng = np.random.default_rng([42, DTYPES.index(dt), LAYOUTS.index(layout)])
    pool = storage(rng.standard_normal(shape[:4]), dt)
    slots = rng.integers(0, shape[0], size=shape[4]).astype(np.int32)
    want = core.gather_slots(pool, slots)
    np.testing.assert_array_equal(bits(core.gather_slots(relayout(pool, layout), slots)), want)
    np.testing.assert_array_equal(bits(core.gather_slots(pool, relayout(slots, layout))), want)
    slots64 = slots.astype(np.int64)
    np.testing.assert_array_equal(bits(core.gather_slots(pool, relayout(slots64, layout))), want)


# --------------------------------------------------------------------------- threads


def test_num_threads_roundtrip_and_results_independent_of_threads():
    default = core.get_num_threads()
    assert 1 <= default <= 64
    rng = np.random.default_rng(51)
    keys, scores = repr_inputs(rng, (32, 2, 8, 64, 32, 8), "f32", "f32")
    reprs, query, question = score_inputs(rng, (4096, 4, 32), "f32")
    try:
        core.set_num_threads(1)
        assert core.get_num_threads() == 1
        r1 = core.repr_compute(keys, scores, 8)
        i1, s1 = core.retrieval_select(reprs, query, question, 0.5, 50)
        core.set_num_threads(3)
        assert core.get_num_threads() == 3
        r3 = core.repr_compute(keys, scores, 8)
        i3, s3 = core.retrieval_select(reprs, query, question, 0.5, 50)
    finally:
        core.set_num_threads(0)
    assert core.get_num_threads() == default
    np.testing.assert_allclose(r3, r1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s3, s1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(i3, ref.retrieval_topk_ref(torch.from_numpy(s3), 50).numpy())


def test_calls_from_many_python_threads():
    # The GIL is released during core calls: concurrent calls must still be right.
    rng = np.random.default_rng(52)
    keys, scores = repr_inputs(rng, (8, 2, 4, 32, 16, 4), "bf16", "f16")
    want = core.repr_compute(keys, scores, 4)
    errors = []

    def work():
        try:
            for _ in range(20):
                np.testing.assert_array_equal(core.repr_compute(keys, scores, 4), want)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --------------------------------------------------------------------------- block store model


class StoreModel:
    """What qllm.h promises about a block store's tiers and LRU, in plain Python.

    Tracks per block its tier and its last use.  Victims are the device blocks
    with the oldest last use, ties toward the lower id, never one of the ids
    being fetched.  Slot numbers are not modelled (the header does not fix
    them); `Physical` checks that the moves are consistent instead.
    """

    def __init__(self, device_slots: int):
        self.cap = device_slots
        self.tier: list[str] = []
        self.last: list[int] = []
        self.clock = 0

    def _now(self) -> int:
        self.clock += 1
        return self.clock

    def on_device(self) -> list[int]:
        return [i for i, t in enumerate(self.tier) if t == "device"]

    def lru(self, exclude=()) -> list[int]:
        return sorted((i for i in self.on_device() if i not in exclude),
                      key=lambda i: (self.last[i], i))

    def append(self):
        victim = None
        if self.cap > 0 and len(self.on_device()) == self.cap:
            victim = self.lru()[0]
            self.tier[victim] = "host"
        self.tier.append("device" if self.cap > 0 else "host")
        self.last.append(self._now())
        return len(self.tier) - 1, victim

    def touch(self, ids):
        for i in ids:
            self.last[i] = self._now()

    def evict(self, i) -> bool:
        was = self.tier[i] == "device"
        self.tier[i] = "host"
        return was

    def fetch(self, ids) -> set[int]:
        want = list(dict.fromkeys(ids))
        assert len(want) <= self.cap
        missing = [i for i in want if self.tier[i] != "device"]
        n_victims = max(0, len(missing) - (self.cap - len(self.on_device())))
        victims = self.lru(exclude=set(want))[:n_victims]
        for v in victims:
            self.tier[v] = "host"
        for m in missing:
            self.tier[m] = "device"
        now = self._now()  # "all of ids count as used now": one common stamp
        for i in ids:
            self.last[i] = now
        return set(victims)


class Physical:
    """Replays move records on (tier, slot) cells; asserts they never clobber live data."""

    def __init__(self, device_slots: int):
        self.cap = device_slots
        self.loc: dict[int, tuple[str, int]] = {}
        self.cell: dict[tuple[str, int], int] = {}

    def apply(self, moves):
        for block, ft, fs, tt, ts in moves:
            assert tt in ("device", "host"), moves
            assert ts >= 0
            if tt == "device":
                assert ts < self.cap, moves
            if ft == "none":
                assert block not in self.loc, f"placement of existing block {block}: {moves}"
            else:
                assert ft in ("device", "host")
                assert self.loc.get(block) == (ft, fs), f"block {block} is not at {(ft, fs)}: {moves}"
            occupant = self.cell.get((tt, ts))
            assert occupant is None or occupant == block or self.loc.get(occupant) != (tt, ts), (
                f"move of block {block} to {(tt, ts)} clobbers live block {occupant}: {moves}")
            self.loc[block] = (tt, ts)
            self.cell[(tt, ts)] = block


def check_store(store, model: StoreModel, phys: Physical, data=None):
    n = len(model.tier)
    assert store.count == n == len(store)
    assert store.device_used == len(model.on_device())
    assert store.host_used == n - len(model.on_device())
    dev_slots, host_slots = set(), set()
    for i in range(n):
        tier, slot = store.lookup(i)
        assert tier == model.tier[i], f"block {i}: store says {tier}, model says {model.tier[i]}"
        assert (tier, slot) == phys.loc[i], f"block {i}: lookup {(tier, slot)} vs moves {phys.loc[i]}"
        (dev_slots if tier == "device" else host_slots).add(slot)
    assert len(dev_slots) == store.device_used and all(0 <= s < model.cap for s in dev_slots)
    assert len(host_slots) == store.host_used
    assert store.host_capacity >= store.host_used
    assert all(0 <= s < store.host_capacity for s in host_slots)
    if data is not None:
        dk, dv = store.device_k, store.device_v
        for i in range(n):
            tier, slot = store.lookup(i)
            if tier == "device":
                np.testing.assert_array_equal(bits(dk[slot]), data[0][i])
                np.testing.assert_array_equal(bits(dv[slot]), data[1][i])


def new_block(rng, store, dt):
    shape = (store.n_kv_heads, store.block_size, store.head_dim)
    return (storage(rng.standard_normal(shape), dt), storage(rng.standard_normal(shape), dt))


DT_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("device_slots", [0, 1, 3, 8])
@pytest.mark.parametrize("mode", ["data", "bookkeeping"])
@pytest.mark.parametrize("dt", DTYPES)
def test_block_store_random_ops_vs_model(seed, device_slots, mode, dt):
    rng = np.random.default_rng([seed, 61, device_slots])
    store_data = mode == "data"
    store = core.BlockStore(4, 2, 3, dtype=DT_NAMES[dt], device_slots=device_slots,
                            store_data=store_data)
    model, phys = StoreModel(device_slots), Physical(device_slots)
    data = ([], []) if store_data else None
    for step in range(150):
        op = rng.choice(["append", "append", "touch", "evict", "fetch", "gather", "lookup"])
        n = len(model.tier)
        if op == "append" or n == 0:
            if store_data:
                k, v = new_block(rng, store, dt)
                layout = ["contiguous", "strided", "negative", "byteswapped"][step % 4]
                bid, moves = store.append(relayout(k, layout), relayout(v, layout))
                data[0].append(k)
                data[1].append(v)
            else:
                bid, moves = store.append()
            want_id, victim = model.append()
            assert bid == want_id
            if victim is None:
                assert len(moves) == 1
            else:
                assert len(moves) == 2
                assert moves[0][:3] == (victim, "device", moves[1][4]), moves  # victim's slot reused
                assert moves[0][3] == "host"
            assert moves[-1][0] == bid and moves[-1][1] == "none"
            assert moves[-1][3] == ("device" if device_slots else "host")
            phys.apply(moves)
        elif op == "touch":
            ids = rng.integers(0, n, size=int(rng.integers(0, 4))).tolist()
            assert store.touch(ids) is None
            model.touch(ids)
        elif op == "evict":
            i = int(rng.integers(0, n))
            was_device = model.evict(i)
            moves = store.evict(i)
            if was_device:
                assert len(moves) == 1 and moves[0][:2] == (i, "device") and moves[0][3] == "host"
            else:
                assert moves == []
            phys.apply(moves)
        elif op == "fetch":
            if device_slots == 0:
                continue
            m = int(rng.integers(1, device_slots + 1))
            ids = rng.choice(n, size=min(m, n), replace=False).tolist()
            ids = ids + ids[: int(rng.integers(0, 2))]  # sometimes a duplicate
            victims = model.fetch(ids)
            moves = store.fetch(np.array(ids, np.int64))
            evicted = {mv[0] for mv in moves if mv[1] == "device" and mv[3] == "host"}
            assert evicted == victims, f"fetch {ids}: evicted {evicted}, LRU says {victims}"
            fetched = {mv[0] for mv in moves if mv[3] == "device"}
            assert fetched == {i for i in ids if phys.loc[i][0] == "host"}
            phys.apply(moves)
        elif op == "gather":
            ids = rng.integers(0, n, size=int(rng.integers(0, 5)))
            if store_data:
                gk, gv = store.gather(ids.astype(np.int32))
                bs = store.block_size
                assert gk.shape == (store.n_kv_heads, len(ids) * bs, store.head_dim)
                for j, i in enumerate(ids):
                    np.testing.assert_array_equal(bits(gk[:, j * bs:(j + 1) * bs]), data[0][i])
                    np.testing.assert_array_equal(bits(gv[:, j * bs:(j + 1) * bs]), data[1][i])
            else:
                with expect_error(ValueError, "bookkeeping"):
                    store.gather(ids)
        check_store(store, model, phys, data)


def test_block_store_lru_victims_explicit():
    store = core.BlockStore(2, 1, 2, device_slots=3, store_data=False)
    for want in range(3):
        bid, moves = store.append()
        assert bid == want and len(moves) == 1
    store.touch([0])  # LRU order now 1, 2, 0
    bid, moves = store.append()  # evicts 1
    assert bid == 3 and moves[0][0] == 1 and moves[0][1:4:2] == ("device", "host")
    assert store.lookup(1)[0] == "host"
    moves = store.fetch([1])  # 1 comes back, evicting 2 (oldest not being fetched)
    assert {m[0] for m in moves if m[3] == "host"} == {2}
    assert store.lookup(1)[0] == "device" and store.lookup(2)[0] == "host"
    # Fetching more distinct blocks than device slots fails and moves nothing.
    before = [store.lookup(i) for i in range(4)]
    with expect_error(ValueError):
        store.fetch([0, 1, 2, 3])
    assert [store.lookup(i) for i in range(4)] == before
    # Duplicates are fine.
    store.fetch([2, 2, 2])
    assert store.lookup(2)[0] == "device"
    assert store.evict(2)[0][:2] == (2, "device")
    assert store.evict(2) == []


def test_block_store_device_slots_zero_goes_to_host():
    store = core.BlockStore(3, 1, 2, dtype="float16", device_slots=0, store_data=True)
    k = np.arange(6, dtype=np.float16).reshape(1, 3, 2)
    bid, moves = store.append(k, -k)
    assert bid == 0 and len(moves) == 1
    assert moves[0][0] == 0 and moves[0][1] == "none" and moves[0][3] == "host"
    assert store.lookup(0) == ("host", moves[0][4])
    assert store.device_k.shape == (0, 1, 3, 2)
    gk, gv = store.gather([0])
    np.testing.assert_array_equal(gk, k)
    np.testing.assert_array_equal(gv, -k)
    with expect_error(ValueError):  # capacity: one distinct id, zero device slots
        store.fetch([0])


def test_block_store_data_mode_pools_and_clear():
    rng = np.random.default_rng(62)
    store = core.BlockStore(4, 2, 3, dtype="bfloat16", device_slots=2)
    assert store.store_data is True and store.dtype == "bfloat16"
    assert (store.block_size, store.n_kv_heads, store.head_dim, store.device_slots) == (4, 2, 3, 2)
    dk = store.device_k
    assert dk.dtype == np.uint16 and dk.shape == (2, 2, 4, 3) and dk.flags.c_contiguous
    assert not dk.flags.writeable
    with pytest.raises(ValueError):
        dk.setflags(write=True)
    with pytest.raises(ValueError):
        dk[0] = 1
    assert not store.device_v.flags.writeable
    blocks = [new_block(rng, store, "bf16") for _ in range(5)]
    for i, (k, v) in enumerate(blocks):
        assert store.append(k, v)[0] == i
    tier, slot = store.lookup(4)
    assert tier == "device"
    np.testing.assert_array_equal(store.device_k[slot], blocks[4][0])
    gk, gv = store.gather(np.arange(5))
    np.testing.assert_array_equal(gk, np.concatenate([b[0] for b in blocks], axis=1))
    np.testing.assert_array_equal(gv, np.concatenate([b[1] for b in blocks], axis=1))
    assert "BlockStore(" in repr(store) and "count=5" in repr(store)
    store.clear()
    assert (store.count, store.device_used, store.host_used, len(store)) == (0, 0, 0, 0)
    with expect_error(IndexError, "id"):
        store.lookup(0)
    assert store.append(*blocks[2])[0] == 0
    np.testing.assert_array_equal(store.gather([0])[0], blocks[2][0])
    # The pools outlive the store that wrote them.
    k_pool = store.device_k
    slot = store.lookup(0)[1]
    del store
    gc.collect()
    np.testing.assert_array_equal(k_pool[slot], blocks[2][0])


def test_block_store_bookkeeping_mode_has_no_pools():
    store = core.BlockStore(16, 8, 128, dtype="f16", device_slots=4, store_data=False)
    assert store.store_data is False and store.device_k is None and store.device_v is None
    assert store.dtype == "float16"
    for _ in range(6):
        store.append()
    assert store.device_used == 4 and store.host_used == 2 and store.host_capacity >= 2


def test_block_store_many_threads_serialised():
    store = core.BlockStore(8, 2, 16, device_slots=16)
    errors, ids = [], []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(50):
                k = rng.standard_normal((2, 8, 16)).astype(np.float32)
                bid, _ = store.append(k, k)
                ids.append(bid)
                store.fetch([bid])
                np.testing.assert_array_equal(store.gather([bid])[0], k)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(ids) == list(range(200)) and store.count == 200


def test_block_store_create_destroy_cycles_leak_nothing():
    def cycle(i):
        store = core.BlockStore(4, 2, 8, dtype=["float32", "float16", "bfloat16"][i % 3],
                                device_slots=2, store_data=bool(i % 2))
        for _ in range(4):
            if store.store_data:
                k = np.zeros((2, 4, 8), store.device_k.dtype)
                store.append(k, k)
            else:
                store.append()
        store.fetch([0, 1])
        repr(store)
        _ = store.device_k
        del store

    k = np.zeros((2, 4, 8), np.float32)
    rc_before = sys.getrefcount(k)
    store = core.BlockStore(4, 2, 8, device_slots=2)
    for _ in range(100):
        store.append(k, relayout(k, "negative"))
        gk, gv = store.gather([0])
        rcs = (sys.getrefcount(gk), sys.getrefcount(gv))  # outside assert: no rewrite temps
        assert rcs == (2, 2)  # the name and getrefcount's argument: nothing leaked
    rc_after = sys.getrefcount(k)
    assert rc_after == rc_before
    del store, gk, gv

    for i in range(50):  # warm up allocator caches
        cycle(i)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            cycle(i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes still allocated after 1000 store cycles"


def test_function_refcounts_unchanged():
    rng = np.random.default_rng(63)
    keys, scores = repr_inputs(rng, (2, 1, 2, 4, 3, 2), "f32", "f32")
    reprs, query, question = score_inputs(rng, (5, 2, 3), "f16")
    slots = np.array([0, 1], np.int32)
    objs = [keys, scores, reprs, query, question, slots]
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(200):
        core.repr_compute(keys, scores, 2)
        core.retrieval_select(reprs, query, question, 0.5, 3)
        core.retrieval_topk(core.retrieval_score(reprs, query, question, 0.5), 2)
        core.gather_slots(keys, slots)
        with pytest.raises(ValueError):
            core.repr_compute(keys, scores, 0)
        with pytest.raises(IndexError):
            core.gather_slots(keys, [5])
    after = [sys.getrefcount(o) for o in objs]
    assert after == before


# --------------------------------------------------------------------------- bad input


def good_repr():
    rng = np.random.default_rng(71)
    return repr_inputs(rng, (2, 2, 4, 5, 3, 2), "f32", "f32")


def good_score():
    rng = np.random.default_rng(72)
    return score_inputs(rng, (4, 2, 3), "f32")


@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0, "keys", torch.zeros(2, 2, 5, 3)], ids=repr)
def test_bad_type(bad):
    keys, scores = good_repr()
    reprs, query, question = good_score()
    with expect_error(TypeError, "keys"):
        core.repr_compute(bad, scores, 2)
    with expect_error(TypeError, "scores"):
        core.repr_compute(keys, bad, 2)
    with expect_error(TypeError, "reprs"):
        core.retrieval_score(bad, query)
    with expect_error(TypeError, "query"):
        core.retrieval_select(reprs, bad)
    with expect_error(TypeError, "scores"):
        core.retrieval_topk(bad, 1)
    with expect_error(TypeError, "pool"):
        core.gather_slots(bad, [0])
    if bad is not None:  # None is "no question"
        with expect_error(TypeError, "question"):
            core.retrieval_score(reprs, query, bad, 1.0)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int16, np.bool_, np.complex64, object,
                                   [("a", "f4")]], ids=str)
def test_bad_dtype(dtype):
    keys, scores = good_repr()
    reprs, query, question = good_score()
    with expect_error(TypeError, "keys"):
        core.repr_compute(np.zeros(keys.shape, dtype), scores, 2)
    with expect_error(TypeError, "scores"):
        core.repr_compute(keys, np.zeros(scores.shape, dtype), 2)
    with expect_error(TypeError, "question"):
        core.retrieval_select(reprs, query, np.zeros(question.shape, dtype))
    with expect_error(TypeError, "scores"):
        core.retrieval_topk(np.zeros(4, dtype), 1)
    with expect_error(TypeError, "pool"):
        core.gather_slots(np.zeros((2, 1, 1, 1), dtype), [0])


def test_bad_dtype_topk_needs_float32_and_slots_need_integers():
    with expect_error(TypeError, "scores"):
        core.retrieval_topk(np.zeros(4, np.float16), 1)
    with expect_error(TypeError, "scores"):
        core.retrieval_topk(np.zeros(4, np.uint16), 1)
    pool = np.zeros((3, 1, 1, 1), np.float32)
    for bad in ([0.0, 1.0], np.array([0.0]), np.array([True]), ["a"], [None], np.array([0], object)):
        with expect_error(TypeError, "slots"):
            core.gather_slots(pool, bad)
    with expect_error(TypeError, "slots"):
        core.gather_slots(pool, None)
    with expect_error(TypeError, "slots"):
        core.gather_slots(pool, 1)


def test_bad_rank():
    keys, scores = good_repr()
    reprs, query, question = good_score()
    for bad in (keys[0], keys[None], np.array(1.0, np.float32)):
        with expect_error(ValueError, "keys"):
            core.repr_compute(bad, scores, 2)
    with expect_error(ValueError, "scores"):
        core.repr_compute(keys, scores[0], 2)
    with expect_error(ValueError, "reprs"):
        core.retrieval_score(reprs[0], query)
    with expect_error(ValueError, "query"):
        core.retrieval_score(reprs, query[0])
    with expect_error(ValueError, "question"):
        core.retrieval_select(reprs, query, question[None])
    with expect_error(ValueError, "scores"):
        core.retrieval_topk(np.zeros((2, 2), np.float32), 1)
    with expect_error(ValueError, "scores"):
        core.retrieval_topk(np.array(1.0, np.float32), 1)  # 0-d
    with expect_error(ValueError, "pool"):
        core.gather_slots(keys[0], [0])
    with expect_error(ValueError, "slots"):
        core.gather_slots(keys, [[0]])
    with expect_error(ValueError, "slots"):
        core.gather_slots(keys, np.array(0, np.int32))  # 0-d


def test_mismatched_shapes():
    keys, scores = good_repr()
    reprs, query, question = good_score()
    with expect_error(ValueError, "scores"):  # block_len mismatch
        core.repr_compute(keys, scores[:, :, :4], 2)
    with expect_error(ValueError, "scores"):  # n_blocks mismatch
        core.repr_compute(keys, scores[:1], 2)
    with expect_error(ValueError, "scores"):  # n_q_heads not a multiple of n_kv_heads
        core.repr_compute(keys, scores[:, :3], 2)
    with expect_error(ValueError, "scores"):  # n_q_heads == 0
        core.repr_compute(keys, scores[:, :0], 2)
    with expect_error(ValueError, "keys"):  # empty memory has no representatives
        core.repr_compute(keys[:0], scores[:0], 2)
    with expect_error(ValueError, "keys"):
        core.repr_compute(keys[:, :0], scores, 2)
    with expect_error(ValueError, "query"):
        core.retrieval_score(reprs, query[:, :2])
    with expect_error(ValueError, "query"):
        core.retrieval_select(reprs, query[:1])
    with expect_error(ValueError, "question"):
        core.retrieval_score(reprs, query, question[:, :2], 1.0)


@pytest.mark.parametrize("bad_k", [0, -1, -(10**30)])
def test_k_not_positive(bad_k):
    keys, scores = good_repr()
    reprs, query, _ = good_score()
    with expect_error(ValueError, "repr_topk"):
        core.repr_compute(keys, scores, bad_k)
    with expect_error(ValueError, "k"):
        core.retrieval_topk(np.zeros(3, np.float32), bad_k)
    with expect_error(ValueError, "k"):
        core.retrieval_select(reprs, query, k=bad_k)


def test_k_wrong_type():
    keys, scores = good_repr()
    for bad in (2.0, "2", None, np.float32(2)):
        with expect_error(TypeError, "repr_topk"):
            core.repr_compute(keys, scores, bad)
        with expect_error(TypeError, "k"):
            core.retrieval_topk(np.zeros(3, np.float32), bad)
    # numpy integers are ints
    np.testing.assert_array_equal(core.retrieval_topk(np.arange(3, dtype=np.float32), np.int64(2)),
                                  [2, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_scores(bad):
    keys, scores = good_repr()
    scores = scores.copy()
    scores[1, 2, 3] = bad
    with expect_error(ValueError, "scores", nonfinite=True):
        core.repr_compute(keys, scores, 2)
    with expect_error(ValueError, "scores", nonfinite=True):
        core.repr_compute(keys, storage(scores, "f16"), 2)
    s = np.zeros(10, np.float32)
    s[7] = bad
    with expect_error(ValueError, "scores", nonfinite=True):
        core.retrieval_topk(s, 3)
    # A non-finite representative makes a non-finite score.
    reprs, query, question = good_score()
    reprs = reprs.copy()
    reprs[2, 1, 0] = bad
    with expect_error(ValueError, nonfinite=True):
        core.retrieval_score(reprs, query)
    with expect_error(ValueError, nonfinite=True):
        core.retrieval_select(reprs, query, question, 0.5, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_nonfinite_weight(bad):
    reprs, query, question = good_score()
    with expect_error(ValueError, "weight"):
        core.retrieval_score(reprs, query, question, bad)
    with expect_error(ValueError, "weight"):
        core.retrieval_select(reprs, query, question, bad)
    with expect_error(TypeError, "weight"):
        core.retrieval_score(reprs, query, question, "0.5")
    with expect_error(TypeError, "weight"):
        core.retrieval_score(reprs, query, question, None)


def test_bad_slots_and_ids():
    pool = np.zeros((3, 1, 2, 2), np.float32)
    for bad in ([3], [0, -1], np.array([0, 2**40]), np.array([2**64 - 1], np.uint64)):
        with expect_error(IndexError, "slots"):
            core.gather_slots(pool, bad)
    store = core.BlockStore(2, 1, 2, device_slots=2, store_data=False)
    store.append()
    store.append()
    for bad in (2, -1, 10**30):
        with expect_error(IndexError, "id"):
            store.lookup(bad)
        with expect_error(IndexError, "id"):
            store.evict(bad)
    for bad in ([0, 2], [-1], np.array([5], np.int64)):
        with expect_error(IndexError, "ids"):
            store.touch(bad)
        with expect_error(IndexError, "ids"):
            store.fetch(bad)
    for bad in (None, 0, "ids", [0.5]):
        with expect_error(TypeError, "ids"):
            store.touch(bad)
    with expect_error(TypeError, "id"):
        store.lookup(1.0)
    with expect_error(TypeError, "id"):
        store.lookup(None)


def test_store_mode_mismatch_and_bad_block_data():
    data = core.BlockStore(2, 1, 3, dtype="float16", device_slots=2)
    book = core.BlockStore(2, 1, 3, device_slots=2, store_data=False)
    k = np.zeros((1, 2, 3), np.float16)
    with expect_error(ValueError, "k"):
        data.append()
    with expect_error(ValueError, "v"):
        data.append(k)
    with expect_error(ValueError, "k"):
        book.append(k, k)
    with expect_error(ValueError, "bookkeeping"):
        book.gather([])
    with expect_error(TypeError, "k"):
        data.append(k.astype(np.float32), k)
    with expect_error(TypeError, "v"):
        data.append(k, k.view(np.uint16))  # bfloat16 bits for a float16 store
    with expect_error(TypeError, "k"):
        data.append([[[0.0] * 3] * 2], k)
    with expect_error(ValueError, "k"):
        data.append(k[:, :1], k)
    with expect_error(ValueError, "v"):
        data.append(k, k[0])
    assert data.count == 0 and book.count == 0  # failed appends add nothing


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(block_size=0), ValueError, "block_size"),
    (dict(n_kv_heads=-1), ValueError, "n_kv_heads"),
    (dict(head_dim=0), ValueError, "head_dim"),
    (dict(device_slots=-1), ValueError, "device_slots"),
    (dict(block_size=10**30), ValueError, "block_size"),
    (dict(block_size=2.0), TypeError, "block_size"),
    (dict(dtype="float64"), ValueError, "dtype"),
    (dict(dtype=np.float32), TypeError, "dtype"),
    (dict(device_slots=2**31), ValueError, "device_slots"),
])
def test_block_store_bad_params(kwargs, exc, name):
    args = dict(block_size=2, n_kv_heads=1, head_dim=2, device_slots=2)
    args.update(kwargs)
    with expect_error(exc, name):
        core.BlockStore(**args)


def test_block_store_huge_pool_is_memory_error():
    with pytest.raises(MemoryError):
        core.BlockStore(2**31 - 1, 2**31 - 1, 2**31 - 1, device_slots=2**31 - 1)


def test_huge_output_is_an_error_not_a_crash():
    # A zero-stride pool whose gathered output cannot exist.
    pool = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (1, 2**20, 2**20, 2**20))
    with pytest.raises((ValueError, MemoryError)):
        core.gather_slots(pool, [0])


def test_module_surface():
    names = {"repr_compute", "retrieval_score", "retrieval_topk", "retrieval_select",
             "gather_slots", "set_num_threads", "get_num_threads", "BlockStore"}
    assert names <= set(dir(core))
    for n in names:
        doc = getattr(core, n).__doc__
        assert doc and len(doc) > 40, n
    assert "bfloat16" in core.repr_compute.__doc__ and "uint16" in core.repr_compute.__doc__
    assert "int64" in core.gather_slots.__doc__
    for n in ("append", "lookup", "touch", "evict", "fetch", "gather", "clear"):
        assert getattr(core.BlockStore, n).__doc__, n
    import inspect

    assert str(inspect.signature(core.retrieval_select)) == (
        "(reprs, query, question=None, weight=0.0, k=8)")
    assert str(inspect.signature(core.BlockStore)) == (
        "(block_size, n_kv_heads, head_dim, dtype='float32', device_slots=1024, store_data=True)")
    with pytest.raises(TypeError):
        core.set_num_threads("4")
    with pytest.raises(ValueError):
        core.set_num_threads(2**40)


# --------------------------------------------------------------------------- fuzz: never crash

WEIRD = [
    None, True, 0, -1, 2**31, 10**30, 1.5, float("nan"), "x", b"x", [], [[1]], [1.5], (), {}, object(),
    np.float32(1.0), np.array(1.0, np.float32), np.zeros(0, np.float32), np.zeros(3, np.float32),
    np.zeros((0, 0, 0, 0), np.float32), np.zeros((2, 2, 2, 2), np.float64), np.zeros((2, 2), object),
    np.zeros((1, 1, 1, 1, 1, 1, 1, 1, 1, 1), np.float32), np.full((2, 1, 2), np.nan, np.float32),
    np.zeros(4, np.uint64) - 1, np.broadcast_to(np.zeros(1, np.float32), (2**20, 2**20, 2**20)),
    np.zeros((2, 2, 2), np.float16)[..., ::-1], torch.zeros(2, 2),
]
DOCUMENTED = (TypeError, ValueError, IndexError, MemoryError)


def _call_ok(fn, *args):
    try:
        fn(*args)
    except DOCUMENTED:
        pass  # SystemError (a C function returning NULL without an exception) etc. fail the test


def test_fuzz_functions_never_crash():
    rng = np.random.default_rng(81)
    keys, scores = repr_inputs(rng, (2, 1, 2, 3, 2, 2), "f32", "f32")
    reprs, query, question = score_inputs(rng, (3, 2, 2), "f32")
    pool = np.zeros((2, 1, 2, 2), np.float32)
    calls = [
        (core.repr_compute, [keys, scores, 2]),
        (core.retrieval_score, [reprs, query, question, 0.5]),
        (core.retrieval_topk, [np.zeros(3, np.float32), 2]),
        (core.retrieval_select, [reprs, query, question, 0.5, 2]),
        (core.gather_slots, [pool, [0, 1]]),
        (core.set_num_threads, [0]),
    ]
    for fn, good in calls:
        for pos in range(len(good)):
            for bad in WEIRD:
                args = list(good)
                args[pos] = bad
                _call_ok(fn, *args)
        _call_ok(fn)  # missing arguments
        _call_ok(fn, *good, 1)  # one too many
    core.set_num_threads(0)


def test_fuzz_block_store_never_crashes():
    for store_data in (True, False):
        for pos in range(6):
            for bad in WEIRD:
                args = [2, 1, 2, "float32", 2, store_data]
                args[pos] = bad
                _call_ok(core.BlockStore, *args)
        store = core.BlockStore(2, 1, 2, device_slots=2, store_data=store_data)
        k = np.zeros((1, 2, 2), np.float32)
        for _ in range(3):
            store.append(k, k) if store_data else store.append()
        for name in ("lookup", "touch", "evict", "fetch", "gather"):
            for bad in WEIRD:
                _call_ok(getattr(store, name), bad)
        for bad in WEIRD:
            _call_ok(store.append, bad, bad)
            _call_ok(store.append, k, bad)
        want = 3 if store_data else 4  # bookkeeping: append(None, None) is a real append
        assert store.count == want and len(store) == want
