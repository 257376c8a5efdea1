"""Attention of one execution block over local window + memory (DESIGN §3, §4).

For a query at text position ``p`` and a key at position ``j <= p``:

* **local** when ``p - j < n_local`` -- or when ``p < n_init + n_local`` (the
  text is still short: ordinary causal attention) -- with ordinary relative
  RoPE positions;
* **memory** otherwise: init tokens, the retrieved blocks, and the remainder
  (tail tokens outside the window).  Memory keys sit at position 0 and the
  query is rotated as at position ``n_local - 1``.  Streaming keeps only the
  init tokens as memory.

Local and memory logits form one softmax (exactly as if concatenated).  The
mass each key receives while local is added to its token score.
"""

from __future__ import annotations

import torch

from .config import QLLMConfig
from .memory import LayerMemory
from .retrieval import question_vector, select_blocks

__all__ = ["RopeTable", "apply_rope", "attend", "encode_question"]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [..., T, D] with cos/sin [T, D] (or [D]) -> new tensor.

    Same as ``x * cos + cat(-x2, x1) * sin`` with ``x = cat(x1, x2)``, without the cat.
    """
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1)
    o1.addcmul_(x2, sin[..., :h], value=-1.0)
    torch.mul(x2, cos[..., h:], out=o2)
    o2.addcmul_(x1, sin[..., h:])
    return out


class RopeTable:
    """cos/sin of positions ``0 .. n-1`` from the model's own rotary module.

    The rotary module carries the model's RoPE variant and scaling (llama3,
    yarn, longrope, attention scaling); positions stay small, so float32 angles
    are exact enough.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos = cos.float()  # [n, D]
        self.sin = sin.float()

    @classmethod
    def from_module(cls, rotary: torch.nn.Module, n: int, head_dim: int, device, layer_type=None) -> "RopeTable":
        x = torch.zeros(1, 1, head_dim, dtype=torch.float32, device=device)
        pos = torch.arange(n, device=device).unsqueeze(0)
        with torch.no_grad():
            if layer_type is not None:
                cos, sin = rotary(x, pos, layer_type=layer_type)
            else:
                cos, sin = rotary(x, pos)
        return cls(cos[0], sin[0])

    def __len__(self) -> int:
        return self.cos.shape[0]


def attend(mem: LayerMemory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           rope: RopeTable, scaling: float) -> torch.Tensor:
    """Process one forward call's tokens through the layer memory.

    q  [n_q_heads, T, head_dim], k, v [n_kv_heads, T, head_dim]: un-rotated.
    Returns the attention output [n_q_heads, T, head_dim] in q's dtype.
    The tokens are processed in execution blocks of ``exc_block_size``.
    """
    E = mem.config.exc_block_size
    T = q.shape[1]
    if T <= E:
        return _exec_block(mem, q, k, v, rope, scaling)
    outs = [_exec_block(mem, q[:, s:s + E], k[:, s:s + E], v[:, s:s + E], rope, scaling)
            for s in range(0, T, E)]
    return torch.cat(outs, dim=1)


def _fixed_query(q: torch.Tensor, rope: RopeTable, n_local: int) -> torch.Tensor:
    """Queries rotated as at position n_local-1, scaled like a key at position 0 (cos[0])."""
    return apply_rope(q, rope.cos[n_local - 1], rope.sin[n_local - 1]) * rope.cos[0]


