"""QLLMConfig: the knobs of query-aware context memory, with the paper's names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["QLLMConfig", "STRATEGIES"]

STRATEGIES = ("qllm", "infllm", "streaming", "full")


@dataclass(frozen=True)
class QLLMConfig:
    """Configuration of query-aware context memory (DESIGN §2-§7).

    Parameters
    ----------
    n_init : int
        Tokens at the start of the text kept forever ("attention sinks").
    n_local : int
        Sliding-window size: every query sees the last ``n_local`` keys with
        ordinary relative positions.
    block_size : int
        Tokens per memory block.
    topk : int
        Memory blocks retrieved per execution block (and per layer).
    repr_topk : int
        Tokens averaged into each block representative (and into the question
        vector).
    exc_block_size : int
        Queries per execution block during prefill (decode uses 1).
    question_weight : float
        ``w``: weight of the question term of the block score (see
        :mod:`qllm.retrieval`).
    question_heads : "auto", None or tuple of (layer, query head) pairs
        How the question scores blocks.  ``None``: the paper's term
        ``w * sum_h Q_h.r_bh`` on the block representatives.  Pairs: those
        heads (the model's retrieval heads) score every key of a block
        against every question token, standardised across blocks (see
        :mod:`qllm.retrieval`).  ``"auto"`` (default): the pairs calibrated
        for this model if qllm ships a calibration for it (:mod:`qllm.heads`),
        else ``None`` -- logged either way.
    strategy : {"qllm", "infllm", "streaming", "full"}
        ``qllm``: retrieval scored by the queries and the question;
        ``infllm``: same with ``w = 0`` (question ignored);
        ``streaming``: init + local window only (no memory blocks);
        ``full``: the unpatched model (dense attention, ordinary cache).
    device_blocks : int or None
        Compute-device block budget per layer.  ``None`` (default): every
        memory block's K/V stays on the compute device.  ``N``: at most ``N``
        blocks per layer stay in the compute-device pool; the others are kept
        in host memory (pinned when the device is CUDA) and copied back when
        retrieved, evicting the least recently retrieved (or cut) block.
        Representatives and retrieval stay on the device, so the budget
        changes where blocks live, never which blocks are retrieved or the
        output.  ``qllm`` / ``infllm`` need ``N >= topk`` (the blocks one
        execution block retrieves sit on the device together); other
        strategies keep no blocks and ignore it.  On the CUDA fast path
        (float16/bfloat16, head_dim 64/128) it needs a power-of-two
        ``block_size`` (else the generic torch path runs, logged): the K/V
        store there becomes init + a ring of recent tokens, blocks sit in a
        device cache of ``N`` slots managed on the device and in a pinned
        host tier holding every block (qllm/gpu.py); the GPU memory then no
        longer grows with the text, the host memory does (K/V bytes of every
        cut block).
    chunk_size : int
        Prefill is fed through the model in chunks of this many tokens (bounds
        activation memory for texts of any length).
    max_question_tokens : int or None
        Longest question accepted (default: ``n_local``).
    fused_kernels : bool
        ``True`` (default): ``patch`` also gives the model's Llama-style RMSNorms and SiLU MLPs
        fused CUDA kernels, and its plain pre-norm decoder layers the residual adds inside the
        o_proj / down_proj GEMMs (:mod:`qllm.fused`; they run for CUDA float16 / bfloat16 inputs,
        elsewhere the modules' own forwards run, logged), for every strategy.
    """

    n_init: int = 128
    n_local: int = 1024
    block_size: int = 128
    topk: int = 8
    repr_topk: int = 4
    exc_block_size: int = 512
    question_weight: float = 4.0
    question_heads: object = "auto"
    strategy: str = "qllm"
    device_blocks: int | None = None
    chunk_size: int = 8192
    max_question_tokens: int | None = None
    fused_kernels: bool = True

    def __post_init__(self) -> None:
        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"QLLMConfig.{name}: expected an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"QLLMConfig.{name}: expected >= {lo}, got {v}")

        _int("n_init", 0)
        _int("n_local", 1)
        _int("block_size", 1)
        _int("topk", 0)
        _int("repr_topk", 1)
        _int("exc_block_size", 1)
        _int("chunk_size", 1)
        if self.device_blocks is not None:
            _int("device_blocks", 0)
            if self.device_blocks > 2**31 - 1:
                raise ValueError(f"QLLMConfig.device_blocks: expected <= 2**31 - 1, got {self.device_blocks}")
        if self.max_question_tokens is not None:
            _int("max_question_tokens", 1)
            if self.max_question_tokens > self.n_local:
                raise ValueError(f"QLLMConfig.max_question_tokens: expected <= n_local ({self.n_local}): "
                                 f"the question is encoded inside one window, got {self.max_question_tokens}")
        if not isinstance(self.fused_kernels, bool):
            raise TypeError(f"QLLMConfig.fused_kernels: expected a bool, got {type(self.fused_kernels).__name__}")
        w = self.question_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"QLLMConfig.question_weight: expected a float, got {type(w).__name__}")
        if not math.isfinite(float(w)):
            raise ValueError(f"QLLMConfig.question_weight: expected a finite number, got {w}")
        qh = self.question_heads
        if not (qh is None or (isinstance(qh, str) and qh == "auto")):
            try:
                pairs = tuple((l, h) for l, h in qh)
            except (TypeError, ValueError):
                raise TypeError("QLLMConfig.question_heads: expected 'auto', None or a sequence of "
                                f"(layer, head) pairs, got {qh!r}") from None
            for l, h in pairs:
                for v in (l, h):
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise ValueError("QLLMConfig.question_heads: expected (layer, head) pairs of ints "
                                         f">= 0, got {(l, h)!r}")
            if not pairs:
                raise ValueError("QLLMConfig.question_heads: expected at least one (layer, head) pair "
                                 "(None selects the representative-based question term)")
            if len(set(pairs)) != len(pairs):
                raise ValueError(f"QLLMConfig.question_heads: duplicate pairs in {pairs}")
            object.__setattr__(self, "question_heads", tuple(sorted(pairs)))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"QLLMConfig.strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy in ("qllm", "infllm") and self.topk < 1:
            raise ValueError(f"QLLMConfig.topk: strategy {self.strategy!r} needs topk >= 1, got {self.topk}")
        if self.device_blocks is not None and self.uses_blocks and self.device_blocks < self.topk:
            raise ValueError(f"QLLMConfig.device_blocks: expected >= topk ({self.topk}) for strategy "
                             f"{self.strategy!r}: the topk blocks one execution block retrieves must all be "
                             f"on the compute device at once, got {self.device_blocks}")

    # -- derived ---------------------------------------------------------
    @property
    def uses_blocks(self) -> bool:
        """Whether memory blocks are kept and retrieved (qllm / infllm)."""
        return self.strategy in ("qllm", "infllm")

    @property
    def uses_question(self) -> bool:
        return self.strategy == "qllm" and self.question_weight != 0.0

    @property
    def question_limit(self) -> int:
        return self.max_question_tokens if self.max_question_tokens is not None else self.n_local

    @property
    def max_rel_position(self) -> int:
        """Largest RoPE position used (relative positions inside the recent segment)."""
        return max(self.n_init, self.block_size) + self.n_local + self.exc_block_size

    def replace(self, **changes) -> "QLLMConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def small(cls, **changes) -> "QLLMConfig":
        """The small budget of DESIGN §7 (small models, CPU tests)."""
        base = dict(n_init=128, n_local=256, block_size=64, topk=4, repr_topk=4, exc_block_size=256,
                    question_weight=2.0)
        base.update(changes)
        return cls(**base)
