"""Block retrieval (DESIGN §3 step 2) and the question (DESIGN §5).

Two forms of the question term:

* **representatives** (the paper's): ``s_b = sum_h qbar_h.r_bh + w * sum_h Q_h.r_bh``;
* **question heads** (``QLLMConfig.question_heads``): a few (layer, query head)
  pairs of the model -- its retrieval heads, found once per model by
  :mod:`qllm.heads` -- score every block against every question token:
  ``c_{b,(l,h)} = max_{t in question} max_{j in block b} Q_{t,h} . k_{j,h}``
  (fixed-position question queries, computed once when the block is cut).
  Layer ``l`` retrieves with ``s_b = z(sum_h qbar_h.r_bh)_b + w * mean_c z(c_c)_b``
  over the heads ``c`` of layers ``<= l`` -- and of the later layers while they
  have scored every candidate block (in a forward pass: until the pass cuts a
  block; so a decoded token uses every question head in every layer); ``z``
  standardises over the candidate blocks (mean 0, population std 1).  The query term keeps InfLLM's order
  (``z`` is monotone); the question term no longer hinges on the block's
  representatives, which are chosen by the text's own attention and rarely
  contain the few tokens a question is about.
"""

from __future__ import annotations

import torch

from .config import QLLMConfig

__all__ = ["select_blocks", "question_vector", "QuestionRelevance", "standardize"]

_EPS = 1e-6


