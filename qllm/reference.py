"""Slow, obviously-correct references.

Everything here is plain PyTorch written for clarity, not speed: the tests hold
the C core, the torch ops, the CUDA kernels and the patched models against it.
Inputs of any float dtype are computed in float32.
"""

from __future__ import annotations

import torch

__all__ = [
    "repr_compute_ref",
    "retrieval_score_ref",
    "retrieval_topk_ref",
    "gather_slots_ref",
]


def _f32(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.to(torch.float32)


def _desc_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim by descending score, ties toward the lower index."""
    return torch.sort(-scores, dim=-1, stable=True).indices


def repr_compute_ref(keys, scores, repr_topk: int) -> torch.Tensor:
    """Representative keys.

    keys   [n_blocks, n_kv_heads, block_len, head_dim]
    scores [n_blocks, n_q_heads, block_len]
    returns [n_blocks, n_q_heads, head_dim] float32: per (block, query head) the
    mean key of the ``repr_topk`` highest-scoring tokens (ties: lower index);
    query head h reads KV head h // (n_q_heads // n_kv_heads).
    """
    keys, scores = _f32(keys), _f32(scores)
    nb, hkv, t, d = keys.shape
    hq = scores.shape[1]
    group = hq // hkv
    k = min(int(repr_topk), t)
    out = torch.empty(nb, hq, d, dtype=torch.float32)
    for b in range(nb):
        for h in range(hq):
            idx = _desc_order(scores[b, h])[:k]
            out[b, h] = keys[b, h // group, idx].sum(0) / k
    return out


def retrieval_score_ref(reprs, query, question=None, weight: float = 0.0) -> torch.Tensor:
    """s[b] = sum_h query[h].reprs[b,h] + weight * sum_h question[h].reprs[b,h]  -> [n_blocks] f32."""
    reprs, query = _f32(reprs), _f32(query)
    s = torch.einsum("bhd,hd->b", reprs, query)
    if question is not None:
        s = s + float(weight) * torch.einsum("bhd,hd->b", reprs, _f32(question))
    return s


def retrieval_topk_ref(scores, k: int) -> torch.Tensor:
    """Top-k block indices by descending score, ties toward the lower index (int64)."""
    scores = _f32(scores)
    return _desc_order(scores)[: min(int(k), scores.shape[0])]


def gather_slots_ref(pool, slots) -> torch.Tensor:
    """pool [n_slots, n_kv_heads, block_size, d], slots [n] -> [n_kv_heads, n*block_size, d]."""
    pool = torch.as_tensor(pool)
    slots = torch.as_tensor(slots).long()
    g = pool[slots]  # [n, hkv, bs, d]
    n, hkv, bs, d = g.shape
    return g.permute(1, 0, 2, 3).reshape(hkv, n * bs, d)
