"""Per-layer context memory: init tokens, the recent tail, memory blocks and
their representatives (DESIGN §2, §3 step 6).

Token ``j`` (0-based position in the text) lives in exactly one place:

* the **tail** -- positions ``[tail_start, n_seen)``: the local window plus the
  remainder (tokens that left the window but do not fill a block yet);
* **init** -- positions ``[0, n_init)`` once the text is longer than
  ``n_init + n_local`` (before that they stay in the tail and are attended with
  ordinary positions, so short texts get exactly ordinary attention);
* a **block** -- ``block_size`` consecutive positions cut from the front of the
  remainder, with one representative key per query head.

Keys are stored without RoPE.  Token scores (attention mass received while in
the window) are kept per (query head, tail token) and feed representative
selection when a block is cut.
"""

from __future__ import annotations

import logging

import torch

from .config import QLLMConfig

log = logging.getLogger("qllm")

__all__ = ["LayerMemory"]


def _grow(buf: torch.Tensor | None, need: int, shape_tail: tuple, dtype, device) -> torch.Tensor:
    """Return a buffer with room for ``need`` rows along dim 0 (geometric growth)."""
    if buf is not None and buf.shape[0] >= need:
        return buf
    cap = max(need, 16, 2 * (buf.shape[0] if buf is not None else 0))
    new = torch.empty((cap, *shape_tail), dtype=dtype, device=device)
    if buf is not None and buf.shape[0] > 0:
        new[: buf.shape[0]].copy_(buf)
    return new


class LayerMemory:
    """State of one attention layer for one sequence.

    Parameters
    ----------
    config : QLLMConfig
    n_q_heads, n_kv_heads, head_dim : int
    dtype : torch.dtype
        Storage dtype of K/V (the model's).
    device : torch.device
    """

    def __init__(self, config: QLLMConfig, n_q_heads: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if n_q_heads % n_kv_heads != 0:
            raise ValueError(f"n_q_heads ({n_q_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.config = config
        self.n_q_heads, self.n_kv_heads, self.head_dim = n_q_heads, n_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.n_seen = 0
        self.tail_start = 0
        self.tail_k = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.tail_v = torch.empty_like(self.tail_k)
        self.tail_scores = torch.empty(n_q_heads, 0, dtype=torch.float32, device=device)
        self.init_k = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.init_v = torch.empty_like(self.init_k)
        self.init_done = False
        # memory blocks: pool [capacity, n_kv_heads, block_size, head_dim]; block id == pool row
        self.n_blocks = 0
        self.pool_k: torch.Tensor | None = None
        self.pool_v: torch.Tensor | None = None
        self.reprs: torch.Tensor | None = None  # [capacity, n_q_heads, head_dim] f32
        self.question: torch.Tensor | None = None  # [n_q_heads, head_dim] f32
        self.last_retrieved: torch.Tensor | None = None  # block ids of the last execution block

    # ------------------------------------------------------------------ views
    def block_reprs(self) -> torch.Tensor:
        """Representatives of all blocks: [n_blocks, n_q_heads, head_dim] f32."""
        if self.reprs is None:
            return torch.empty(0, self.n_q_heads, self.head_dim, dtype=torch.float32, device=self.device)
        return self.reprs[: self.n_blocks]

    def gather_blocks(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of blocks ``ids`` (int32, in the order given): each [n_kv_heads, len(ids)*block_size, head_dim]."""
        ops = torch.ops.qllm
        return (ops.gather_slots(self.pool_k[: self.n_blocks], ids),
                ops.gather_slots(self.pool_v[: self.n_blocks], ids))

    def nbytes(self) -> int:
        """Bytes held by this layer's state."""
        total = 0
        for t in (self.tail_k, self.tail_v, self.tail_scores, self.init_k, self.init_v,
                  self.pool_k, self.pool_v, self.reprs):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------ bookkeeping
    def extend(self, tail_k: torch.Tensor, tail_v: torch.Tensor, received: torch.Tensor) -> None:
        """Replace the tail by ``tail + new tokens`` and account token scores.

        tail_k, tail_v  [n_kv_heads, tail_len + E, head_dim] (storage dtype): the old tail followed
                        by the execution block's keys/values
        received        [n_q_heads, tail_len + E] f32: mass each of those tokens received
        """
        E = tail_k.shape[1] - self.tail_k.shape[1]
        self.tail_k, self.tail_v = tail_k, tail_v
        pad = torch.zeros(self.n_q_heads, E, dtype=torch.float32, device=self.device)
        self.tail_scores = torch.cat([self.tail_scores, pad], dim=1).add_(received)
        self.n_seen += E
        self._settle()

    def _drop_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v, s = self.tail_k[:, :n], self.tail_v[:, :n], self.tail_scores[:, :n]
        self.tail_k, self.tail_v = self.tail_k[:, n:], self.tail_v[:, n:]
        self.tail_scores = self.tail_scores[:, n:]
        self.tail_start += n
        return k, v, s

    def _settle(self) -> None:
        """Move tokens that left the window: to init, to blocks, or away (streaming)."""
        cfg = self.config
        if not self.init_done:
            if self.n_seen < cfg.n_init + cfg.n_local:
                return  # short text so far: everything stays in the tail (ordinary attention)
            k, v, _ = self._drop_front(cfg.n_init)
            self.init_k, self.init_v = k.contiguous(), v.contiguous()
            self.init_done = True
        out_of_window = self.n_seen - cfg.n_local - self.tail_start
        if out_of_window <= 0:
            return
        if not cfg.uses_blocks:
            self._drop_front(out_of_window)  # streaming: forget them
            return
        n_new = out_of_window // cfg.block_size
        if n_new == 0:
            return
        k, v, s = self._drop_front(n_new * cfg.block_size)
        self._cut_blocks(k, v, s, n_new)

    def _cut_blocks(self, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, n_new: int) -> None:
        """Store ``n_new`` blocks (tail-major [H, n_new*bs, D]) and their representatives."""
        bs, hkv, hq, d = self.config.block_size, self.n_kv_heads, self.n_q_heads, self.head_dim
        kb = k.reshape(hkv, n_new, bs, d).transpose(0, 1)  # [n_new, hkv, bs, d] (view)
        vb = v.reshape(hkv, n_new, bs, d).transpose(0, 1)
        sb = s.reshape(hq, n_new, bs).transpose(0, 1)      # [n_new, hq, bs]
        need = self.n_blocks + n_new
        self.pool_k = _grow(self.pool_k, need, (hkv, bs, d), self.dtype, self.device)
        self.pool_v = _grow(self.pool_v, need, (hkv, bs, d), self.dtype, self.device)
        self.reprs = _grow(self.reprs, need, (hq, d), torch.float32, self.device)
        rows = slice(self.n_blocks, need)
        self.pool_k[rows].copy_(kb)
        self.pool_v[rows].copy_(vb)
        torch.ops.qllm.repr_compute_out(kb, sb, self.config.repr_topk, self.reprs[rows])
        self.n_blocks = need
