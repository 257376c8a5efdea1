"""The GPU path: a layer memory kept in preallocated device buffers and an
``attend`` that runs one forward call per layer as one op call
(``torch.ops.qllm.attend_run``; kernels in csrc/cuda/attend.cu).

Same semantics as :func:`qllm.attention.attend` on :class:`qllm.memory.LayerMemory`
(DESIGN §3, §4); only the state layout differs:

* ``k_store`` / ``v_store`` [n_kv_heads, capacity, head_dim]: every token's
  un-rotated K/V at its text position.  Init = positions ``[0, n_init)``,
  block ``b`` = positions ``n_init + b*block_size ...``, the tail = positions
  ``[tail_start, n_seen)`` -- so nothing is ever copied between init, tail and
  blocks;
* ``scores`` [n_q_heads, R]: token scores of the tail in a ring (slot = position
  mod R, R a power of two >= the longest recent segment);
* ``reprs`` [block capacity, n_q_heads, head_dim] f32 representatives.

All sizes that steer the execution-block loop (tail length, blocks cut, how
many are retrieved) follow from token counts, so they are computed here on
the host (:meth:`CudaLayerMemory._schedule`, the same bookkeeping as
``LayerMemory.append``) and handed to the op as a CPU schedule: the loop never
waits for the device.  Only the retrieved block ids are device data; the
attention kernel reads the blocks through them.

Question heads (:class:`qllm.retrieval.QuestionRelevance`, set by the cache as
``mem.relevance`` with ``mem.layer_idx`` and ``mem.question_tokens``): the op
writes this layer's raw block scores into ``relevance.raw`` (a device matrix
shared by the layers, grown here from block counts) when blocks are cut, and
selects with ``z(qbar . r) + w * mean z(raw)`` over the heads of layers <= this
one and of later layers while they have scored every candidate
(``QuestionRelevance.columns_for``; a call that cuts blocks runs as two op
calls, before and after its first cut), all on the device; the host only
advances ``relevance.n_filled``.

Tiered block memory (``QLLMConfig.device_blocks = N``, strategies with
blocks, ``block_size`` a power of two): the store keeps the init rows and a
ring of ``W`` rows (a power of two >= the longest tail plus one forward
call's tokens, ``chunk_size`` for the patched model), so its size no longer
grows with the text.  Block K/V live in

* a device cache of ``N`` slots, ``k_cache`` [N, n_kv_heads, block_size,
  head_dim]: cut blocks enter it, retrieved blocks missing from it are copied
  in before the attention reads them, the least recently used block leaves --
  all decided on the device (``tier`` state, ``qllm_cuda_tier_touch``), so the
  execution-block loop still never waits for the host;
* a host tier of pinned chunks (``_CHUNK_BLOCKS`` blocks each) holding every
  cut block: after each call the blocks it cut are copied from the ring to
  their chunk on a side stream (overlapping the next work); the current
  stream waits for those copies only before it overwrites ring rows.

Retrieval and the attention's inputs do not depend on the budget: outputs
are bitwise those of the untiered memory.

Supported: CUDA tensors of dtype float16 / bfloat16, head_dim 64 or 128
(:meth:`CudaLayerMemory.supports`); anything else uses the generic path.
"""

from __future__ import annotations

import inspect
import logging
import math
import time

import torch

from .attention import RopeTable
from ._log import log_once
from .config import QLLMConfig

__all__ = ["CudaLayerMemory", "CudaDecodeStep", "GraphDecoder", "attend_cuda", "auto_device_blocks",
           "graph_unsupported", "supports", "tiers_unsupported"]

log = logging.getLogger("qllm")

_DTYPES = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128)


def supports(dtype: torch.dtype, device, head_dim: int) -> bool:
    """Whether the fast GPU path handles this layer (else use LayerMemory + attend)."""
    dev = torch.device(device)
    return dev.type == "cuda" and dtype in _DTYPES and head_dim in _HEAD_DIMS


_CHUNK_BLOCKS = 64  # blocks per pinned host chunk (tiered mode)
_TIER_FIXED = 4     # int32 words before the miss list in the tier state (qllm_cuda.cuh QLLM_TIER_*)


def tiers_unsupported(config: QLLMConfig) -> str | None:
    """Why the fast path cannot run ``config.device_blocks`` (None when it can)."""
    if config.block_size & (config.block_size - 1):
        return f"block_size {config.block_size} is not a power of two"
    return None


def auto_device_blocks(config: QLLMConfig, n_tokens: int, n_layers: int, n_q_heads: int, n_kv_heads: int,
                       head_dim: int, element_size: int, free_bytes: int, fraction: float = 0.6) -> int | None:
    """A device block budget for a text of ``n_tokens`` when its untiered layer memories
    (K/V of every token plus f32 representatives, ``n_layers`` layers) would take more than
    ``fraction`` of ``free_bytes``; None when they fit, or when the configuration cannot be
    tiered on the fast path (no blocks, a budget already set, block_size not a power of two).

    The budget spends what is left of ``fraction * free_bytes`` after each tiered layer's
    fixed part (init + ring rows, representatives) on block cache slots, at least ``topk``."""
    if not config.uses_blocks or config.device_blocks is not None or tiers_unsupported(config) is not None:
        return None
    kv_row = 2 * n_kv_heads * head_dim * element_size      # K + V of one token, one layer
    n_blocks = max(0, n_tokens - config.n_init) // config.block_size + 1
    reprs = n_blocks * n_q_heads * head_dim * 4
    untiered = n_layers * (n_tokens * kv_row + reprs)
    avail = fraction * free_bytes
    if untiered <= avail:
        return None
    seg = max(config.n_init + config.n_local, config.n_local + config.block_size) + config.exc_block_size
    ring = _pow2_at_least(seg + min(config.chunk_size, n_tokens))
    fixed = n_layers * ((config.n_init + ring) * kv_row + reprs)
    per_block = n_layers * config.block_size * kv_row
    budget = int((avail - fixed) // per_block) if avail > fixed else 0
    return max(config.topk, min(budget, n_blocks))


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _as_words(t: torch.Tensor) -> torch.Tensor | None:
    """t's bits as int64 words along its last dim (unit stride, 8-byte aligned), else None."""
    n = t.shape[-1] * t.element_size()
    if t.stride(-1) != 1 or n % 8 or t.data_ptr() % 8 or any(s * t.element_size() % 8 for s in t.stride()[:-1]):
        return None
    return t.view(torch.int64)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same elements (same storage offset, shape, strides, dtype)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and a.stride() == b.stride())


