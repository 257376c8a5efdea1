"""Argument checks of the GPU path's ops (``qllm.attend_run``, ``qllm.attend_decode``) through
their Meta implementations: they run the same checks as the CUDA ones
(csrc/cuda/attend_checks.cuh), so every class of bad argument -- the tiered-memory ones
included -- is covered on a machine without a GPU.  A valid call returns; each bad one raises
ValueError / TypeError naming the argument and the expectation."""

from __future__ import annotations

import pytest
import torch

import qllm  # noqa: F401  (registers torch.ops.qllm)

ops = torch.ops.qllm
HQ, HKV, D, T = 4, 2, 64, 3
N_INIT, N_LOCAL, BS, TOPK = 16, 64, 16, 4
W, MISS, SLOTS, NB = 256, 6, 4, 32
CFG = [N_INIT, N_LOCAL, BS, TOPK, 16, 0]


def _m(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def run_args(tiered: bool = False):
    """Positional arguments of a valid attend_run call (meta tensors, CPU schedule)."""
    rows = N_INIT + W if tiered else 1024
    q = _m(HQ, T, D, dtype=torch.bfloat16)
    ks = _m(HKV, rows, D, dtype=torch.bfloat16)
    args = [q, ks, _m(HKV, rows, D, dtype=torch.bfloat16), _m(HQ, 256), _m(NB, HQ, D),
            _m(1, TOPK, dtype=torch.int32), _m(HQ, T, D, dtype=torch.bfloat16), _m(2048, D), _m(2048, D), None,
            torch.tensor([[0, T, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int64), 0.125, 1.0, list(CFG),
            None, None, []]
    if tiered:
        args += [_m(SLOTS, HKV, BS, D, dtype=torch.bfloat16), _m(SLOTS, HKV, BS, D, dtype=torch.bfloat16),
                 _m(4 + 2 * MISS + 2 * SLOTS + NB, dtype=torch.int32), _m(2, 1, dtype=torch.int64),
                 [W, 64, MISS, 0]]
    return args


def decode_args(tiered: bool = False):
    a = run_args(tiered)
    q, ks, vs, scores, reprs, ret, out, cos, sin = a[:9]
    base = [_m(HQ, 1, D, dtype=torch.bfloat16), _m(HKV, 1, D, dtype=torch.bfloat16),
            _m(HKV, 1, D, dtype=torch.bfloat16), ks, vs, scores, reprs, ret, _m(HQ, 1, D, dtype=torch.bfloat16),
            cos, sin, None, _m(9, dtype=torch.int64), 0.125, 1.0, list(CFG), [128, NB], None, []]
    if tiered:
        base += a[17:21] + [a[21][:3]]
    return base


@pytest.mark.parametrize("tiered", [False, True])
def test_valid_calls_pass(tiered):
    ops.attend_run(*run_args(tiered))
    ops.attend_decode(*decode_args(tiered))


def _with(args, i, value):
    a = list(args)
    a[i] = value
    return a


# (index into run_args(tiered=True), replacement, message)
TIER_BAD = [
    (21, [W, 64, MISS], r"tier_cfg: expected \[W, chunk_blocks, miss_cap, ring_lo\]"),
    (21, [W + 1, 64, MISS, 0], r"W must be a power of two"),
    (21, [W, 0, MISS, 0], r"chunk_blocks >= 1"),
    (21, [W, 64, 0, 0], r"miss_cap in 1\.\.65536"),
    (21, [W // 2, 64, MISS, 0], r"k_store: tiered mode expects n_init \+ W = 144 rows, got 272"),
    (21, [], r"given without tier_cfg"),
    (18, None, r"tier_cfg needs k_cache, v_cache, tier and host_tab"),
    (17, _m(SLOTS, HKV, BS, D, dtype=torch.float16), r"k_cache: expected q's dtype"),
    (17, _m(SLOTS, HKV, BS + 1, D, dtype=torch.bfloat16), r"k_cache: expected a contiguous \[slots, 2, 16, 64\]"),
    (18, _m(SLOTS + 1, HKV, BS, D, dtype=torch.bfloat16), r"v_cache: expected k_cache's shape"),
    (19, _m(10, dtype=torch.int32), r"tier: expected a contiguous int32 vector of 24 \+ >= 32 words"),
    (19, _m(4 + 2 * MISS + 2 * SLOTS + NB, dtype=torch.int64), r"tier: expected int32"),
    (20, _m(2, 0, dtype=torch.int64), r"host_tab: expected a contiguous \[2, chunks\] int64 tensor"),
    (20, _m(2, 1, dtype=torch.int32), r"host_tab: expected int64"),
]


@pytest.mark.parametrize("i,value,msg", TIER_BAD, ids=[m for _, _, m in TIER_BAD])
def test_attend_run_bad_tier_arguments(i, value, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        ops.attend_run(*_with(run_args(tiered=True), i, value))


def test_tiers_need_a_strategy_with_blocks():
    a = run_args(tiered=True)
    a[13] = CFG[:5] + [1]  # streaming
    with pytest.raises(ValueError, match="tiers need a strategy with blocks"):
        ops.attend_run(*a)


def test_attend_decode_cut_needs_blocks_and_no_tiers():
    """cut=True (the step ends with a block cut): a config with blocks, untiered."""
    ops.attend_decode(*decode_args(), cut=True)
    with pytest.raises(ValueError, match=r"attend_decode: cut: expected a config with blocks \(streaming 0\)"):
        ops.attend_decode(*_with(decode_args(), 15, CFG[:5] + [1]), cut=True)
    ops.attend_decode(*_with(decode_args(), 15, CFG[:5] + [1]))  # streaming without a cut is fine
    with pytest.raises(ValueError, match=r"attend_decode: cut: tiered memories cut blocks through attend_run"):
        ops.attend_decode(*decode_args(tiered=True), cut=True)


def test_attend_decode_tier_cfg_has_three_fields():
    a = decode_args(tiered=True)
    a[-1] = [W, 64, MISS, 0]
    with pytest.raises(ValueError, match=r"attend_decode: tier_cfg: expected \[W, chunk_blocks, miss_cap\]"):
        ops.attend_decode(*a)


RUN_BAD = [
    (0, _m(HQ, T, D), TypeError, r"q: expected dtype float16 or bfloat16"),
    (0, _m(HQ, T, 96, dtype=torch.bfloat16), ValueError, r"q: head_dim must be 64 or 128"),
    (1, _m(HKV, 1024, D, dtype=torch.float16), TypeError, r"k_store: expected q's dtype"),
    (3, _m(HQ, 100), ValueError, r"ring size 100 must be a power of two"),
    (4, _m(NB, HQ + 1, D), ValueError, r"reprs: expected a contiguous \[blocks, 4, 64\]"),
    (5, _m(1, TOPK, dtype=torch.int64), TypeError, r"retrieved: expected int32"),
    (10, torch.zeros(1, 9, dtype=torch.int64), ValueError, r"schedule: expected \[exec_blocks, 10\]"),
    (13, CFG[:5], ValueError, r"cfg: expected 6 values"),
]


@pytest.mark.parametrize("i,value,exc,msg", RUN_BAD, ids=[m for _, _, _, m in RUN_BAD])
def test_attend_run_bad_arguments(i, value, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.attend_run(*_with(run_args(), i, value))


def test_attend_decode_bad_arguments():
    a = decode_args()
    two = _with(_with(a, 0, _m(HQ, 2, D, dtype=torch.bfloat16)), 8, _m(HQ, 2, D, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"qllm\.attend_decode: expected one token"):
        ops.attend_decode(*two)
    with pytest.raises(TypeError, match=r"qllm\.attend_decode: q: expected dtype float16 or bfloat16"):
        ops.attend_decode(*_with(a, 0, _m(HQ, 1, D)))
    with pytest.raises(ValueError, match=r"dyn: expected a contiguous \[>= 9\]"):
        ops.attend_decode(*_with(a, 12, _m(8, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"limits: expected \[L_max, nb_max\]"):
        ops.attend_decode(*_with(a, 16, [128]))
