"""Host-side helpers of qllm/gpu.py that run on any device (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from qllm.gpu import _as_words, _copy_rows, _same_view


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


@pytest.mark.parametrize("rows", [1, 20], ids=["plain-copy", "words"])
def test_copy_rows_keeps_nan_payloads(rows):
    """Both copies move bits: NaN payloads and -0.0 survive (one row: the plain copy of a decode
    token; 20 rows: the word copy)."""
    bits = torch.tensor([0x7FC1, 0xFFC3, 0x8000, 0x7F80] * (8 * rows), dtype=torch.int32).to(torch.int16)
    src = bits.view(torch.bfloat16).view(rows, 2, 16).transpose(0, 1)  # [2, rows, 16]
    dst = torch.zeros(2, rows + 2, 16, dtype=torch.bfloat16)
    _copy_rows(dst[:, 1:rows + 1], src)
    assert torch.equal(dst[:, 1:rows + 1].contiguous().view(torch.int16), src.contiguous().view(torch.int16))


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


def test_graph_decoder_arguments_and_cpu_fallback():
    """GraphDecoder checks its arguments (a bool cut_graph, max_new_tokens >= 0, a patched model
    and its cache) and, where graphs cannot apply (a CPU model), decodes every token through the
    eager forward with the reason kept: the same logits as the model's own decode step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qllm
    from qllm.gpu import GraphDecoder

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=64, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    qcfg = qllm.QLLMConfig(n_init=4, n_local=16, block_size=4, topk=2, repr_topk=2, exc_block_size=8)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    with qllm.patched(model, qcfg):
        kw = model._qllm.cache_kw
        caches = [qllm.QLLMCache(model._qllm) for _ in range(2)]
        with torch.no_grad():
            logits = [model(ids, **{kw: c}, use_cache=True).logits for c in caches]
        cache, ref = caches
        with pytest.raises(ValueError, match=r"GraphDecoder: cut_graph: expected a bool, got 1"):
            GraphDecoder(model, cache, 4, cut_graph=1)
        with pytest.raises(ValueError, match=r"GraphDecoder: max_new_tokens: expected an int >= 0"):
            GraphDecoder(model, cache, -1)
        with pytest.raises(ValueError, match=r"GraphDecoder: cache: expected the QLLMCache of this patched model"):
            GraphDecoder(model, object(), 4)
        dec = GraphDecoder(model, cache, 4, cut_graph=True)
        assert not dec.enabled and dec.reason and dec.cut_graph is None and dec.graph is None
        tok = logits[0][:, -1:].argmax(-1)
        for _ in range(3):
            got = dec.step(tok)
            with torch.no_grad():
                want = model(tok, **{kw: ref}, use_cache=True).logits
            assert torch.equal(got, want)
            tok = want[:, -1:].argmax(-1)
        assert dec.n_eager == 3 and dec.n_replays == 0 and dec.n_captures == 0


def test_same_view_only_for_the_same_elements():
    """_write_kv skips the copy only when K/V are exactly the store rows (kv_slots' views)."""
    store = torch.zeros(2, 64, 8, dtype=torch.bfloat16)
    slot = store[:, 10:30]
    assert _same_view(slot, store[:, 10:30])
    assert not _same_view(store[:, 11:31], slot)           # other rows
    assert not _same_view(store[:, 10:29], slot)           # other length
    assert not _same_view(slot.clone(), slot)              # same values, other memory
    assert not _same_view(slot.view(torch.float16), slot)  # other dtype
    strided = torch.as_strided(store, (2, 20, 8), (8, 16, 1), storage_offset=80)  # slot's start, other strides
    assert strided.data_ptr() == slot.data_ptr() and not _same_view(strided, slot)



def test_kv_slots_checks_n_tokens_before_anything():
    """kv_slots names the argument and the expectation (checked before the memory is touched)."""
    from qllm.gpu import CudaLayerMemory

    mem = object.__new__(CudaLayerMemory)  # no CUDA here: nothing of the memory is read before the check
    for bad in (0, -3, 2.5, True, "4", None):
        with pytest.raises(ValueError, match=r"kv_slots: n_tokens: expected an int >= 1, got"):
            mem.kv_slots(bad)