_WORD_ROWS = 8  # _copy_rows: fewer rows per head (decode tokens) take the plain copy


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src); rows of the same dtype move as 8-byte words (a strided copy of 2-byte
    elements runs at a fraction of the memory bandwidth), except a few rows (a decode
    token), where the word views would cost more host time than they save."""
    if dst.dtype == src.dtype and src.dim() >= 2 and src.shape[-2] > _WORD_ROWS:
        dw, sw = _as_words(dst), _as_words(src)
        if dw is not None and sw is not None:
            dw.copy_(sw)
            return
    dst.copy_(src)


class CudaLayerMemory:
    """State of one attention layer for one sequence, on a CUDA device.

    Parameters
    ----------
    config : QLLMConfig
    n_q_heads, n_kv_heads, head_dim : int
    dtype : torch.dtype
        Storage dtype of K/V (float16 or bfloat16: the model's).
    device : torch.device
        A CUDA device.
    capacity : int, optional
        Tokens to reserve up front (the store grows geometrically otherwise).
    """

    def __init__(self, config: QLLMConfig, n_q_heads: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int | None = None) -> None:
        if n_q_heads % n_kv_heads != 0:
            raise ValueError(f"n_q_heads ({n_q_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if not supports(dtype, device, head_dim):
            raise ValueError(f"CudaLayerMemory: needs a CUDA device, float16/bfloat16 and head_dim in "
                             f"{_HEAD_DIMS}; got {device}, {dtype}, head_dim={head_dim} "
                             "(use qllm.memory.LayerMemory)")
        if config.strategy not in ("qllm", "infllm", "streaming"):
            raise ValueError(f"CudaLayerMemory: strategy {config.strategy!r} has no layer memory")
        self.config = config
        self.n_q_heads, self.n_kv_heads, self.head_dim = n_q_heads, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        # host bookkeeping (mirrors LayerMemory)
        self.n_seen = 0
        self.tail_start = 0
        self.init_done = False
        self.init_len = 0
        self.n_blocks = 0
        cfg = config
        seg_max = max(cfg.n_init + cfg.n_local, cfg.n_local + cfg.block_size) + cfg.exc_block_size
        self.ring = _pow2_at_least(seg_max)
        self.tiered = cfg.device_blocks is not None and cfg.uses_blocks
        cap = max(int(capacity or 0), 1024)
        if self.tiered:
            why = tiers_unsupported(cfg)
            if why is not None:
                raise ValueError(f"CudaLayerMemory: QLLMConfig.device_blocks: {why} (use qllm.memory.LayerMemory)")
            # the ring holds the tail (< seg_max between calls) plus one call's tokens (<= chunk_size)
            self.window = _pow2_at_least(seg_max + min(cfg.chunk_size, cap))
            self.ring_lo = 0  # lowest position >= n_init the ring rows still hold
            rows = cfg.n_init + self.window
        else:
            rows = cap
        self.k_store = torch.empty(n_kv_heads, rows, head_dim, dtype=dtype, device=self.device)
        self.v_store = torch.empty_like(self.k_store)
        self.scores = torch.zeros(n_q_heads, self.ring, dtype=torch.float32, device=self.device)
        cap_b = max(16, (cap - cfg.n_init) // cfg.block_size + 1) if cfg.uses_blocks else 1
        self.reprs = torch.empty(cap_b, n_q_heads, head_dim, dtype=torch.float32, device=self.device)
        if self.tiered:
            self._init_tiers(cap_b)
        self.question: torch.Tensor | None = None       # [n_q_heads, head_dim] f32
        # question heads (qllm.retrieval.QuestionRelevance): set by the cache
        self.layer_idx = 0
        self.relevance = None
        self.question_tokens: torch.Tensor | None = None  # [n_q_heads, n_tokens, head_dim] f32, fixed-position
        self.last_retrieved: torch.Tensor | None = None  # int32 block ids of the last execution block
        self.retrieved_log: torch.Tensor | None = None   # [n_exec, k] int32 of the last call (-1 padded)
        self._rope: tuple | None = None

    supports = staticmethod(supports)

    # ------------------------------------------------------------------ tiers
    def _init_tiers(self, cap_b: int) -> None:
        cfg = self.config
        self.n_slots = int(cfg.device_blocks)
        self.miss_cap = max(cfg.topk, (cfg.exc_block_size + cfg.block_size) // cfg.block_size + 2)
        shape = (self.n_slots, self.n_kv_heads, cfg.block_size, self.head_dim)
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty_like(self.k_cache)
        fixed = _TIER_FIXED + 2 * self.miss_cap
        self.tier = torch.full((fixed + 2 * self.n_slots + cap_b,), -1, dtype=torch.int32, device=self.device)
        self.tier[:fixed].zero_()
        self.host_tab = torch.zeros(2, -(-cap_b // _CHUNK_BLOCKS), dtype=torch.int64, device=self.device)
        self.host_k: list[torch.Tensor] = []  # pinned chunks [_CHUNK_BLOCKS, n_kv_heads, block_size, head_dim]
        self.host_v: list[torch.Tensor] = []
        self.host_alloc_s = 0.0  # seconds spent page-locking host chunks (torch's caching host allocator)
        self.n_written = 0  # blocks whose copy to the host tier has been issued
        self._side = torch.cuda.Stream(self.device)
        self._wb_event = torch.cuda.Event()
        self._wb_pending = False

    @property
    def tier_cfg(self) -> list[int]:
        """[W, chunk_blocks, miss_cap] of the tier arguments of the ops."""
        return [self.window, _CHUNK_BLOCKS, self.miss_cap]

    def _tier_slice(self, which: str) -> torch.Tensor:
        f, m, n = _TIER_FIXED, self.miss_cap, self.n_slots
        start = {"blk_of": f + 2 * m, "stamp": f + 2 * m + n, "slot_of": f + 2 * m + 2 * n}[which]
        end = None if which == "slot_of" else start + n
        return self.tier[start:end]

    def _wait_write_back(self) -> None:
        """Order the current stream after the pending copies to the host tier (they read ring rows)."""
        if self.tiered and self._wb_pending:
            torch.cuda.current_stream(self.device).wait_event(self._wb_event)
            self._wb_pending = False

    def _ring_pieces(self, lo: int, hi: int):
        """(first position, first row, length) runs of positions lo .. hi-1 in the store."""
        n0, W = self.config.n_init, self.window
        p = lo
        while p < hi:
            if p < n0:
                n = min(hi, n0) - p
                yield p, p, n
            else:
                r = (p - n0) % W
                n = min(hi - p, W - r)
                yield p, n0 + r, n
            p += n

    def kv_slots(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the store rows the next ``n_tokens`` tokens' keys and values will occupy:
        ``(k, v)``, each [n_kv_heads, n_tokens, head_dim] (row stride head_dim, head stride
        the capacity).  A caller that writes the next call's un-rotated K/V there (e.g. the
        K/V projection as a batched GEMM with ``out=``) and passes these views to
        :func:`attend_cuda` saves the copy into the store.  Reserves the room first, so the
        views stay valid until that call.  None with tiered memory (its ring rows wrap:
        pass K/V as usual).  Anything the views hold when the call runs is what it stores."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"kv_slots: n_tokens: expected an int >= 1, got {n_tokens!r}")
        n = n_tokens
        if self.tiered:
            return None
        P0 = self.n_seen
        self._reserve(P0 + n)
        return self.k_store[:, P0:P0 + n], self.v_store[:, P0:P0 + n]

    def _write_kv(self, P0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V of positions P0 .. P0+T-1 into the store (current stream); K/V already in
        those rows (the views of :meth:`kv_slots`) are not copied onto themselves."""
        T = k.shape[1]
        if not self.tiered:
            kd, vd = self.k_store[:, P0:P0 + T], self.v_store[:, P0:P0 + T]
            if _same_view(k, kd) and _same_view(v, vd):
                return
            _copy_rows(kd, k)
            _copy_rows(vd, v)
            return
        self._wait_write_back()
        for p, r, n in self._ring_pieces(P0, P0 + T):
            _copy_rows(self.k_store[:, r:r + n], k[:, p - P0:p - P0 + n])
            _copy_rows(self.v_store[:, r:r + n], v[:, p - P0:p - P0 + n])
        self.ring_lo = max(self.ring_lo, P0 + T - self.window)

    def _reserve_ring(self, lo: int, hi: int) -> None:
        """A ring that holds positions lo .. hi-1 (grown and re-laid out if too small)."""
        need = hi - max(lo, self.config.n_init)
        if need <= self.window:
            return
        n0 = self.config.n_init
        W2 = _pow2_at_least(need)
        keep_lo = max(self.ring_lo, n0)
        pos = torch.arange(keep_lo, self.n_seen, device=self.device)
        old_rows = n0 + (pos - n0) % self.window
        new_rows = n0 + (pos - n0) % W2
        for name in ("k_store", "v_store"):
            old = getattr(self, name)
            new = torch.empty(self.n_kv_heads, n0 + W2, self.head_dim, dtype=self.dtype, device=self.device)
            new[:, :n0].copy_(old[:, :n0])
            new[:, new_rows] = old[:, old_rows]
            setattr(self, name, new)
        log.info("qllm: tiered layer memory: ring grown from %d to %d rows (a call of more than chunk_size tokens)",
                 self.window, W2)
        self.window = W2

    def _reserve_host(self, n_blocks: int) -> None:
        """Pinned host chunks for blocks 0 .. n_blocks-1 (their pointers in host_tab)."""
        shape = (_CHUNK_BLOCKS, self.n_kv_heads, self.config.block_size, self.head_dim)
        while len(self.host_k) * _CHUNK_BLOCKS < n_blocks:
            c = len(self.host_k)
            t0 = time.perf_counter()
            try:
                # page-locking runs at ~1.5 GiB/s on the H100 machine (benchmarks/NOTES_gpu.md); the
                # driver serialises it with launches, so a background thread did not hide it (measured)
                hk = torch.empty(shape, dtype=self.dtype, pin_memory=True)
                hv = torch.empty(shape, dtype=self.dtype, pin_memory=True)
            except RuntimeError as exc:
                nbytes = 2 * math.prod(shape) * self.k_store.element_size()
                raise RuntimeError(f"qllm: cannot allocate {nbytes} more bytes of pinned host memory for the "
                                   f"block tier (QLLMConfig.device_blocks; {self.host_nbytes()} bytes held by "
                                   f"this layer): {exc}") from exc
            self.host_alloc_s += time.perf_counter() - t0
            self.host_k.append(hk)
            self.host_v.append(hv)
            self.host_tab[0, c].fill_(hk.data_ptr())  # a kernel argument: no host sync
            self.host_tab[1, c].fill_(hv.data_ptr())

    def _write_back(self) -> None:
        """Copy the blocks cut since the last write-back from the ring to the host tier, on the side stream."""
        b0, b1 = self.n_written, self.n_blocks
        if b1 <= b0:
            return
        self._reserve_host(b1)
        cfg = self.config
        bs, n0, W = cfg.block_size, cfg.n_init, self.window
        cur = torch.cuda.current_stream(self.device)
        self._side.wait_stream(cur)
        with torch.cuda.stream(self._side):
            b = b0
            while b < b1:
                c, j = divmod(b, _CHUNK_BLOCKS)
                r = n0 + (b * bs) % W
                m = min(b1 - b, _CHUNK_BLOCKS - j, (n0 + W - r) // bs)
                for store, host in ((self.k_store, self.host_k), (self.v_store, self.host_v)):
                    src = store[:, r:r + m * bs].view(self.n_kv_heads, m, bs, self.head_dim).transpose(0, 1)
                    host[c][j:j + m].copy_(src, non_blocking=True)
                b += m
        self._wb_event.record(self._side)
        self._wb_pending = True
        self.k_store.record_stream(self._side)
        self.v_store.record_stream(self._side)
        self.n_written = b1

    def tier_stats(self) -> dict:
        """Budget, block placement, moves and bytes (synchronises: reads the device tier state).

        Keys as :meth:`qllm.memory.LayerMemory.tier_stats`: ``budget``, ``blocks``, ``on_device``
        (blocks in the device cache), ``on_host`` (blocks in the host tier: every cut block),
        ``fetches`` (retrieved blocks copied into the cache), ``evictions`` (blocks that left the
        cache), ``device_bytes``, ``host_bytes``; plus ``placed`` (cut blocks that entered the cache)
        and ``host_alloc_s`` (seconds spent page-locking host chunks).
        """
        if not self.tiered:
            return {"budget": None, "blocks": self.n_blocks, "on_device": self.n_blocks, "on_host": 0,
                    "fetches": 0, "evictions": 0, "placed": self.n_blocks,
                    "device_bytes": self.device_nbytes(), "host_bytes": 0}
        head = self.tier[:_TIER_FIXED].tolist()
        on_dev = int((self._tier_slice("blk_of") >= 0).sum())
        return {"budget": self.n_slots, "blocks": self.n_blocks, "on_device": on_dev, "on_host": self.n_written,
                "fetches": head[2], "evictions": head[2] + head[3] - on_dev, "placed": head[3],
                "device_bytes": self.device_nbytes(), "host_bytes": self.host_nbytes(),
                "host_alloc_s": self.host_alloc_s}

    def block_slots(self) -> torch.Tensor:
        """Tiered mode: the device cache slot of each block (-1: host only), int32 [n_blocks]."""
        if not self.tiered:
            raise ValueError("block_slots: the memory is not tiered (QLLMConfig.device_blocks is None)")
        return self._tier_slice("slot_of")[: self.n_blocks]

    # ------------------------------------------------------------------ views
    @property
    def capacity(self) -> int:
        """Positions the store can hold (tiered: unbounded, the ring reuses rows)."""
        return (1 << 62) if self.tiered else self.k_store.shape[1]

    def block_reprs(self) -> torch.Tensor:
        """Representatives of all blocks: [n_blocks, n_q_heads, head_dim] f32."""
        return self.reprs[: self.n_blocks]

    @property
    def tail_scores(self) -> torch.Tensor:
        """Token scores of the tail (positions tail_start .. n_seen-1): [n_q_heads, tail_len] f32."""
        pos = torch.arange(self.tail_start, self.n_seen, device=self.device) % self.ring
        return self.scores[:, pos]

    @property
    def init_k(self) -> torch.Tensor:
        return self.k_store[:, : self.init_len]

    def gather_blocks(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of blocks ``ids`` (in the order given): each [n_kv_heads, len(ids)*block_size, head_dim].
        Tiered mode: read from the host tier (synchronises)."""
        bs, n0 = self.config.block_size, self.config.n_init
        if self.tiered:
            self._write_back()
            self._side.synchronize()
            parts = [[], []]
            for i in ids.reshape(-1).tolist():
                if not 0 <= i < self.n_blocks:
                    raise IndexError(f"ids: expected block ids in [0, {self.n_blocks}), got {i}")
                c, j = divmod(int(i), _CHUNK_BLOCKS)
                parts[0].append(self.host_k[c][j])
                parts[1].append(self.host_v[c][j])
            if not parts[0]:
                e = torch.empty(self.n_kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
                return e, e.clone()
            return tuple(torch.cat(p, dim=1).to(self.device) for p in parts)
        pos = (n0 + ids.long().to(self.device)[:, None] * bs
               + torch.arange(bs, device=self.device)[None, :]).reshape(-1)
        return self.k_store[:, pos], self.v_store[:, pos]

    def device_nbytes(self) -> int:
        """Bytes of this layer's device state (store or ring, scores, representatives, block cache)."""
        ts = [self.k_store, self.v_store, self.scores, self.reprs]
        if self.tiered:
            ts += [self.k_cache, self.v_cache, self.tier, self.host_tab]
        return sum(t.numel() * t.element_size() for t in ts)

    def host_nbytes(self) -> int:
        """Bytes of the pinned host tier (0 untiered)."""
        if not self.tiered:
            return 0
        return sum(t.numel() * t.element_size() for t in self.host_k + self.host_v)

    def nbytes(self) -> int:
        """Bytes held by this layer's state: ``device_nbytes() + host_nbytes()``."""
        return self.device_nbytes() + self.host_nbytes()

    # ------------------------------------------------------------ capacity
    def _reserve(self, n_tokens: int) -> None:
        if self.tiered:
            return  # the ring does not grow with the text (see _reserve_ring)
        cap = self.capacity
        if n_tokens <= cap:
            return
        # grow by 1/4 (not 2x): at long lengths the store is most of the GPU memory, and a doubling
        # right after a power-of-two prompt would ask for twice what the text needs
        new_cap = max(-(-n_tokens // 4096) * 4096, cap + cap // 4)
        for name in ("k_store", "v_store"):
            old = getattr(self, name)
            new = torch.empty(self.n_kv_heads, new_cap, self.head_dim, dtype=self.dtype, device=self.device)
            new[:, : self.n_seen].copy_(old[:, : self.n_seen])
            setattr(self, name, new)

    def _reserve_blocks(self, n: int, n_valid: int) -> None:
        """Room for n block representatives, keeping the first n_valid."""
        cap_b = self.reprs.shape[0]
        if n <= cap_b:
            return
        new_cap = max(n, 2 * cap_b)
        new = torch.empty(new_cap, self.n_q_heads, self.head_dim, dtype=torch.float32, device=self.device)
        new[:n_valid].copy_(self.reprs[:n_valid])
        self.reprs = new
        if self.tiered:  # slot_of entries and host chunk pointers for new_cap blocks
            tier = torch.full((self.tier.numel() - cap_b + new_cap,), -1, dtype=torch.int32, device=self.device)
            tier[: self.tier.numel()].copy_(self.tier)
            self.tier = tier
            chunks = -(-new_cap // _CHUNK_BLOCKS)
            if chunks > self.host_tab.shape[1]:
                tab = torch.zeros(2, chunks, dtype=torch.int64, device=self.device)
                tab[:, : self.host_tab.shape[1]].copy_(self.host_tab)
                self.host_tab = tab

    def _rope_tables(self, rope: RopeTable) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._rope
        if cached is not None and cached[0] is rope:
            return cached[1], cached[2]
        cos = rope.cos.to(device=self.device, dtype=torch.float32).contiguous()
        sin = rope.sin.to(device=self.device, dtype=torch.float32).contiguous()
        self._rope = (rope, cos, sin)
        return cos, sin

    # ------------------------------------------------------------ schedule
    def _state(self) -> tuple:
        return (self.n_seen, self.tail_start, self.init_done, self.init_len, self.n_blocks)

    def _set_state(self, state: tuple) -> None:
        self.n_seen, self.tail_start, self.init_done, self.init_len, self.n_blocks = state

    def _schedule(self, T: int, rope_len: int) -> tuple[torch.Tensor, int]:
        """Execution blocks of a forward call of T tokens, as the int64 rows
        (t0, E, P0, T0, init_len, n_blocks, n_ret, m, cut_b0, cut_n); advances
        the host state past them.  Mirrors attention._exec_block + LayerMemory.append."""
        rows, state = self._rows(T, rope_len)
        self._set_state(state)
        return torch.tensor(rows, dtype=torch.int64), rows[-1][6]

    def _rows(self, T: int, rope_len: int) -> tuple[list, tuple]:
        """The schedule rows of a call of T tokens and the host state after
        them, without changing this memory."""
        cfg = self.config
        E = cfg.exc_block_size
        n_seen, tail_start = self.n_seen, self.tail_start
        init_done, init_len, n_blocks = self.init_done, self.init_len, self.n_blocks
        rows = []
        for t0 in range(0, T, E):
            e = min(E, T - t0)
            P0, T0 = n_seen, tail_start
            L = P0 - T0 + e
            if L > rope_len:
                raise RuntimeError(f"qllm: recent segment of {L} tokens exceeds the RoPE table ({rope_len})")
            dense_last = P0 + e - 1 < cfg.n_init + cfg.n_local
            m = 0 if dense_last else max(0, min(L, P0 + e - cfg.n_local - T0))
            n_ret = min(cfg.topk, n_blocks) if (cfg.uses_blocks and n_blocks > 0) else 0
            row_init, row_blocks = init_len, n_blocks
            # append + settle
            n_seen += e
            cut_b0, cut_n = n_blocks, 0
            if not init_done and n_seen >= cfg.n_init + cfg.n_local:
                tail_start += cfg.n_init
                init_len = cfg.n_init
                init_done = True
            if init_done:
                out_of_window = n_seen - cfg.n_local - tail_start
                if out_of_window > 0:
                    if not cfg.uses_blocks:
                        tail_start += out_of_window
                    else:
                        cut_n = out_of_window // cfg.block_size
                        tail_start += cut_n * cfg.block_size
                        n_blocks += cut_n
            rows.append((t0, e, P0, T0, row_init, row_blocks, n_ret, m, cut_b0, cut_n))
        return rows, (n_seen, tail_start, init_done, init_len, n_blocks)


def _tier_args(mem: CudaLayerMemory, with_ring_lo: bool) -> tuple:
    """(k_cache, v_cache, tier, host_tab, tier_cfg) of the attend ops (all None / [] untiered)."""
    if not mem.tiered:
        return None, None, None, None, []
    cfg = mem.tier_cfg + ([mem.ring_lo] if with_ring_lo else [])
    return mem.k_cache, mem.v_cache, mem.tier, mem.host_tab, cfg


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two CUDA devices are one ("cuda" means the current device)."""
    if a.type != b.type:
        return False
    cur = torch.cuda.current_device() if a.type == "cuda" and (a.index is None or b.index is None) else None
    return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)


def _question_heads(mem: CudaLayerMemory) -> tuple | None:
    """The question-head work of this layer, as ``(relevance, own_columns, own_heads)``: raw
    scores recorded for ``own_columns`` (this layer's heads, when the question tokens are known);
    the selection columns depend on the candidate count (:func:`_n_sel`).  None without question
    heads.  Same gating as the generic path (:func:`qllm.retrieval.select_blocks`,
    ``LayerMemory._cut_blocks``)."""
    rel = mem.relevance
    if rel is None or not mem.config.uses_blocks or not rel.heads:
        return None
    own = list(rel.columns_of(mem.layer_idx)) if mem.question_tokens is not None else []
    if not mem.config.uses_question and not own:
        return None
    # columns are sorted by (layer, head): a prefix is a set of layers, a layer's are contiguous
    if list(rel.heads) != sorted(rel.heads) or own != list(range(own[0], own[0] + len(own)) if own else []):
        raise RuntimeError(f"qllm: question-head columns not sorted by layer: {rel.heads}")
    heads = [rel.heads[c][1] for c in own]
    for h in heads:
        if h >= mem.n_q_heads:
            raise ValueError(f"QLLMConfig.question_heads: head {h} of layer {mem.layer_idx} does not exist "
                             f"(the layer has {mem.n_q_heads} query heads)")
    if not _same_device(rel.raw.device, mem.device):
        raise ValueError(f"qllm: question relevance on {rel.raw.device}, layer memory on {mem.device}")
    return rel, own, heads


def _n_sel(mem: CudaLayerMemory, rel, n_blocks: int) -> int:
    """Selection columns ``0 .. n-1`` among ``n_blocks`` candidates (0: no head term):
    :meth:`qllm.retrieval.QuestionRelevance.columns_for`, a prefix of the columns."""
    return len(rel.columns_for(mem.layer_idx, n_blocks)) if mem.config.uses_question else 0


def _reserve_relevance(rel, rows: int) -> None:
    """Room for ``rows`` blocks in ``rel.raw`` (geometric growth, as ``QuestionRelevance.record``)."""
    have = rel.raw.shape[0]
    if have >= rows:
        return
    grown = torch.empty(max(rows, 2 * have), len(rel.heads), dtype=torch.float32, device=rel.raw.device)
    grown[:have].copy_(rel.raw)
    rel.raw = grown


def _check_filled(rel, cols, n_blocks: int, layer: int) -> None:
    for c in cols:
        if rel.n_filled[c] < n_blocks:
            raise RuntimeError(f"qllm: question head {rel.heads[c]} scored {rel.n_filled[c]} blocks, "
                               f"layer {layer} retrieves among {n_blocks}")


def attend_cuda(mem: CudaLayerMemory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: RopeTable, scaling: float) -> torch.Tensor:
    """Process one forward call's tokens through the GPU layer memory.

    Exactly :func:`qllm.attention.attend` (to f16/bf16 rounding): q
    [n_q_heads, T, head_dim], k, v [n_kv_heads, T, head_dim], un-rotated, on
    ``mem.device``.  Returns [n_q_heads, T, head_dim] in q's dtype (a view of a
    [T, n_q_heads, head_dim] contiguous buffer, so ``out.transpose(0, 1)`` is
    contiguous).  Enqueues work on the current stream and never synchronises.
    """
    cfg = mem.config
    hq, T, d = q.shape
    if hq != mem.n_q_heads or d != mem.head_dim or k.shape[0] != mem.n_kv_heads:
        raise ValueError(f"attend_cuda: q {tuple(q.shape)} / k {tuple(k.shape)} do not match the memory "
                         f"({mem.n_q_heads} q heads, {mem.n_kv_heads} kv heads, head_dim {mem.head_dim})")
    if T == 0:
        return q.new_empty(hq, 0, d)
    if q.dtype != mem.dtype:
        q = q.to(mem.dtype)
    if q.stride(-1) != 1 or q.stride(0) % 8 or q.stride(1) % 8 or q.data_ptr() % 16:
        q = q.contiguous()  # the kernels read rows of 8 elements (16 bytes)
    cos, sin = mem._rope_tables(rope)
    P0 = mem.n_seen
    mem._reserve(P0 + T)
    if mem.tiered:
        mem._reserve_ring(mem.tail_start, P0 + T)
    state = (mem.n_seen, mem.tail_start, mem.init_done, mem.init_len, mem.n_blocks)
    sched, n_ret_last = mem._schedule(T, cos.shape[0])
    try:
        plan = _question_heads(mem)
        rows = sched.tolist()
        # runs of execution blocks that select with the same question-head columns: the heads of
        # later layers join until this call cuts a block (columns_for), so at most two runs
        runs: list[list] = []
        for i, r in enumerate(rows):
            ns = _n_sel(mem, plan[0], r[5]) if (plan is not None and r[6] > 0) else None
            if runs and (ns is None or runs[-1][2] is None or runs[-1][2] == ns):
                runs[-1][1] = i + 1
                if runs[-1][2] is None:
                    runs[-1][2] = ns
            else:
                runs.append([i, i + 1, ns])
        qh_tokens = None
        if plan is not None:
            rel, own, heads = plan
            for c in own:  # this layer's heads score every block once, in order
                if rel.n_filled[c] != state[4]:
                    raise RuntimeError(f"qllm: question head {rel.heads[c]} scored {rel.n_filled[c]} blocks, "
                                       f"expected {state[4]}")
            for i0, i1, ns in runs:  # the candidates of a run's last execution block (the most)
                _check_filled(rel, [c for c in range(ns or 0) if c not in own], int(rows[i1 - 1][5]),
                              mem.layer_idx)
            if own:
                _reserve_relevance(rel, mem.n_blocks)
                qh_tokens = mem.question_tokens.to(device=mem.device, dtype=torch.float32).contiguous()
        mem._reserve_blocks(mem.n_blocks, state[4])
        mem._write_kv(P0, k, v)
        out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device).permute(1, 0, 2)
        retrieved = torch.empty(sched.shape[0], max(cfg.topk, 1), dtype=torch.int32, device=q.device)
        cfg_ints = [cfg.n_init, cfg.n_local, cfg.block_size, cfg.topk, cfg.repr_topk, 0 if cfg.uses_blocks else 1]
        tier = _tier_args(mem, with_ring_lo=True)
        for i0, i1, ns in runs:
            ns = ns or 0
            a, b = rows[i0][0], rows[i1 - 1][0] + rows[i1 - 1][1]
            sub = sched[i0:i1].clone() if len(runs) > 1 else sched
            sub[:, 0] -= a
            qh_cfg = [ns, plan[1][0] if plan[1] else 0, *plan[2]] if (plan is not None and (ns or plan[1])) else []
            question = None
            if cfg.uses_question and mem.question is not None and ns == 0:
                question = mem.question.to(device=mem.device, dtype=torch.float32).contiguous()
            # question heads select with w on the standardised head term (no question vector)
            weight = float(cfg.question_weight) if (question is not None or ns > 0) else 0.0
            torch.ops.qllm.attend_run(
                q[:, a:b], mem.k_store, mem.v_store, mem.scores, mem.reprs, retrieved[i0:i1], out[:, a:b], cos, sin,
                question, sub, float(scaling), weight, cfg_ints,
                plan[0].raw if qh_cfg else None, qh_tokens if (qh_cfg and plan[1]) else None, qh_cfg, *tier)
    except BaseException:
        mem.n_seen, mem.tail_start, mem.init_done, mem.init_len, mem.n_blocks = state
        raise
    if mem.tiered:
        mem._write_back()
    if plan is not None:
        for c in plan[1]:
            plan[0].n_filled[c] = mem.n_blocks
    mem.retrieved_log = retrieved
    mem.last_retrieved = retrieved[-1, :n_ret_last] if n_ret_last > 0 else None
    return out


class CudaDecodeStep:
    """One layer's decode step (one token) that can be captured in a CUDA graph.

    The per-token sizes (position, tail start, segment length, blocks, ...)
    are not kernel arguments: :meth:`prepare` computes them on the host (the
    same bookkeeping as :func:`attend_cuda`) and writes them into a small
    device row with one tiny kernel (``qllm.decode_set``); :meth:`launch`
    (``qllm.attend_decode``) enqueues kernels whose grids are sized for the
    maxima and which read that row.  So ``launch`` -- with the projections
    around it -- can be captured once in a ``torch.cuda.CUDAGraph`` and
    replayed for every token::

        step = CudaDecodeStep(mem, rope, scaling)
        step.prepare(); out = step.launch(q, k, v)        # a real step, also warm-up
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step.launch(q_static, k_static, v_static)  # captured, not run
        for each token:
            if step.prepare():  # the host state advances by one token
                g.replay()
            else:               # this token cuts blocks (every block_size tokens)
                out = attend_cuda(mem, q, k, v, rope, scaling)

    Steps that cut blocks stay on the ordinary path (``prepare`` returns False
    and leaves the memory untouched), unless the caller keeps a second graph
    for them: ``prepare(allow_cut=True)`` also accepts a token that cuts one
    block (:attr:`can_cut`: blocks, no tiers, no question heads), sets
    :attr:`cuts`, and ``launch`` then ends with that block's representatives
    (captured with ``cuts`` True, that launch is the graph to replay whenever
    ``prepare`` sets it).  The graph bakes in the memory's buffers:
    ``mem`` must have the capacity for every token decoded (pass ``capacity``
    to :class:`CudaLayerMemory`); if a store is reallocated (capacity grown),
    or the question appears / disappears, ``prepare`` returns False from then
    on and the step must be rebuilt (and the graph recaptured).  A new question
    tensor of the same shape is copied into the step's buffer by ``prepare``.

    Question heads (``mem.relevance``): the step selects with the head term
    like :func:`attend_cuda` (it cuts no block, so it records no raw score);
    the step reserves ``relevance.raw`` rows for the memory's block capacity,
    and ``prepare`` returns False if that matrix is reallocated, the
    relevance object changes, or the token would select with other columns
    than the step was built with (``columns_for``: e.g. built before later
    layers had scored every block) -- rebuild the step then.

    Outputs are bitwise those of :func:`attend_cuda` for the same token
    (same kernels and the same key splits).  ``launch`` returns a static
    buffer [n_q_heads, 1, head_dim] (a view of [1, n_q_heads, head_dim]).
    """

    def __init__(self, mem: CudaLayerMemory, rope: RopeTable, scaling: float) -> None:
        cfg = mem.config
        self.mem, self.rope, self.scaling = mem, rope, float(scaling)
        self.cos, self.sin = mem._rope_tables(rope)
        dev = mem.device
        # longest recent segment of a decode step: the host bookkeeping keeps
        # P0 - T0 < max(n_init + n_local, n_local + block_size) between calls
        # (longer ones make prepare() return False)
        self.L_max = min(mem.ring, self.cos.shape[0], max(cfg.n_init + cfg.n_local, cfg.n_local + cfg.block_size))
        self._k_store, self._v_store, self._reprs = mem.k_store, mem.v_store, mem.reprs
        self._tier = (mem.tier, mem.host_tab) if mem.tiered else None
        self.nb_max = mem.reprs.shape[0]
        self.dyn = torch.zeros(9, dtype=torch.int64, device=dev)  # QLLM_DYN_FIELDS
        self.cuts = False  # the prepared token cuts a block (launch runs the cut variant)
        self.retrieved = torch.full((1, max(cfg.topk, 1)), -1, dtype=torch.int32, device=dev)
        self._ret_views = [None] + [self.retrieved[-1, :n] for n in range(1, max(cfg.topk, 1) + 1)]
        self.out = torch.empty(1, mem.n_q_heads, mem.head_dim, dtype=mem.dtype, device=dev).permute(1, 0, 2)
        self._question_src = mem.question if cfg.uses_question else None
        self.question = None
        self._rel = mem.relevance
        self._plan = _question_heads(mem)
        self._qh_sel = self._qh_target(mem.n_blocks)
        self._qh_raw = None
        if self._qh_sel > 0:  # question heads select: no question vector
            _reserve_relevance(self._rel, self.nb_max)
            self._qh_raw = self._rel.raw
        elif self._question_src is not None:
            self.question = self._question_src.to(device=dev, dtype=torch.float32).contiguous().clone()
        self.weight = float(cfg.question_weight) if (self.question is not None or self._qh_sel > 0) else 0.0
        self._cfg = [cfg.n_init, cfg.n_local, cfg.block_size, cfg.topk, cfg.repr_topk,
                     0 if cfg.uses_blocks else 1]
        self._limits = [self.L_max, self.nb_max]

    @property
    def can_cut(self) -> bool:
        """Whether a token that cuts a block may run as this step (``prepare(allow_cut=True)``):
        a memory with blocks, not tiered (new blocks enter the device cache through attend_cuda),
        and no question heads (a cut records their raw scores through attend_cuda)."""
        return self.mem.config.uses_blocks and not self.mem.tiered and self._plan is None

    def prepare(self, allow_cut: bool = False) -> bool:
        """Advance the memory by one token for :meth:`launch` (or a replay of
        a graph of it) and write the step's sizes to the device.  False (and
        nothing changed) when this token must go through :func:`attend_cuda`:
        among others when it cuts a block, unless ``allow_cut`` and
        :attr:`can_cut` (then :attr:`cuts` is set and ``launch`` cuts it)."""
        mem, cfg = self.mem, self.mem.config
        if self._buffers_moved():
            return False
        q_src = mem.question if cfg.uses_question else None
        if (q_src is None) != (self._question_src is None):
            return False
        if mem.relevance is not self._rel or (self._qh_raw is not None and self._rel.raw is not self._qh_raw):
            return False
        rows, state = mem._rows(1, self.cos.shape[0])
        _, _, P0, T0, init_len, n_blocks, n_ret, m, cut_b0, cut_n = rows[0]
        L = P0 - T0 + 1
        if cut_n and not (allow_cut and cut_n == 1 and self.can_cut and cut_b0 + 1 <= self.nb_max):
            return False
        if L > self.L_max or P0 >= mem.capacity or n_blocks > self.nb_max:
            return False
        if mem.tiered and P0 + 1 - max(T0, cfg.n_init) > mem.window:
            return False
        if self._qh_target(n_blocks) != self._qh_sel:
            return False  # this token selects with other question-head columns (rebuild the step)
        if self._qh_sel > 0 and any(self._rel.n_filled[c] < n_blocks for c in range(self._qh_sel)):
            return False  # attend_cuda raises the error
        if self.question is not None and q_src is not self._question_src:
            self.question.copy_(q_src, non_blocking=True)
            self._question_src = q_src
        mem._set_state(state)
        ring_lo = 0
        if mem.tiered:
            mem._wait_write_back()  # the step overwrites a ring row
            mem.ring_lo = ring_lo = max(mem.ring_lo, P0 + 1 - mem.window)
        torch.ops.qllm.decode_set(self.dyn, [P0, T0, L, init_len, n_ret, m, n_blocks, ring_lo,
                                             cut_b0 if cut_n else 0])
        self.cuts = bool(cut_n)
        mem.retrieved_log = self.retrieved
        mem.last_retrieved = self._ret_views[n_ret] if n_ret > 0 else None
        return True

    def launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Enqueue the step prepared by :meth:`prepare` (capturable): q
        [n_q_heads, 1, head_dim], k, v [n_kv_heads, 1, head_dim] un-rotated,
        the memory's dtype, stride 1 along head_dim (q's head stride a
        multiple of 8).  With :attr:`cuts` set, the launch ends with the cut
        of the block ``prepare`` found.  Returns the static output buffer."""
        mem = self.mem
        torch.ops.qllm.attend_decode(
            q, k, v, mem.k_store, mem.v_store, mem.scores, mem.reprs, self.retrieved, self.out,
            self.cos, self.sin, self.question, self.dyn, self.scaling, self.weight, self._cfg, self._limits,
            self._qh_raw, [self._qh_sel] if self._qh_sel > 0 else [], *_tier_args(mem, with_ring_lo=False),
            cut=self.cuts)
        return self.out

    def _qh_target(self, n_blocks: int) -> int:
        """Question-head selection columns of a one-token call among ``n_blocks`` candidates
        (what attend_cuda would use: :func:`_n_sel`)."""
        return _n_sel(self.mem, self._plan[0], n_blocks) if self._plan is not None else 0

    def _buffers_moved(self) -> bool:
        """Whether a buffer this step's launches read was reallocated (rebuild the step then)."""
        m = self.mem
        if m.k_store is not self._k_store or m.v_store is not self._v_store or m.reprs is not self._reprs:
            return True
        return self._tier is not None and (m.tier is not self._tier[0] or m.host_tab is not self._tier[1])


# ============================================================ whole-model decode in one CUDA graph


def graph_unsupported(model: torch.nn.Module) -> str | None:
    """Why one-token decode of the patched ``model`` cannot run as a CUDA-graph replay
    (:class:`GraphDecoder`), judged from the model alone; None when it can.  The graph needs
    the fast path in every decoder layer: a patched model on a CUDA device, float16/bfloat16,
    head_dim 64/128, strategy qllm/infllm/streaming (a device block budget needs a power-of-two
    block_size), and no
    layer that keeps its own attention (e.g. Gemma3's sliding-window layers)."""
    from .patch import _find_layers  # patch imports this module

    handle = getattr(model, "_qllm", None)
    if handle is None:
        return "the model is not patched"
    cfg = handle.config
    if cfg.strategy not in ("qllm", "infllm", "streaming"):
        return f"strategy {cfg.strategy!r} has no layer memory"
    if cfg.device_blocks is not None and cfg.uses_blocks and tiers_unsupported(cfg) is not None:
        return f"QLLMConfig.device_blocks with {tiers_unsupported(cfg)} runs the generic torch path"
    if handle.recorder is not None:
        return "qllm.record is active"
    _, layers = _find_layers(handle.model)
    if len(handle.attn_modules) != len(layers):
        return (f"{len(layers) - len(handle.attn_modules)} of {len(layers)} layers keep their own attention "
                "(e.g. sliding-window layers)")
    p = next(handle.model.parameters(), None)
    if p is None or p.device.type != "cuda":
        return "the model is not on a CUDA device"
    hd = next(iter(handle.attn_modules.values())).head_dim
    if not supports(p.dtype, p.device, hd):
        return f"{p.dtype}, head_dim {hd} (the CUDA fast path takes float16/bfloat16 and head_dim 64/128)"
    return None


class GraphDecoder:
    """Decode one token through the whole patched model as one CUDA-graph replay.

    ``GraphDecoder(model, cache, max_new_tokens)`` takes a cache after the prefill
    (``cache.n_seen > 0``) and :meth:`step` runs one token::

        logits = model(prompt, cache=cache, ...).logits          # prefill, as usual
        dec = GraphDecoder(model, cache, max_new_tokens=64)
        tok = logits[:, -1:].argmax(-1)
        for _ in range(63):
            tok = dec.step(tok)[:, -1:].argmax(-1)                # no host sync

    How: one :class:`CudaDecodeStep` per layer.  For each token :meth:`step`
    writes the token id into a static input buffer and calls every step's
    ``prepare()`` (host bookkeeping + one tiny kernel each, outside the graph);
    then it replays a graph of ``model(static_ids, cache=cache)`` in which every
    patched attention call is ``step.launch`` (``cache.decode_steps`` set while
    capturing), and returns the graph's static logits.  The first such token
    runs the model once in that mode on a side stream (warm-up, a real step),
    then captures the graph.

    Tokens that cut a block (one in ``block_size``) replay a second graph,
    captured with the first one, whose steps end with the cut, when every
    layer's step :attr:`~CudaDecodeStep.can_cut` (no tiers, no question
    heads); ``cut_graph=False`` runs them eagerly instead.  Tokens whose
    ``prepare()`` says no -- cuts otherwise, a token whose layers disagree
    about cutting, or any after a store was reallocated -- run the ordinary
    eager forward (attend_cuda); a step that refuses changes nothing, and
    the layers that had already accepted the token are rolled back first.
    The stores and representatives are reserved for ``max_new_tokens`` up
    front, so the buffers baked into the graphs stay valid; if one is
    reallocated anyway (decoding past ``max_new_tokens``), the steps are
    rebuilt and the graphs are captured again.

    What the model's forward computes from Python state is baked into the
    graph and ignored by qllm: the position ids and RoPE tables (qllm's
    patched layers get identity cos/sin and apply RoPE themselves from the
    memory's own counts), the attention mask (a constant 4-D mask is passed,
    which transformers hands through unchanged; patched layers do not read
    it).  The patched forward's own bookkeeping, ``cache.n_seen += 1``, is done
    here on every replay.

    Unsupported models (:func:`graph_unsupported`: CPU, generic path,
    unpatched layers, ...) and ``enabled=False`` decode every token eagerly
    through the same :meth:`step` (logged once per reason).

    The logits returned by a replayed step are that graph's static buffer:
    the next replay of the same graph overwrites them (use them, or clone,
    before the next :meth:`step`).
    Outputs are bitwise those of the eager forward (same kernels, same
    splits).  Batch size 1, one sequence per decoder.
    """

    def __init__(self, model: torch.nn.Module, cache, max_new_tokens: int, *, enabled: bool = True,
                 cut_graph: bool = True) -> None:
        handle = getattr(model, "_qllm", None)
        if handle is None:
            raise ValueError("GraphDecoder: model is not patched (qllm.patch)")
        if getattr(cache, "_qllm", None) is not handle:
            raise ValueError("GraphDecoder: cache: expected the QLLMCache of this patched model")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GraphDecoder: max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if not isinstance(cut_graph, bool):
            raise ValueError(f"GraphDecoder: cut_graph: expected a bool, got {cut_graph!r}")
        self.model, self.cache, self.handle = model, cache, handle
        self.max_new_tokens = max_new_tokens
        self._cut_graph = cut_graph
        p = next(model.parameters())
        self.device = p.device
        params = inspect.signature(type(model).forward).parameters
        self._kw = {handle.cache_kw: cache, "use_cache": True}
        if "logits_to_keep" in params:
            self._kw["logits_to_keep"] = 1
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.steps: dict[int, CudaDecodeStep] = {}
        self.graph: torch.cuda.CUDAGraph | None = None      # tokens that cut no block
        self.logits: torch.Tensor | None = None
        self.cut_graph: torch.cuda.CUDAGraph | None = None  # tokens that cut one block
        self._cut_logits: torch.Tensor | None = None
        self._cuts_ok = False  # every step can cut (the cut graph is captured with the first)
        self.n_replays = 0   # tokens decoded by a graph replay
        self.n_eager = 0     # tokens decoded by the eager forward (declined steps, unsupported, ...)
        self.n_captures = 0
        self.capture_s = 0.0  # host seconds spent in warm-up + capture
        self.reason = "disabled (enabled=False)" if not enabled else self._unsupported()
        if self.reason is not None:
            if enabled:
                log_once(logging.INFO, f"qllm: decoding without a CUDA graph: {self.reason}")
            self._mask = None
            return
        # a constant 4-D mask: transformers returns a prepared 4-D mask as is (no mask is built
        # in the graph) and the patched layers ignore it
        self._mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self._reserve(cache.n_seen + max_new_tokens + 1)
        self._build_steps()

    # ------------------------------------------------------------ set-up
    @property
    def enabled(self) -> bool:
        """Whether tokens are decoded by graph replays (else every step is eager)."""
        return self.reason is None

    def _unsupported(self) -> str | None:
        why = graph_unsupported(self.model)
        if why is not None:
            return why
        cache = self.cache
        if cache.mode != "text":
            return f"cache mode {cache.mode!r}"
        if cache.n_seen == 0:
            return "the cache has seen no prompt (prefill first)"
        if set(cache.memories) != set(self.handle.attn_modules):
            return "the cache does not hold a memory for every patched layer"
        kinds = {type(m).__name__ for m in cache.memories.values() if not isinstance(m, CudaLayerMemory)}
        if kinds:
            return f"layer memories {sorted(kinds)} (generic path), not CudaLayerMemory"
        return None

    def _reserve(self, n_tokens: int) -> None:
        """Stores and representatives with room for ``n_tokens`` (one reallocation now, none while decoding)."""
        mems = list(self.cache.memories.values())
        for mem in mems:
            cfg = mem.config
            mem._reserve(n_tokens)
            if cfg.uses_blocks:
                mem._reserve_blocks(max(0, n_tokens - cfg.n_init) // cfg.block_size + 1, mem.n_blocks)
        rel = self.cache.relevance
        if rel is not None:  # shared by the layers: one size for all steps
            _reserve_relevance(rel, max(m.reprs.shape[0] for m in mems))

    def _build_steps(self) -> None:
        rope = self.handle.rope(self.device)
        self.steps = {}
        for i, mem in sorted(self.cache.memories.items()):
            mod = self.handle.attn_modules[i]
            scaling = getattr(mod, "scaling", None) or mod.head_dim ** -0.5
            self.steps[i] = CudaDecodeStep(mem, rope, scaling)  # the forward sets the model's own scaling
        self.graph, self.logits = None, None
        self.cut_graph, self._cut_logits = None, None
        self._cuts_ok = self._cut_graph and bool(self.steps) and all(st.can_cut for st in self.steps.values())

    def _stale(self) -> bool:
        """Whether a step holds buffers that were reallocated (the graph points at freed memory)."""
        for st in self.steps.values():
            m = st.mem
            if st._buffers_moved() or st._qh_target(m.n_blocks) != st._qh_sel:
                return True
            if m.relevance is not st._rel or (st._qh_raw is not None and st._rel.raw is not st._qh_raw):
                return True
            if (m.question is None) != (st._question_src is None) and m.config.uses_question:
                return True
        return False

    # ------------------------------------------------------------ decoding
    def _forward(self):
        with torch.no_grad():
            if self._mask is not None:
                return self.model(input_ids=self.ids, attention_mask=self._mask, **self._kw)
            return self.model(input_ids=self.ids, **self._kw)

    def _prepare_all(self) -> bool | None:
        """prepare() every layer's step for the next token; all or nothing.  Returns whether the
        token cuts a block (which graph replays it), None when a step declined."""
        done = []

        def roll_back() -> None:  # those that accepted the token
            for m2, (state, log_, last) in done:
                m2._set_state(state)
                m2.retrieved_log, m2.last_retrieved = log_, last

        for st in self.steps.values():
            m = st.mem
            saved = (m._state(), m.retrieved_log, m.last_retrieved)
            if not st.prepare(allow_cut=self._cuts_ok):
                roll_back()
                return None
            done.append((m, saved))
        cuts = {st.cuts for st in self.steps.values()}
        if len(cuts) != 1:  # layers disagree (different configs): the eager forward
            roll_back()
            return None
        return cuts.pop()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Decode one token (``token``: one id, a tensor on the model's device, e.g. [1, 1]).
        Returns the logits [1, 1, vocab] of the next position (a static buffer after a replay).
        Enqueues work only: no host sync."""
        self.ids.copy_(token.reshape(1, 1), non_blocking=True)
        if self.reason is None:
            cuts = self._prepare_all()
            if cuts is None and self._stale():
                log.info("qllm: graph decode: a layer buffer was reallocated; rebuilding the decode steps "
                         "and capturing the graph again")
                self._build_steps()
                cuts = self._prepare_all()
            if cuts is not None:
                if self.graph is None:
                    return self._warm_up_and_capture()
                # a cut token implies the cut graph: _cuts_ok (allow_cut) is cleared when its capture fails
                graph, logits = (self.cut_graph, self._cut_logits) if cuts else (self.graph, self.logits)
                graph.replay()
                self.cache.n_seen += 1  # the patched forward's bookkeeping
                self.n_replays += 1
                return logits
        self.n_eager += 1
        return self._forward().logits

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph-mode forward captured (not run) into a new graph: (graph, static logits)."""
        cache = self.cache
        n_seen = cache.n_seen
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph):
                static = self._forward().logits
        finally:
            cache.n_seen = n_seen  # the captured forward ran the wrapper's Python once more
        self.n_captures += 1
        return graph, static

    def _warm_up_and_capture(self) -> torch.Tensor:
        """The prepared token runs once in graph mode on a side stream (a real step: its logits
        are returned), then the same forward is captured (not run): the graph of the tokens that
        cut no block, and when the steps can cut, the cut tokens' graph (the steps' ``cuts``
        flipped while capturing it, then restored)."""
        cache = self.cache
        t0 = time.perf_counter()
        cur = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        cache.decode_steps = self.steps
        cuts_now = next(iter(self.steps.values())).cuts
        try:
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                logits = self._forward().logits
            cur.wait_stream(side)
            logits.record_stream(cur)
            self.n_replays += 1  # decoded by the graph's kernels (eagerly launched)
            for cuts in ([False, True] if self._cuts_ok else [False]):
                for st in self.steps.values():
                    st.cuts = cuts
                try:
                    graph, static = self._capture()
                except Exception as exc:  # noqa: BLE001 -- e.g. a host sync in the model's forward
                    why = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                    if cuts:  # the plain graph stands; cut tokens run eagerly
                        self._cuts_ok = False
                        log_once(logging.WARNING, f"qllm: tokens that cut blocks decode eagerly: {why}")
                        break
                    self.reason = why
                    log_once(logging.WARNING, f"qllm: decoding without a CUDA graph: {self.reason}")
                    return logits
                if cuts:
                    self.cut_graph, self._cut_logits = graph, static
                else:
                    self.graph, self.logits = graph, static
        finally:
            for st in self.steps.values():
                st.cuts = cuts_now
            cache.decode_steps = None
            self.capture_s += time.perf_counter() - t0
        return logits
