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


# =====================================================================
# The whole attention algorithm of one layer (DESIGN §2-§6)
# =====================================================================
#
# Written from the specification below, independently of qllm.attention /
# qllm.memory / qllm.retrieval: one query at a time, with the explicit list of
# keys it sees and the positions at which they are rotated.  float64
# throughout; loops over queries are intentional.

__all__ += ["reference_attention", "reference_question", "rope_ref", "causal_attention_ref"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_ref(x: torch.Tensor, pos, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: ``x * cos[pos] + rotate_half(x) * sin[pos]``.

    x [..., D]; pos an int (one position for all of x) or a LongTensor matching
    x's second-to-last dim (one position per row).
    """
    c, s = cos[pos], sin[pos]
    return x * c + _rotate_half(x) * s


def causal_attention_ref(q, k, v, *, cos, sin, scaling: float) -> torch.Tensor:
    """Plain causal attention with RoPE at the true positions 0..T-1 (GQA).

    q [Hq, T, D], k/v [Hkv, T, D] -> [Hq, T, D] float32.  The dense baseline that
    every text shorter than ``n_init + n_local`` must reproduce.
    """
    q, k, v = q.double(), k.double(), v.double()
    cos, sin = cos.double(), sin.double()
    hq, t, d = q.shape
    group = hq // k.shape[0]
    pos = torch.arange(t)
    out = torch.empty(hq, t, d, dtype=torch.float64)
    for h in range(hq):
        qr = rope_ref(q[h], pos, cos, sin)
        kr = rope_ref(k[h // group], pos, cos, sin)
        for p in range(t):
            logits = (kr[: p + 1] @ qr[p]) * scaling
            out[h, p] = torch.softmax(logits, dim=0) @ v[h // group, : p + 1]
    return out.float()


def _top_indices(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest values (all if fewer), ties toward the lower index."""
    vals = values.tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return order[: min(k, len(vals))]


def _boundary_gap(values: torch.Tensor, k: int) -> float:
    """Gap between the k-th and (k+1)-th largest value (inf when nothing is cut off).

    A selection whose gap is tiny is decided by rounding, not by the algorithm:
    tests use it to tell a real disagreement from a near-tie.
    """
    if k >= values.numel() or k <= 0:
        return float("inf")
    s = torch.sort(values.double(), descending=True).values
    return float(s[k - 1] - s[k])


def _execution_blocks(total: int, segments, exc_block_size: int) -> list[tuple[int, int]]:
    """Rule 1: each forward call (segment) is cut into blocks of exc_block_size
    consecutive tokens, the last one shorter.  Returns [start, end) pairs."""
    if segments is None:
        segments = [total]
    blocks, start = [], 0
    for n in segments:
        n = int(n)
        if n <= 0:
            raise ValueError(f"segments: expected positive lengths, got {list(segments)}")
        for a in range(start, start + n, exc_block_size):
            blocks.append((a, min(a + exc_block_size, start + n)))
        start += n
    if start != total:
        raise ValueError(f"segments: lengths sum to {start}, the text has {total} tokens")
    return blocks


def _zscore(x: torch.Tensor) -> torch.Tensor:
    mu = x.mean()
    sd = float(((x - mu) ** 2).mean().sqrt())
    return (x - mu) / max(sd, 1e-6)


def reference_attention(q, k, v, *, config, cos, sin, scaling: float, question=None, segments=None,
                        question_q=None, question_heads=(), lower_head_scores=(), later_head_scores=()):
    """Slow reference of qllm's attention for one layer and one sequence.

    Parameters
    ----------
    q : [Hq, T, D]; k, v : [Hkv, T, D] -- un-rotated (no RoPE applied yet).
        GQA: query head h reads KV head h // (Hq / Hkv).
    config : qllm.QLLMConfig (n_init, n_local, block_size, topk, repr_topk,
        exc_block_size, question_weight, strategy).
    cos, sin : [P, D] tables of the model's rotary module for positions 0..P-1,
        P >= n_init + n_local.
    scaling : softmax scale.
    question : [Hq, D] question vectors (rule 7, see :func:`reference_question`)
        or None.  Used only by strategy "qllm".
    segments : lengths of the forward calls the text arrives in (default [T]).
    question_q : [Hq, Lq, D] un-rotated queries of the question tokens (for
        question heads), or None.
    question_heads : query heads of this layer that are question heads (rule 6b).
    lower_head_scores : per question head of an earlier layer, its raw score
        per block (1-D, at least as long as this text's block count; rule 6b).
    later_head_scores : the same for the question heads of later layers (rule 6c).

    Returns
    -------
    out : [Hq, T, D] float32
    info : dict with
        "retrieved"     list, per execution block, of the retrieved block ids (ascending; [] when none)
        "exec_blocks"   list of (start, end) of every execution block
        "reprs"         [n_blocks, Hq, D] float32 block representatives
        "scores"        [Hq, T] float64 final token scores
        "block_starts"  text position of each block's first token
        "retrieval_gap" smallest gap between the last retrieved and the first
                        not-retrieved block score (inf when no choice was made)
        "repr_gap"      smallest gap at the repr_topk boundary of token scores
        "head_scores"   per question head of this layer, its raw score per block (1-D float64)

    The specification, rule by rule (positions are 0-based text positions):

    1. The text arrives as forward calls ("segments"); each is processed in
       execution blocks of ``exc_block_size`` consecutive tokens (last shorter).
    2. Query p sees keys j <= p.  Key j is
       LOCAL   if p - j < n_local, or p < n_init + n_local (short text: plain
               causal attention).  logit = rope(q_p, p - T0) . rope(k_j, j - T0) * scaling
               for any common offset T0 (only p - j matters); here T0 = the
               smallest local key of p, so positions stay < n_init + n_local.
       MEMORY  otherwise, attended iff (a) j < n_init, or (b) j is in a block
               retrieved for this execution block, or (c) j is in no block yet
               (the remainder).  Streaming: (a) only.
               logit = q_fix_p . k_j * scaling, q_fix_p = rope(q_p, n_local - 1) * cos[0]
               (memory keys at position 0, the query just older than the window;
               cos[0] carries the model's attention scaling).
       One softmax over all attended keys of p; output = sum prob * v.
    3. After each execution block (n_seen = tokens processed): while
       n_seen < n_init + n_local nothing leaves the window.  Then tokens
       n_init <= j < n_seen - n_local are out of window; while >= block_size of
       them are in no block, the oldest block_size form the next block (block b
       = positions n_init + b*block_size ...).  Streaming makes no blocks.
    4. Token score (h, j) = sum over processed queries p for which j was LOCAL
       of prob_h(p, j).
    5. Representative (b, h) = mean of k_j (KV head of h) over the repr_topk
       tokens of block b with the highest score for head h (ties: lower j).
    6. Retrieval (qllm / infllm, once a block exists), per execution block with
       queries P: qbar_h = mean_{p in P} q_fix_p[h];
       s_b = sum_h qbar_h . r_bh + w * sum_h Q_h . r_bh (question term: qllm
       with a question only); the topk highest s_b (ties: lower b).  All
       queries of the block use the same retrieved blocks.
    6b. Question heads (qllm with a question, when this layer has question
       heads or earlier layers do): when block b is cut, each question head h
       of this layer scores it c_bh = max over question tokens t and block
       tokens j of q_fix(question t)[h] . k_j (no scaling).  Then
       s_b = z(sum_h qbar_h . r_bh)_b + w * mean over all question heads
       (this layer's and ``lower_head_scores``) of z(c)_b, where z
       standardises over the existing blocks b (population std, floored at
       1e-6); the Q_h . r_bh term is not used.
    6c. Question heads of later layers (``later_head_scores``): in a forward
       pass a later layer has scored the blocks that existed when the pass
       (segment) began.  So for an execution block at which no block has been
       cut since its segment began, the mean in 6b also runs over the later
       layers' heads; otherwise over this layer's and earlier ones only (none
       at all: rule 6).  A one-token decode step thus uses every question head.
    7. (reference_question) Question vector Q_h.
    """
    cfg = config
    if cfg.strategy not in ("qllm", "infllm", "streaming"):
        raise ValueError(f"reference_attention: strategy {cfg.strategy!r} has no memory (use dense attention)")
    q, k, v = q.double(), k.double(), v.double()
    cos, sin = cos.double(), sin.double()
    hq, t, d = q.shape
    hkv = k.shape[0]
    if hq % hkv:
        raise ValueError("reference_attention: Hq must be a multiple of Hkv")
    group = hq // hkv
    kv_head = [h // group for h in range(hq)]
    if cos.shape[0] < cfg.n_init + cfg.n_local:
        raise ValueError("reference_attention: cos/sin need at least n_init + n_local positions")
    n_init, n_local, bs = cfg.n_init, cfg.n_local, cfg.block_size
    uses_blocks = cfg.strategy in ("qllm", "infllm")
    use_question = cfg.strategy == "qllm" and (question is not None or question_q is not None)
    if question is not None:
        question = question.double()
    use_heads = use_question and (len(question_heads) > 0 or len(lower_head_scores) > 0
                                  or len(later_head_scores) > 0)
    if use_heads:
        if question_heads and question_q is None:
            raise ValueError("reference_attention: question_heads need question_q")
        qq_fix = None
        if question_q is not None:  # rule 6b: fixed-position question queries [Hq, Lq, D]
            qq = question_q.double()
            qq_fix = torch.stack([rope_ref(qq[:, t], n_local - 1, cos, sin) * cos[0]
                                  for t in range(qq.shape[1])], dim=1)
    own_scores: list[list[float]] = [[] for _ in question_heads]

    # k, v per query head (GQA): K[h] is the KV head of query head h.
    K = k[kv_head]  # [Hq, T, D]
    V = v[kv_head]

    def q_fix(p: int) -> torch.Tensor:  # rule 2: [Hq, D]
        return rope_ref(q[:, p], n_local - 1, cos, sin) * cos[0]

    out = torch.zeros(hq, t, d, dtype=torch.float64)
    scores = torch.zeros(hq, t, dtype=torch.float64)
    block_starts: list[int] = []           # rule 3
    reprs: list[torch.Tensor] = []         # rule 5, one [Hq, D] per block
    retrieved_log: list[list[int]] = []
    retrieval_gap = float("inf")
    repr_gap = float("inf")
    exec_blocks = _execution_blocks(t, segments, cfg.exc_block_size)
    seg_starts, pos = set(), 0
    for n in (segments if segments is not None else [t]):
        seg_starts.add(pos)
        pos += int(n)
    nb_at_segment = 0  # blocks that existed when the current segment began (rule 6c)

    for a, e in exec_blocks:
        if a in seg_starts:
            nb_at_segment = len(block_starts)
        # ---- rule 6: retrieval, from the blocks cut before this execution block
        retrieved: list[int] = []
        if uses_blocks and block_starts:
            qbar = torch.stack([q_fix(p) for p in range(a, e)]).mean(dim=0)  # [Hq, D]
            R = torch.stack(reprs)                                           # [nb, Hq, D]
            s = (R * qbar).sum(dim=(1, 2))
            nb = len(block_starts)
            cols = []
            if use_heads:
                cols = [torch.as_tensor(c, dtype=torch.float64)[:nb] for c in lower_head_scores]
                cols += [torch.tensor(c[:nb], dtype=torch.float64) for c in own_scores]
                if nb == nb_at_segment:  # rule 6c
                    cols += [torch.as_tensor(c, dtype=torch.float64)[:nb] for c in later_head_scores]
            if cols:
                c_mean = torch.stack([_zscore(c) for c in cols]).mean(dim=0)
                s = _zscore(s) + float(cfg.question_weight) * c_mean
            elif question is not None and cfg.strategy == "qllm":
                s = s + float(cfg.question_weight) * (R * question).sum(dim=(1, 2))
            retrieved = sorted(_top_indices(s, cfg.topk))
            retrieval_gap = min(retrieval_gap, _boundary_gap(s, cfg.topk))
        retrieved_log.append(retrieved)
        in_a_block = set()
        for b0 in block_starts:
            in_a_block.update(range(b0, b0 + bs))
        in_retrieved = set()
        for b in retrieved:
            in_retrieved.update(range(block_starts[b], block_starts[b] + bs))

        # ---- rule 2: attention, one query at a time
        for p in range(a, e):
            short = p < n_init + n_local
            local_keys = [j for j in range(p + 1) if short or p - j < n_local]
            memory_keys = []
            for j in range(p + 1):
                if short or p - j < n_local:
                    continue
                if j < n_init:                                   # (a) init
                    memory_keys.append(j)
                elif uses_blocks and j in in_retrieved:          # (b) retrieved block
                    memory_keys.append(j)
                elif uses_blocks and j not in in_a_block:        # (c) remainder
                    memory_keys.append(j)
            T0 = local_keys[0]
            lk = torch.tensor(local_keys, dtype=torch.long)
            # local logits at relative positions: query at p - T0, key j at j - T0
            q_loc = rope_ref(q[:, p], p - T0, cos, sin)                      # [Hq, D]
            k_loc = rope_ref(K[:, lk], lk - T0, cos, sin)                    # [Hq, nl, D]
            logits_local = (k_loc @ q_loc.unsqueeze(-1)).squeeze(-1) * scaling  # [Hq, nl]
            if memory_keys:
                mk = torch.tensor(memory_keys, dtype=torch.long)
                logits_mem = (K[:, mk] @ q_fix(p).unsqueeze(-1)).squeeze(-1) * scaling  # [Hq, nm]
            else:
                mk = torch.zeros(0, dtype=torch.long)
                logits_mem = torch.zeros(hq, 0, dtype=torch.float64)
            probs = torch.softmax(torch.cat([logits_local, logits_mem], dim=1), dim=1)
            p_local, p_mem = probs[:, : len(local_keys)], probs[:, len(local_keys):]
            out[:, p] = (p_local.unsqueeze(-1) * V[:, lk]).sum(1) + (p_mem.unsqueeze(-1) * V[:, mk]).sum(1)
            # ---- rule 4: token scores of the local keys
            scores[:, lk] += p_local

        # ---- rule 3: cut blocks after the execution block
        n_seen = e
        if uses_blocks and n_seen >= n_init + n_local:
            while True:
                first_free = n_init + len(block_starts) * bs  # oldest token in no block
                out_of_window_end = n_seen - n_local           # tokens < this left the window
                if out_of_window_end - first_free < bs:
                    break
                block_starts.append(first_free)
                # ---- rule 5: representative per query head
                toks = list(range(first_free, first_free + bs))
                r = torch.empty(hq, d, dtype=torch.float64)
                for h in range(hq):
                    sc = scores[h, toks]
                    top = _top_indices(sc, cfg.repr_topk)
                    r[h] = K[h, [toks[i] for i in top]].mean(dim=0)
                    repr_gap = min(repr_gap, _boundary_gap(sc, cfg.repr_topk))
                reprs.append(r)
                if use_heads:  # rule 6b: this layer's question heads score the new block
                    for i, h in enumerate(question_heads):
                        own_scores[i].append(float((K[h, toks] @ qq_fix[h].T).max()))

    info = {
        "retrieved": retrieved_log,
        "exec_blocks": exec_blocks,
        "reprs": (torch.stack(reprs).float() if reprs else torch.zeros(0, hq, d)),
        "scores": scores,
        "block_starts": block_starts,
        "retrieval_gap": retrieval_gap,
        "repr_gap": repr_gap,
        "head_scores": [torch.tensor(c, dtype=torch.float64) for c in own_scores],
    }
    return out.float(), info


def reference_question(q, k, *, config, cos, sin, scaling: float, return_gap: bool = False):
    """Question vectors (rule 7) -> [Hq, D] float32.

    q [Hq, Lq, D], k [Hkv, Lq, D]: the question's un-rotated queries/keys, from
    the question run alone through the layer as a fresh text (Lq <= n_local).
    The question attends to itself with plain causal attention at positions
    0..Lq-1 (all keys LOCAL); token score (h, j) = sum over queries p >= j of
    prob_h(p, j).  Q_h = mean of q_fix (rope(q, n_local - 1) * cos[0]) over the
    repr_topk question tokens with the highest score for head h (ties: earlier
    token).  With ``return_gap`` also returns the smallest score gap at the
    selection boundary.
    """
    cfg = config
    q, k = q.double(), k.double()
    cos, sin = cos.double(), sin.double()
    hq, n, d = q.shape
    if n > cfg.n_local:
        raise ValueError(f"reference_question: {n} tokens, at most n_local={cfg.n_local}")
    group = hq // k.shape[0]
    K = k[[h // group for h in range(hq)]]
    pos = torch.arange(n)
    scores = torch.zeros(hq, n, dtype=torch.float64)
    for p in range(n):
        keys = torch.arange(p + 1)
        q_p = rope_ref(q[:, p], p, cos, sin)                 # [Hq, D]
        k_r = rope_ref(K[:, keys], pos[keys], cos, sin)      # [Hq, p+1, D]
        probs = torch.softmax((k_r @ q_p.unsqueeze(-1)).squeeze(-1) * scaling, dim=1)
        scores[:, keys] += probs
    qf = rope_ref(q, cfg.n_local - 1, cos, sin) * cos[0]     # [Hq, n, D]
    vec = torch.empty(hq, d, dtype=torch.float64)
    gap = float("inf")
    for h in range(hq):
        top = _top_indices(scores[h], cfg.repr_topk)
        vec[h] = qf[h, top].mean(dim=0)
        gap = min(gap, _boundary_gap(scores[h], cfg.repr_topk))
    return (vec.float(), gap) if return_gap else vec.float()
