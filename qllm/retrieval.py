"""Block retrieval (DESIGN §3 step 2) and the question vector (DESIGN §5)."""

from __future__ import annotations

import torch

from .config import QLLMConfig
from .memory import LayerMemory

__all__ = ["select_blocks", "question_vector"]


def select_blocks(mem: LayerMemory, query_mean: torch.Tensor) -> torch.Tensor | None:
    """Ids of the blocks the execution block attends to, in ascending block order.

    query_mean  [n_q_heads, head_dim] f32: mean fixed-position query of the block.
    Returns int32 [min(topk, n_blocks)] on the memory's device, or None when
    there is nothing to retrieve.
    """
    cfg = mem.config
    if not cfg.uses_blocks or mem.n_blocks == 0:
        return None
    question = mem.question if cfg.uses_question else None
    idx, _ = torch.ops.qllm.retrieval_select(
        mem.block_reprs(), query_mean, question, float(cfg.question_weight), cfg.topk)
    return torch.sort(idx).values


def question_vector(q_fixed: torch.Tensor, token_scores: torch.Tensor, config: QLLMConfig) -> torch.Tensor:
    """Question vector per query head.

    q_fixed       [n_q_heads, n_tokens, head_dim]: fixed-position queries of the question
    token_scores  [n_q_heads, n_tokens] f32: attention mass each question token received
    returns       [n_q_heads, head_dim] f32: mean query of the ``repr_topk``
                  most-attended question tokens (per head; ties: earlier token).
    """
    hq, n, d = q_fixed.shape
    # Same selection as a block representative: "keys" are the queries, one group per head.
    out = torch.ops.qllm.repr_compute(q_fixed.reshape(1, hq, n, d).float(),
                                      token_scores.reshape(1, hq, n), config.repr_topk)
    return out[0]
