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

Block K/V tiers (``QLLMConfig.device_blocks``):

* ``None``: every block in one pool on the compute device, ``pool_k[id]``;
* ``N``: at most ``N`` blocks in the compute-device pool (``pool_k[slot]``,
  ``N`` slots at most), the others in a host tier (``host_k[slot]``: CPU
  tensors, pinned when the device is CUDA).  A ``qllm._core.BlockStore`` in
  bookkeeping mode decides the slots: a new block goes to the device, evicting
  the least recently used block to the host when the pool is full; retrieved
  blocks (:meth:`LayerMemory.gather_blocks`) are fetched back the same way and
  count as used.  This module executes the moves the store reports with torch
  copies (``non_blocking`` from pinned memory on CUDA, on the current stream).
  Representatives and retrieval never leave the device, so the budget changes
  where blocks live, never which blocks are retrieved or the output.

The CUDA fast path has its own tiered memory with the same contract
(qllm/gpu.py: ring store, device block cache decided on the device, pinned
host tier written on a side stream).
"""

from __future__ import annotations

import logging

import torch

from ._ext import _core
from ._log import log_once
from .config import QLLMConfig


# Bookkeeping mode never touches block data: the store's dtype only has to be one it accepts.
_STORE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

__all__ = ["LayerMemory"]


def _grow(buf: torch.Tensor | None, need: int, shape_tail: tuple, dtype, device,
          limit: int | None = None, pin: bool = False) -> torch.Tensor:
    """Return a buffer with room for ``need`` rows along dim 0 (geometric growth, at most
    ``limit`` rows when given; ``pin``: page-locked CPU memory)."""
    if buf is not None and buf.shape[0] >= need:
        return buf
    cap = max(need, 16, 2 * (buf.shape[0] if buf is not None else 0))
    if limit is not None:
        cap = max(need, min(cap, limit))
    if pin:
        new = torch.empty((cap, *shape_tail), dtype=dtype, pin_memory=True)
    else:
        new = torch.empty((cap, *shape_tail), dtype=dtype, device=device)
    if buf is not None and buf.shape[0] > 0:
        new[: buf.shape[0]].copy_(buf)
    return new


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LayerMemory:
    """State of one attention layer for one sequence.

    Parameters
    ----------
    config : QLLMConfig
        ``config.device_blocks`` sets the compute-device block budget (module docstring).
    n_q_heads, n_kv_heads, head_dim : int
    dtype : torch.dtype
        Storage dtype of K/V (the model's).
    device : torch.device
        The compute device (where everything but the host tier lives).

    Block counters (:meth:`tier_stats` has them all): ``n_device_blocks``,
    ``n_host_blocks`` (blocks in each tier now), ``n_fetched`` (blocks copied
    host -> device because they were retrieved), ``n_evicted`` (blocks copied
    device -> host as least recently used).  Without a budget every block is on
    the device and both move counters stay 0.
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
        # Memory blocks, K/V [rows, n_kv_heads, block_size, head_dim] (module docstring):
        #   no budget: pool_k/pool_v on the device, row == block id;
        #   budget N:  pool_k/pool_v = device tier (<= N rows, row == device slot),
        #              host_k/host_v = host tier (row == host slot); self.store assigns the slots.
        self.n_blocks = 0
        self.pool_k: torch.Tensor | None = None
        self.pool_v: torch.Tensor | None = None
        self.host_k: torch.Tensor | None = None
        self.host_v: torch.Tensor | None = None
        self.store = None  # qllm._core.BlockStore (bookkeeping mode) when a budget is set
        self.n_fetched = 0
        self.n_evicted = 0
        self._where: list[tuple[str, int]] = []  # per block id: (tier, slot), from the moves executed
        self._pin = self._non_blocking = False
        if config.device_blocks is not None and config.uses_blocks:
            self.store = _core.BlockStore(config.block_size, n_kv_heads, head_dim,
                                          dtype=_STORE_DTYPES.get(dtype, "float32"),
                                          device_slots=config.device_blocks, store_data=False)
            # CUDA: host tier in pinned memory, copies non_blocking on the current stream.
            self._pin = self._non_blocking = torch.device(device).type == "cuda"
        self.reprs: torch.Tensor | None = None  # [capacity, n_q_heads, head_dim] f32
        self.question: torch.Tensor | None = None  # [n_q_heads, head_dim] f32
        # question heads (qllm.retrieval.QuestionRelevance): set by the cache
        self.layer_idx = 0
        self.relevance = None
        self.question_tokens: torch.Tensor | None = None  # [n_q_heads, n_tokens, head_dim] f32, fixed-position
        self.last_retrieved: torch.Tensor | None = None  # block ids of the last execution block

    # ------------------------------------------------------------------ views
    def block_reprs(self) -> torch.Tensor:
        """Representatives of all blocks: [n_blocks, n_q_heads, head_dim] f32."""
        if self.reprs is None:
            return torch.empty(0, self.n_q_heads, self.head_dim, dtype=torch.float32, device=self.device)
        return self.reprs[: self.n_blocks]

    def gather_blocks(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of blocks ``ids`` (int32, in the order given): each [n_kv_heads, len(ids)*block_size, head_dim].

        With a device budget this is the *use* of the blocks (the attention calls it once per
        execution block with the retrieved ids): blocks in the host tier are fetched into device
        slots first, evicting the least recently used others, and all of ``ids`` count as used now.
        The ids are read on the host then (a device sync on CUDA).
        """
        ops = torch.ops.qllm
        if self.store is None:
            return (ops.gather_slots(self.pool_k[: self.n_blocks], ids),
                    ops.gather_slots(self.pool_v[: self.n_blocks], ids))
        slots = self._fetch(ids.reshape(-1).tolist())
        return ops.gather_slots(self.pool_k, slots), ops.gather_slots(self.pool_v, slots)

    def block_keys(self, ids=None) -> torch.Tensor:
        """Keys (un-rotated) of blocks ``ids`` from whichever tier, in the order given.

        ids  sequence / 1-D tensor of block ids, default all blocks ``0 .. n_blocks-1``.
        Returns [len(ids), n_kv_heads, block_size, head_dim] on the compute device (without a
        budget and ``ids=None``: a view of the pool, do not modify it).  Changes no LRU state.
        """
        return self._block_data(ids, 0)

    def block_values(self, ids=None) -> torch.Tensor:
        """Values of blocks ``ids``: as :meth:`block_keys`."""
        return self._block_data(ids, 1)

    def block_location(self, block: int) -> tuple[str, int]:
        """Where block ``block``'s K/V live: ("device", pool row) or ("host", host_k row)."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block: expected a block id in [0, {self.n_blocks}), got {block}")
        return ("device", block) if self.store is None else self._where[block]

    @property
    def n_device_blocks(self) -> int:
        """Blocks whose K/V are in the compute-device pool."""
        return self.n_blocks if self.store is None else self.store.device_used

    @property
    def n_host_blocks(self) -> int:
        """Blocks whose K/V are in the host tier."""
        return 0 if self.store is None else self.store.host_used

    def device_nbytes(self) -> int:
        """Bytes on the compute device: tail, init, block pool (allocated rows), representatives."""
        return _nbytes(self.tail_k, self.tail_v, self.tail_scores, self.init_k, self.init_v,
                       self.pool_k, self.pool_v, self.reprs)

    def host_nbytes(self) -> int:
        """Bytes of the host tier (allocated rows; 0 without a budget)."""
        return _nbytes(self.host_k, self.host_v)

    def nbytes(self) -> int:
        """Bytes held by this layer's state: ``device_nbytes() + host_nbytes()``."""
        return self.device_nbytes() + self.host_nbytes()

    def tier_stats(self) -> dict:
        """Budget, block placement, moves and bytes of this layer.

        Keys: ``budget`` (``config.device_blocks``), ``blocks``, ``on_device``, ``on_host``,
        ``fetches`` (host -> device copies), ``evictions`` (device -> host copies),
        ``device_bytes``, ``host_bytes``.
        """
        return {"budget": self.config.device_blocks, "blocks": self.n_blocks,
                "on_device": self.n_device_blocks, "on_host": self.n_host_blocks,
                "fetches": self.n_fetched, "evictions": self.n_evicted,
                "device_bytes": self.device_nbytes(), "host_bytes": self.host_nbytes()}

    def _block_data(self, ids, kv: int) -> torch.Tensor:
        pool = self.pool_k if kv == 0 else self.pool_v
        if ids is None:
            if self.store is None and pool is not None:
                return pool[: self.n_blocks]
            ids = list(range(self.n_blocks))
        else:
            t = torch.as_tensor(ids)
            if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
                raise TypeError(f"ids: expected integer block ids, got dtype {t.dtype}")
            ids = [int(i) for i in t.reshape(-1).tolist()]
            bad = [i for i in ids if not 0 <= i < self.n_blocks]
            if bad:
                raise IndexError(f"ids: expected block ids in [0, {self.n_blocks}), got {bad[0]!r}")
        shape = (len(ids), self.n_kv_heads, self.config.block_size, self.head_dim)
        if self.store is None:
            if not ids:
                return torch.empty(shape, dtype=self.dtype, device=self.device)
            return pool[torch.tensor(ids, dtype=torch.long, device=self.device)]
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        dev = [(j, s) for j, i in enumerate(ids) for t, s in [self._where[i]] if t == "device"]
        host = [(j, s) for j, i in enumerate(ids) for t, s in [self._where[i]] if t == "host"]
        if dev:
            pos, slots = (torch.tensor(c, dtype=torch.long, device=self.device) for c in zip(*dev))
            out[pos] = pool[slots]
        if host:
            if self._non_blocking:
                torch.cuda.current_stream(self.device).synchronize()  # pending copies into the host tier
            hpool = self.host_k if kv == 0 else self.host_v
            pos, slots = (torch.tensor(c, dtype=torch.long) for c in zip(*host))
            out[pos.to(self.device)] = hpool[slots].to(self.device)
        return out

    # ------------------------------------------------------------ tiers
    def _fetch(self, ids: list[int]) -> torch.Tensor:
        """Make blocks ``ids`` resident (LRU, all count as used now); their device slots, int32."""
        self._run_moves(self.store.fetch(ids))
        slots = []
        for i in ids:
            tier, slot = self._where[i]
            if tier != "device":
                raise RuntimeError(f"qllm: block {i} is in the {tier} tier after a fetch (block store bug)")
            slots.append(slot)
        return torch.tensor(slots, dtype=torch.int32, device=self.device)

    def _reserve_device(self, rows: int) -> None:
        tail = (self.n_kv_heads, self.config.block_size, self.head_dim)
        limit = self.config.device_blocks
        self.pool_k = _grow(self.pool_k, rows, tail, self.dtype, self.device, limit=limit)
        self.pool_v = _grow(self.pool_v, rows, tail, self.dtype, self.device, limit=limit)

    def _reserve_host(self, rows: int) -> None:
        if self.host_k is not None and self.host_k.shape[0] >= rows:
            return
        if self.host_k is not None and self._non_blocking:
            torch.cuda.current_stream(self.device).synchronize()  # pending copies into the old host tier
        tail = (self.n_kv_heads, self.config.block_size, self.head_dim)
        try:
            k = _grow(self.host_k, rows, tail, self.dtype, "cpu", pin=self._pin)
            v = _grow(self.host_v, rows, tail, self.dtype, "cpu", pin=self._pin)
        except RuntimeError as exc:
            if not self._pin:
                raise
            log_once(logging.WARNING, f"qllm: pinned host memory is not available ({exc}): the host tier of "
                     "the block memory (QLLMConfig.device_blocks) uses pageable memory and blocking copies")
            self._pin = self._non_blocking = False
            k = _grow(self.host_k, rows, tail, self.dtype, "cpu")
            v = _grow(self.host_v, rows, tail, self.dtype, "cpu")
        self.host_k, self.host_v = k, v

    def _run_moves(self, moves, new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                   first: int = 0) -> None:
        """Execute the block store's moves, in order: (block, from_tier, from_slot, to_tier, to_slot).

        from_tier "none" places new block ``block`` from ``new_k/new_v[block - first]``.
        """
        nb = self._non_blocking
        for block, src_tier, src_slot, dst_tier, dst_slot in moves:
            if dst_tier == "device":
                self._reserve_device(dst_slot + 1)
                dk, dv = self.pool_k[dst_slot], self.pool_v[dst_slot]
            else:
                self._reserve_host(dst_slot + 1)
                dk, dv = self.host_k[dst_slot], self.host_v[dst_slot]
            if src_tier == "none":
                if block != len(self._where) or new_k is None:
                    raise RuntimeError(f"qllm: block store placed block {block}, expected {len(self._where)}")
                sk, sv = new_k[block - first], new_v[block - first]
                self._where.append((dst_tier, dst_slot))
            elif src_tier == "device":
                sk, sv = self.pool_k[src_slot], self.pool_v[src_slot]
                self.n_evicted += 1
            else:
                sk, sv = self.host_k[src_slot], self.host_v[src_slot]
                self.n_fetched += 1
            dk.copy_(sk, non_blocking=nb)
            dv.copy_(sv, non_blocking=nb)
            self._where[block] = (dst_tier, dst_slot)

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
        self.reprs = _grow(self.reprs, need, (hq, d), torch.float32, self.device)
        rows = slice(self.n_blocks, need)
        if self.store is None:
            self.pool_k = _grow(self.pool_k, need, (hkv, bs, d), self.dtype, self.device)
            self.pool_v = _grow(self.pool_v, need, (hkv, bs, d), self.dtype, self.device)
            self.pool_k[rows].copy_(kb)
            self.pool_v[rows].copy_(vb)
        else:
            for i in range(n_new):  # each new block goes to the device, evicting the LRU one when full
                bid, moves = self.store.append()
                if bid != self.n_blocks + i:
                    raise RuntimeError(f"qllm: block store gave id {bid} to block {self.n_blocks + i}")
                self._run_moves(moves, kb, vb, first=self.n_blocks)
        torch.ops.qllm.repr_compute_out(kb, sb, self.config.repr_topk, self.reprs[rows])
        if self.relevance is not None and self.question_tokens is not None:
            self.relevance.record(self.layer_idx, self.n_blocks, kb, self.question_tokens)
        self.n_blocks = need
