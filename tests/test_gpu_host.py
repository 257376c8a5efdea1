"""Host-side helpers of qllm/gpu.py that run on any device (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from qllm.gpu import _as_words, _copy_rows


def _projected(T: int, H: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """[H, T, D] view of a [T, H*D] projection output, as a model hands K/V over."""
    g = torch.Generator().manual_seed(T * 31 + H * 7 + D)
    return torch.randn(T, H * D, generator=g).to(dtype).view(T, H, D).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [4, 64, 128])
def test_copy_rows_moves_words_and_equals_copy(dtype, D):
    src = _projected(37, 3, D, dtype)
    dst = torch.full((3, 100, D), 7.0, dtype=dtype)
    want = dst.clone()
    want[:, 11:48].copy_(src)
    assert _as_words(dst[:, 11:48]) is not None and _as_words(src) is not None
    _copy_rows(dst[:, 11:48], src)
    assert torch.equal(dst, want)


def test_copy_rows_keeps_nan_payloads():
    """A word copy moves bits: NaN payloads and -0.0 survive."""
    bits = torch.tensor([0x7FC1, 0xFFC3, 0x8000, 0x7F80] * 8, dtype=torch.int32).to(torch.int16)
    src = bits.view(torch.bfloat16).view(1, 2, 16).transpose(0, 1)  # [2, 1, 16]
    dst = torch.zeros(2, 3, 16, dtype=torch.bfloat16)
    _copy_rows(dst[:, 1:2], src)
    assert torch.equal(dst[:, 1:2].contiguous().view(torch.int16), src.contiguous().view(torch.int16))


def test_copy_rows_falls_back_when_rows_are_not_words():
    """Rows of 6 bytes, a strided last dim, or a dtype change: the plain copy, same values."""
    src = _projected(9, 2, 3, torch.bfloat16)
    assert _as_words(src) is None
    dst = torch.zeros(2, 9, 3, dtype=torch.bfloat16)
    _copy_rows(dst, src)
    assert torch.equal(dst, src)
    wide = _projected(9, 2, 8, torch.bfloat16)[..., ::2]
    assert _as_words(wide) is None
    dst4 = torch.zeros(2, 9, 4, dtype=torch.bfloat16)
    _copy_rows(dst4, wide)
    assert torch.equal(dst4, wide)
    f32 = torch.zeros(2, 9, 8, dtype=torch.float32)
    _copy_rows(f32, _projected(9, 2, 8, torch.bfloat16))
    assert torch.equal(f32, _projected(9, 2, 8, torch.bfloat16).float())