def _exec_block(mem: LayerMemory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: RopeTable, scaling: float, q_fix: torch.Tensor | None = None) -> torch.Tensor:
    cfg: QLLMConfig = mem.config
    hq, E, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    dev = q.device
    P0, T0 = mem.n_seen, mem.tail_start
    qf = q.float()

    # Recent segment = tail + this block, positions T0 .. P0+E-1 (storage dtype; f32 views for math).
    Rk = torch.cat([mem.tail_k, k.to(mem.dtype)], dim=1)  # [hkv, L, d]
    Rv = torch.cat([mem.tail_v, v.to(mem.dtype)], dim=1)
    Rkf, Rvf = Rk.float(), Rv.float()
    L = Rk.shape[1]
    if L > len(rope):
        raise RuntimeError(f"qllm: recent segment of {L} tokens exceeds the RoPE table ({len(rope)})")
    q_loc = apply_rope(qf, rope.cos[L - E:L], rope.sin[L - E:L])
    k_loc = apply_rope(Rkf, rope.cos[:L], rope.sin[:L])

    p = torch.arange(P0, P0 + E, device=dev).unsqueeze(1)  # [E, 1]
    j = torch.arange(T0, T0 + L, device=dev).unsqueeze(0)  # [1, L]
    dense = p < cfg.n_init + cfg.n_local
    local = (j <= p) & ((p - j < cfg.n_local) | dense)      # [E, L]

    lr = torch.matmul(q_loc.reshape(hkv, g * E, d), k_loc.transpose(1, 2)).view(hkv, g, E, L)
    lr.mul_(scaling).masked_fill_(~local, float("-inf"))

    if q_fix is None:  # a caller that needs them too passes them in (the same values)
        q_fix = _fixed_query(qf, rope, cfg.n_local)  # [hq, E, d]
    q_fix_g = q_fix.reshape(hkv, g * E, d)
    # Tail keys that are memory for some query of the block: j <= P0+E-1-n_local.
    all_dense = P0 + E - 1 < cfg.n_init + cfg.n_local  # host arithmetic: no device sync
    m = 0 if all_dense else max(0, min(L, P0 + E - cfg.n_local - T0))
    if m > 0:
        mem_mask = (j[:, :m] <= p - cfg.n_local) & ~dense
        if not cfg.uses_blocks:
            mem_mask = mem_mask & (j[:, :m] < cfg.n_init)
        lf = torch.matmul(q_fix_g, Rkf[:, :m].transpose(1, 2)).view(hkv, g, E, m).mul_(scaling)
        lr[..., :m] = torch.where(mem_mask, lf, lr[..., :m])

    # Memory outside the tail: init + retrieved blocks.
    mk = [mem.init_k] if mem.init_k.shape[1] else []
    mv = [mem.init_v] if mem.init_v.shape[1] else []
    ids = select_blocks(mem, q_fix.mean(dim=1))
    mem.last_retrieved = ids
    if ids is not None:
        bk, bv = mem.gather_blocks(ids)
        mk.append(bk)
        mv.append(bv)

    # One softmax over [memory | recent], computed in two parts with a shared max.
    mx = lr.amax(dim=-1, keepdim=True)
    if mk:
        Mk = (torch.cat(mk, dim=1) if len(mk) > 1 else mk[0]).float()
        Mv = (torch.cat(mv, dim=1) if len(mv) > 1 else mv[0]).float()
        M = Mk.shape[1]
        lm = torch.matmul(q_fix_g, Mk.transpose(1, 2)).view(hkv, g, E, M).mul_(scaling)
        mx = torch.maximum(mx, lm.amax(dim=-1, keepdim=True))
        lm.sub_(mx).exp_()
        lr.sub_(mx).exp_()
        denom = lm.sum(dim=-1, keepdim=True) + lr.sum(dim=-1, keepdim=True)
        out = torch.matmul(lm.view(hkv, g * E, M), Mv) + torch.matmul(lr.view(hkv, g * E, L), Rvf)
    else:
        lr.sub_(mx).exp_()
        denom = lr.sum(dim=-1, keepdim=True)
        out = torch.matmul(lr.view(hkv, g * E, L), Rvf)
    inv = denom.reciprocal_()  # [hkv, g, E, 1]
    out = out.view(hkv, g, E, d).mul_(inv)

    # Token scores: mass each recent key received from the queries for which it is local.
    lr.mul_(local)
    received = torch.matmul(inv.transpose(-1, -2), lr).reshape(hq, L)
    mem.extend(Rk, Rv, received)
    return out.view(hq, E, d).to(q.dtype)


def encode_question(mem: LayerMemory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    rope: RopeTable, scaling: float, return_fixed: bool = False) -> tuple:
    """Run the question through a fresh memory of the same shape and return
    (attention output [n_q_heads, T, head_dim], question vector [n_q_heads, head_dim] f32),
    and with ``return_fixed`` also the question's fixed-position queries [n_q_heads, T,
    head_dim] f32 (``_fixed_query``: the question-head term needs them; computed once here).

    The question (at most n_local tokens) attends to itself with ordinary
    causal attention; each of its tokens collects the mass it receives.  This is
    ``_exec_block`` on a fresh streaming memory with one execution block of T tokens
    (no init tokens, every key local), written out: the same operations in the same
    order, so bitwise its output and token scores, in about a third of the torch ops
    (the pass is host-bound on the GPU).
    """
    hq, T, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    if T > mem.config.n_local:
        raise ValueError(f"qllm: question of {T} tokens: at most n_local ({mem.config.n_local}) supported")
    qf = q.float()
    kf, vf = k.to(mem.dtype).float(), v.to(mem.dtype).float()
    cos, sin = rope.cos[:T], rope.sin[:T]
    q_loc, k_loc = apply_rope(qf, cos, sin), apply_rope(kf, cos, sin)
    s = torch.matmul(q_loc.reshape(hkv, g * T, d), k_loc.transpose(1, 2)).view(hkv, g, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # key after query
    s.mul_(scaling).masked_fill_(future, float("-inf"))
    s.sub_(s.amax(dim=-1, keepdim=True)).exp_()  # masked entries: exactly 0
    inv = s.sum(dim=-1, keepdim=True).reciprocal_()  # [hkv, g, T, 1]
    out = torch.matmul(s.view(hkv, g * T, T), vf).view(hkv, g, T, d).mul_(inv)
    received = torch.matmul(inv.transpose(-1, -2), s).reshape(hq, T)  # mass each token received
    q_fix = _fixed_query(qf, rope, mem.config.n_local)
    qvec = question_vector(q_fix, received, mem.config)
    out = out.view(hq, T, d).to(q.dtype)
    return (out, qvec, q_fix) if return_fixed else (out, qvec)
