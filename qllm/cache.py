"""QLLMCache: the per-sequence memory of a patched model, as a transformers Cache.

It subclasses ``DynamicCache`` so that ``generate`` and the model code treat it
like any cache; layers that qllm patches keep their state in ``LayerMemory``
objects instead of the cache's K/V lists (unpatched layers -- e.g. Gemma3's
sliding-window layers -- use the ordinary cache layers).
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from . import gpu
from ._log import log_once
from .memory import LayerMemory

__all__ = ["QLLMCache"]



class QLLMCache(DynamicCache):
    """Cache object holding one ``LayerMemory`` per patched layer.

    Parameters
    ----------
    handle : the patch handle of the model (``model._qllm``).
    """

    def __init__(self, handle) -> None:
        try:
            super().__init__(config=handle.text_config)
        except TypeError:  # older signature
            super().__init__()
        self._qllm = handle
        self.memories: dict[int, LayerMemory] = {}
        self.n_seen = 0
        self.mode = "text"  # "text" | "question"
        self.question_ids: torch.Tensor | None = None  # 1-D token ids of the question, once encoded
        self.has_question = False
        self.relevance = None  # qllm.retrieval.QuestionRelevance when question heads are in use
        # tokens to reserve in each CUDA layer memory when it is created (prompt + new tokens: a
        # graph decoder needs stores that are not reallocated while it decodes); 0 = not chosen yet:
        # the patched model's first call sets it to that call's tokens + a decode margin
        self.reserve_tokens = 0
        # a device block budget for this sequence's layer memories in place of the patch's
        # QLLMConfig.device_blocks (None: the patch's); set by qllm.generate when the text's K/V
        # would not fit the GPU (qllm.gpu.auto_device_blocks)
        self.device_blocks: int | None = None
        # graph decode mode: {layer: qllm.gpu.CudaDecodeStep}, set by qllm.gpu.GraphDecoder only while
        # it runs the model in that mode (warm-up and capture); patched layers then launch the step
        self.decode_steps: dict | None = None

    # -- transformers Cache API -----------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0, *args, **kwargs) -> int:  # noqa: D401
        """Tokens of text seen so far."""
        return self.n_seen

    # -- qllm -------------------------------------------------------------
    @property
    def config(self):
        """The configuration of this sequence's layer memories: the patch's, with
        :attr:`device_blocks` in place of its budget when set."""
        cfg = self._qllm.config
        return cfg if self.device_blocks is None else cfg.replace(device_blocks=self.device_blocks)

    def memory(self, layer_idx: int, n_q_heads: int, n_kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device) -> LayerMemory:
        mem = self.memories.get(layer_idx)
        if mem is None:
            cls = LayerMemory
            cfg = self.config
            if self.mode == "text" and gpu.supports(dtype, device, head_dim):
                why = gpu.tiers_unsupported(cfg) if cfg.device_blocks is not None and cfg.uses_blocks else None
                if why is not None:
                    log_once(logging.WARNING,
                             f"qllm: QLLMConfig.device_blocks={cfg.device_blocks} on the CUDA fast path needs a "
                             f"power-of-two block_size ({why}): layers run the generic torch path instead (slower)")
                else:
                    cls = gpu.CudaLayerMemory  # fast path: preallocated device state, one op per call
            if cls is gpu.CudaLayerMemory and self.reserve_tokens > 0:
                mem = cls(cfg, n_q_heads, n_kv_heads, head_dim, dtype, device, capacity=self.reserve_tokens)
            else:
                mem = cls(cfg, n_q_heads, n_kv_heads, head_dim, dtype, device)
            mem.layer_idx = layer_idx  # question heads: both memory classes take them
            mem.relevance = self.relevance
            self.memories[layer_idx] = mem
        return mem

    def nbytes(self) -> int:
        """Bytes held by all layer memories (device and host tiers)."""
        return sum(m.nbytes() for m in self.memories.values())

    def host_nbytes(self) -> int:
        """Bytes of the layer memories' host tiers (``QLLMConfig.device_blocks``; 0 without)."""
        return sum(m.host_nbytes() for m in self.memories.values())

    def retrieved_blocks(self) -> dict[int, list[int]]:
        """Per layer, the block ids retrieved for the last execution block."""
        return {i: ([] if m.last_retrieved is None else m.last_retrieved.tolist())
                for i, m in sorted(self.memories.items())}