def standardize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(x - mean) / std along ``dim`` (population std, floored at 1e-6)."""
    mean = x.mean(dim=dim, keepdim=True)
    std = (x - mean).square().mean(dim=dim, keepdim=True).sqrt().clamp_min(_EPS)
    return (x - mean) / std


class QuestionRelevance:
    """Per-block question scores of the question heads, shared by all layers of one sequence.

    heads      sorted (layer, query head) pairs; column ``c`` belongs to ``heads[c]``
    n_filled   per column, blocks scored so far
    """

    def __init__(self, heads, device: torch.device) -> None:
        self.heads = tuple(sorted((int(l), int(h)) for l, h in heads))
        self.device = torch.device(device)
        self.raw = torch.empty(16, len(self.heads), dtype=torch.float32, device=self.device)
        self.n_filled = [0] * len(self.heads)
        self._cols: dict[int, list[int]] = {}
        for c, (l, _) in enumerate(self.heads):
            self._cols.setdefault(l, []).append(c)

    def columns_of(self, layer: int) -> list[int]:
        return self._cols.get(layer, [])

    def columns_upto(self, layer: int) -> list[int]:
        return [c for c, (l, _) in enumerate(self.heads) if l <= layer]

    def columns_for(self, layer: int, n_blocks: int) -> list[int]:
        """The columns layer ``layer`` selects with among ``n_blocks`` blocks: its own heads and
        those of earlier layers, then the heads of later layers while they have scored every one
        of the blocks (a prefix of the columns, which are sorted by layer).  In a forward pass a
        later layer has scored the blocks that existed when the pass began, so its heads join
        until this pass cuts a block (rule 6c of qllm.reference)."""
        cols = self.columns_upto(layer)
        for c in range(len(cols), len(self.heads)):
            if self.n_filled[c] < n_blocks:
                break
            cols.append(c)
        return cols

    def record(self, layer: int, first_block: int, keys: torch.Tensor, q_question: torch.Tensor) -> None:
        """Score new blocks for this layer's heads.

        keys        [n_new, n_kv_heads, block_size, head_dim]: the blocks' un-rotated keys
        q_question  [n_q_heads, n_tokens, head_dim] f32: fixed-position question queries
        """
        cols = self.columns_of(layer)
        if not cols:
            return
        n_new, hkv = keys.shape[0], keys.shape[1]
        hq = q_question.shape[0]
        if hq % hkv:
            raise ValueError(f"QuestionRelevance: {hq} query heads, {hkv} kv heads")
        need = first_block + n_new
        if self.raw.shape[0] < need:
            grown = torch.empty(max(need, 2 * self.raw.shape[0]), len(self.heads), dtype=torch.float32,
                                device=self.device)
            grown[: self.raw.shape[0]].copy_(self.raw)
            self.raw = grown
        for c in cols:
            h = self.heads[c][1]
            if h >= hq:
                raise ValueError(f"QLLMConfig.question_heads: head {h} of layer {layer} does not exist "
                                 f"(the layer has {hq} query heads)")
            if self.n_filled[c] != first_block:
                raise RuntimeError(f"qllm: question head {self.heads[c]} scored {self.n_filled[c]} blocks, "
                                   f"expected {first_block}")
            kh = keys[:, h // (hq // hkv)].float()                      # [n_new, bs, d]
            dots = torch.matmul(kh, q_question[h].T)                     # [n_new, bs, n_tokens]
            self.raw[first_block:need, c] = dots.amax(dim=(1, 2)).to(self.device)
            self.n_filled[c] = need

    def score(self, layer: int, n_blocks: int) -> torch.Tensor | None:
        """mean over the heads of :meth:`columns_for` of z(c)[:n_blocks]; None if there are none."""
        cols = self.columns_for(layer, n_blocks)
        if not cols:
            return None
        for c in cols:
            if self.n_filled[c] < n_blocks:
                raise RuntimeError(f"qllm: question head {self.heads[c]} scored {self.n_filled[c]} blocks, "
                                   f"layer {layer} retrieves among {n_blocks}")
        return standardize(self.raw[:n_blocks, cols], dim=0).mean(dim=1)


def select_blocks(mem, query_mean: torch.Tensor) -> torch.Tensor | None:
    """Ids of the blocks the execution block attends to, in ascending block order.

    query_mean  [n_q_heads, head_dim] f32: mean fixed-position query of the block.
    Returns int32 [min(topk, n_blocks)] on the memory's device, or None when
    there is nothing to retrieve.
    """
    cfg = mem.config
    if not cfg.uses_blocks or mem.n_blocks == 0:
        return None
    rel = getattr(mem, "relevance", None)
    c = rel.score(mem.layer_idx, mem.n_blocks) if (rel is not None and cfg.uses_question) else None
    if c is None:
        question = mem.question if cfg.uses_question else None
        idx, _ = torch.ops.qllm.retrieval_select(
            mem.block_reprs(), query_mean, question, float(cfg.question_weight), cfg.topk)
    else:
        a = torch.ops.qllm.retrieval_score(mem.block_reprs(), query_mean, None, 0.0)
        s = standardize(a) + float(cfg.question_weight) * c
        idx = torch.ops.qllm.retrieval_topk(s.contiguous(), cfg.topk)
    return torch.sort(idx).values


def question_vector(q_fixed: torch.Tensor, token_scores: torch.Tensor, config: QLLMConfig) -> torch.Tensor:
    """Question vector per query head.

    q_fixed       [n_q_heads, n_tokens, head_dim]: fixed-position queries of the question
    token_scores  [n_q_heads, n_tokens] f32: attention mass each question token received
    returns       [n_q_heads, head_dim] f32: mean query of the ``repr_topk``
                  most-attended question tokens (per head; ties: earlier token).

    On CUDA nothing waits for the device (the question pass runs once per layer alongside the
    prompt, whose GPU queue a host sync would drain): non-finite scores, which only non-finite
    queries produce, raise no error there (NaN ranks lowest) -- as on the rest of the GPU path.
    On the CPU they raise ValueError.
    """
    hq, n, d = q_fixed.shape
    # Same selection as a block representative: "keys" are the queries, one group per head.
    out = torch.ops.qllm.repr_compute(q_fixed.reshape(1, hq, n, d).float(),
                                      token_scores.reshape(1, hq, n), config.repr_topk, host_check=False)
    return out[0]
