"""Drop-in patching of Hugging Face decoder models.

``qllm.patch(model, config)`` leaves the model's own attention code in charge
of projections, q/k norms and everything else; it only

1. hands each patched attention module identity cos/sin (a forward pre-hook),
   so the module produces un-rotated queries and keys -- RoPE is applied by
   qllm with positions from the model's own rotary module.  The modeling
   module's ``apply_rotary_pos_emb`` is wrapped (while some model is patched)
   to return q, k as they are for those marked identity tensors, instead of
   running its elementwise kernels to multiply by one;
2. routes the attention call to qllm through transformers' AttentionInterface
   (the name ``"qllm"``; unpatched layers are forwarded to the original
   implementation);
3. wraps the decoder's ``forward`` to attach a :class:`QLLMCache`, encode the
   question (alongside the prompt's first chunk, layer by layer: :class:`_QuestionPass`),
   and feed long prompts in chunks;
4. with ``QLLMConfig.fused_kernels`` (all strategies), gives the RMSNorms and
   MLPs fused CUDA kernels (:mod:`qllm.fused`).

``unpatch`` removes all of it; importing qllm changes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import RopeTable, attend, encode_question
from .cache import QLLMCache
from .config import QLLMConfig
from .fused import fuse, residual_in_place, rows_used, unfuse
from .gpu import CudaLayerMemory, attend_cuda
from .heads import resolve_question_heads
from .retrieval import QuestionRelevance

log = logging.getLogger("qllm")

__all__ = ["patch", "unpatch", "patched", "set_question", "record", "is_patched", "PatchHandle"]

ATTN_NAME = "qllm"
_SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


@dataclass
class PatchHandle:
    """Everything ``patch`` changed on one model, so ``unpatch`` can undo it."""

    model: torch.nn.Module
    config: QLLMConfig
    text_config: object
    base: torch.nn.Module
    attn_modules: dict[int, torch.nn.Module]
    orig_attn_impl: str | None
    cache_kw: str
    rotary: torch.nn.Module | None
    rotary_layer_type: str | None
    hooks: list = field(default_factory=list)
    question: dict | None = None  # {"ids": LongTensor} or {"span": (a, b)}
    question_heads: tuple | None = None  # resolved QLLMConfig.question_heads
    progress: Callable[[int, int, QLLMCache], None] | None = None
    recorder: list | None = None
    rope_modules: list = field(default_factory=list)  # model modules whose apply_rotary_pos_emb is wrapped
    _rope: dict = field(default_factory=dict)
    _identity: dict = field(default_factory=dict)  # (shape, dtype, device) -> marked identity cos/sin
    fused: list = field(default_factory=list)  # modules given fused kernels (qllm.fused)
    question_pass: "_QuestionPass | None" = None  # the question's forward running alongside a first call

    def identity_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity cos/sin shaped like the model's (ones, zeros), made once per shape and
        marked so the wrapped ``apply_rotary_pos_emb`` returns q, k untouched (same values as
        rotating by the identity, without its elementwise kernels)."""
        key = (tuple(cos.shape), tuple(sin.shape), cos.dtype, sin.dtype, str(cos.device))
        pair = self._identity.get(key)
        if pair is None:
            pair = (torch.ones_like(cos), torch.zeros_like(sin))
            for t in pair:
                t._qllm_identity = True
            if len(self._identity) > 64:  # many prompt lengths: keep the memory bounded
                self._identity.clear()
            self._identity[key] = pair
        return pair

    def rope(self, device: torch.device) -> RopeTable:
        key = str(device)
        table = self._rope.get(key)
        if table is None:
            hd = next(iter(self.attn_modules.values())).head_dim
            table = RopeTable.from_module(self.rotary, self.config.max_rel_position + 1, hd, device,
                                          self.rotary_layer_type)
            self._rope[key] = table
        return table


# ---------------------------------------------------------------- registry
def _register_attention() -> None:
    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, _qllm_attention)
    # Masks for layers qllm does not patch (e.g. sliding-window layers) are built as for SDPA.
    if ATTN_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _original_attention(module: torch.nn.Module, name: str | None) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if name in (None, "eager"):
        if eager is None:
            raise RuntimeError(f"qllm: no eager attention for {type(module).__name__}")
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _qllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: [B, H, T, D] tensors in, ([B, T, H, D], None) out."""
    handle: PatchHandle | None = kwargs.pop("qllm_handle", None)
    cache: QLLMCache | None = kwargs.pop("qllm_cache", None)
    if handle is None or cache is None:
        # A layer qllm does not patch on a patched model: original implementation.
        h = getattr(module, "_qllm_owner", None)
        fn = _original_attention(module, h.orig_attn_impl if h is not None else "sdpa")
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"qllm: batch size 1 is supported, got {query.shape[0]}")
    if scaling is None:
        scaling = module.head_dim ** -0.5
    q, k, v = query[0], key[0], value[0]
    mem = cache.memory(module.layer_idx, q.shape[0], k.shape[0], q.shape[-1], k.dtype, k.device)
    rope = handle.rope(q.device)
    with torch.no_grad():
        if cache.mode == "question":
            out, qvec, q_fix = encode_question(mem, q, k, v, rope, float(scaling), return_fixed=True)
            mem.question = qvec
            mem.question_tokens = q_fix
        elif isinstance(mem, CudaLayerMemory):
            if cache.decode_steps is not None:  # qllm.gpu.GraphDecoder: warm-up or capture of one token
                out = _launch_decode_step(cache.decode_steps, module.layer_idx, mem, q, k, v, float(scaling))
            else:
                out = attend_cuda(mem, q, k, v, rope, float(scaling))
        else:
            out = attend(mem, q, k, v, rope, float(scaling))
    if handle.recorder is not None:
        handle.recorder.append({"layer": module.layer_idx, "mode": cache.mode, "q": q.detach().clone(),
                                "k": k.detach().clone(), "v": v.detach().clone(), "out": out.detach().clone()})
    return out.transpose(0, 1).unsqueeze(0), None


def _launch_decode_step(steps: dict, layer_idx: int, mem: CudaLayerMemory, q, k, v, scaling: float):
    """Graph decode mode: enqueue the layer's prepared CudaDecodeStep (capturable; no host state
    changes here: ``prepare`` ran before the forward).  The same input handling as attend_cuda."""
    step = steps.get(layer_idx)
    if step is None or step.mem is not mem or q.shape[1] != 1:
        raise RuntimeError(f"qllm: graph decode mode: no decode step for layer {layer_idx} "
                           f"(or not one token: q {tuple(q.shape)})")
    q, k, v = (t if t.dtype == mem.dtype else t.to(mem.dtype) for t in (q, k, v))
    if q.stride(-1) != 1 or q.stride(0) % 8 or q.stride(1) % 8 or q.data_ptr() % 16:
        q = q.contiguous()  # the kernels read rows of 8 elements (16 bytes)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    step.scaling = scaling  # a launch argument: baked into the graph like every other one
    return step.launch(q, k, v)


# ------------------------------------------------------------------- hooks
def _attn_pre_hook(handle: PatchHandle):
    def hook(module, args, kwargs):
        cache = kwargs.pop("cache", None)
        cache2 = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else cache2
        if not isinstance(cache, QLLMCache):
            raise RuntimeError("qllm: patched attention called without a QLLMCache (call the model, not the layer)")
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = handle.identity_rope(cos, sin)
        kwargs["qllm_cache"] = cache
        kwargs["qllm_handle"] = handle
        return args, kwargs
    hook._qllm_keeps_nothing = True  # holds no tensor (qllm.fused may then write layer outputs in place)
    return hook


# tokens beyond the prompt a fresh cache's automatic device budget allows for (decoding)
_DECODE_MARGIN = 4096

# module name -> (original apply_rotary_pos_emb, patched models using the wrapper)
_ROPE_WRAPPED: dict[str, list] = {}


def _wrap_rope(modname: str) -> bool:
    """Wrap ``apply_rotary_pos_emb`` of a modeling module so that the marked identity cos/sin
    of :meth:`PatchHandle.identity_rope` skip it (any other cos/sin: the original function)."""
    mod = sys.modules.get(modname)
    orig = getattr(mod, "apply_rotary_pos_emb", None) if mod is not None else None
    if not callable(orig):
        return False
    entry = _ROPE_WRAPPED.get(modname)
    if entry is not None:
        entry[1] += 1
        return True

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if getattr(cos, "_qllm_identity", False) and getattr(sin, "_qllm_identity", False):
            return q, k
        return orig(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = orig
    apply_rotary_pos_emb.__doc__ = orig.__doc__
    mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    _ROPE_WRAPPED[modname] = [orig, 1]
    return True


def _unwrap_rope(modname: str) -> None:
    entry = _ROPE_WRAPPED.get(modname)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        sys.modules[modname].apply_rotary_pos_emb = entry[0]
        del _ROPE_WRAPPED[modname]


def _find_layers(model: torch.nn.Module):
    base = getattr(model, "base_model", model)
    if hasattr(base, "language_model") and not hasattr(base, "layers"):
        base = base.language_model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"qllm.patch: model: no decoder layers found on {type(model).__name__}")
    return base, layers


def _bad_input(msg: str) -> ValueError:
    return ValueError("qllm: " + msg)


def _wrap_forward(handle: PatchHandle):
    base = handle.base
    orig = type(base).forward.__get__(base)  # the class's forward, bound
    cache_kw = handle.cache_kw

    def forward(*args, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                raise TypeError("qllm: pass decoder inputs other than input_ids by keyword")
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        x = input_ids if input_ids is not None else embeds
        if x is None:
            raise _bad_input("input_ids or inputs_embeds is required")
        if x.shape[0] != 1:
            raise _bad_input(f"input_ids: batch size 1 is supported by qllm, got {x.shape[0]} "
                             "(run sequences one at a time)")
        cache = kwargs.pop(cache_kw, None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None) if cache_kw != "past_key_values" else None
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            cache = QLLMCache(handle)
            # on CUDA, a device block budget when this prompt's layer memories would not fit
            from .generate import _budget_for
            _budget_for(handle.model, cache, x.shape[1] + _DECODE_MARGIN)
        elif not isinstance(cache, QLLMCache):
            raise _bad_input(f"{cache_kw}: expected a qllm cache or an empty one, got a filled "
                             f"{type(cache).__name__} (start the text with a fresh cache)")
        if cache.n_seen == 0 and not cache.memories and cache.reserve_tokens == 0:
            # size the CUDA layer stores for this prompt once: grown chunk by chunk, every layer's
            # K/V would be reallocated and copied ~11 times on the way to 128K tokens
            cache.reserve_tokens = x.shape[1] + _DECODE_MARGIN
        mask = kwargs.get("attention_mask")
        if cache.n_seen == 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            # checked on the prompt only: later steps only append tokens (no host sync per token)
            raise _bad_input("attention_mask: padding is not supported (batch size 1, no padding tokens)")
        qp = None
        if cache.n_seen == 0 and not cache.has_question and cache.mode == "text":
            qp = _question_pass(handle, cache, input_ids)
            alongside = _QUESTION_ALONGSIDE if _QUESTION_ALONGSIDE != "cuda" else qp is not None and qp.ids.is_cuda
            if qp is not None and not alongside:
                qp.finish()
                qp = None
        # the layers' outputs stay inside the layer loop unless hidden states are returned: fused
        # layers may then add their attention residual in place (qllm.fused.residual_in_place)
        private = not (kwargs.get("output_hidden_states") or getattr(handle.text_config, "output_hidden_states", False))
        if qp is None:
            with residual_in_place(private):
                return _prompt(kwargs, cache, input_ids, x)
        if handle.question_pass is not None:
            raise RuntimeError("qllm: a question pass is already running on this model (calls from two threads?)")
        handle.question_pass = qp  # the decoder-layer pre-hooks run it alongside the first chunk
        try:
            with residual_in_place(private):
                return _prompt(kwargs, cache, input_ids, x, qp)
        finally:
            handle.question_pass = None
            if not qp.done:  # the prompt call failed before the question's forward ended
                qp.abort()

    def _prompt(kwargs, cache, input_ids, x, qp=None):
        kwargs["use_cache"] = True
        T = x.shape[1]
        cs = handle.config.chunk_size
        keep = _KEEP.get() if _TRIM_LAST_LAYER else None
        last = _find_layers(handle.model)[1][-1] if keep is not None else None

        def run(kw, s, n):
            used = _rows_kept(keep, T, s, n)
            if used is None:
                return orig(**kw, **{cache_kw: cache})
            with rows_used(last, used):  # the last layer: past its attention, only the rows kept
                return orig(**kw, **{cache_kw: cache})

        if T <= cs:
            out = run(kwargs, 0, T)
            if qp is not None:
                qp.finish()
            cache.n_seen += T
            return out
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise _bad_input(f"output_hidden_states/output_attentions with a prompt longer than "
                             f"chunk_size={cs} tokens is not supported")
        key = "input_ids" if input_ids is not None else "inputs_embeds"
        # one [1, T, hidden] buffer, filled chunk by chunk (no concatenation copy); when the caller
        # keeps only the last `keep` positions (_KEEP: the causal LM slices its logits' rows from the
        # end), only those: [1, keep, hidden]
        hidden, out = None, None
        lo = 0 if keep is None else max(0, T - keep)  # first position held in the buffer
        t0 = time.perf_counter()
        for s in range(0, T, cs):
            kw = dict(kwargs)
            kw[key] = x[:, s:s + cs]
            kw.pop("attention_mask", None)
            kw.pop("position_ids", None)
            out = run(kw, s, kw[key].shape[1])
            if qp is not None:
                qp.finish()
                qp = None
            cache.n_seen += kw[key].shape[1]
            h = out.last_hidden_state
            if hidden is None:
                hidden = h.new_empty(h.shape[0], T - lo, *h.shape[2:])
            a = max(s, lo)
            if a < s + h.shape[1]:
                hidden[:, a - lo:s + h.shape[1] - lo].copy_(h[:, a - s:])
            out.last_hidden_state = None
            if handle.progress is not None:
                handle.progress(min(s + cs, T), T, cache)
        log.debug("qllm: prefill %d tokens in %.2fs", T, time.perf_counter() - t0)
        out.last_hidden_state = hidden
        return out

    return forward


def _rows_kept(keep: int | None, T: int, s: int, n: int) -> int | None:
    """Of a call's T positions whose last ``keep`` the caller uses (None: all), how many of the
    chunk s .. s+n-1 are used: the trailing ones; None when all n are."""
    if keep is None:
        return None
    used = max(0, min(n, s + n - (T - keep)))
    return None if used >= n else used


# The trailing positions of the current top-level call whose outputs its caller uses (the causal
# LM's int ``logits_to_keep`` > 0, no hidden states / labels), set by _wrap_top; None: all.
_KEEP: contextvars.ContextVar = contextvars.ContextVar("qllm_keep", default=None)

# Whether the last decoder layer (a fused one, on CUDA) skips o_proj, its MLP and norm for the
# positions no one uses (qllm.fused.rows_used).  False: every row (benchmarks/bench_e2e.py A/B).
_TRIM_LAST_LAYER = True


def _asked(kwargs: dict, handle: PatchHandle, name: str) -> bool:
    v = kwargs.get(name)
    return bool(getattr(handle.text_config, name, False) if v is None else v)


def _wrap_top(handle: PatchHandle):
    """The causal LM's forward, noting how many trailing positions the caller keeps (_KEEP) for
    the base model's forward below it.  Same signature (``generate`` inspects it)."""
    model = handle.model
    # an instance forward already there (e.g. accelerate's device hook) stays under ours, and
    # unpatch puts it back
    prev = model.__dict__.get("forward")
    orig = prev if prev is not None else type(model).forward.__get__(model)

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        keep = kwargs.get("logits_to_keep")
        if (len(args) > 1 or not isinstance(keep, int) or isinstance(keep, bool) or keep <= 0
                or kwargs.get("labels") is not None or _asked(kwargs, handle, "output_hidden_states")
                or _asked(kwargs, handle, "output_attentions")):
            keep = None
        token = _KEEP.set(keep)
        try:
            return orig(*args, **kwargs)
        finally:
            _KEEP.reset(token)

    forward._qllm_top = True
    forward._qllm_prev = prev
    return forward


# Where the question's forward runs alongside the first chunk of the prompt, layer by layer
# (_QuestionPass): "cuda" (default) for a CUDA model, where the GPU works on the prompt while the host
# enqueues the question's ops; True: on every device (the CPU gains nothing: it computes as it goes,
# and a second thread adds its own intra-op thread team); False: whole, before the prompt (the
# earlier order, same results; benchmarks/bench_e2e.py --question-apart).
_QUESTION_ALONGSIDE: bool | str = "cuda"


class _QuestionAborted(Exception):
    """Raised inside the question's worker thread to unwind it when the prompt call failed."""


class _QuestionPass:
    """The question's forward through the model (per-layer question vectors, rule 7), run in a
    worker thread in lockstep with the first chunk of the prompt.

    Before the prompt's decoder layer i runs, the worker runs the question through layer i and
    stops at the start of layer i+1 (decoder-layer pre-hooks, :func:`_layer_pre_hook`).  The two
    threads strictly alternate -- one waits while the other runs -- and the worker uses the
    caller's CUDA stream, so every kernel is enqueued in the order of the sequential pass (the
    question's layer i before the prompt's layer i) and the results are the same.  What changes
    is the GPU's idle time: alone, the question's ~30 small ops per layer keep the GPU waiting on
    the host (~50 ms for an 8B model); alongside, the host enqueues them while the GPU works
    through the prompt's earlier layers.
    """

    def __init__(self, handle: PatchHandle, cache: QLLMCache, ids: torch.Tensor):
        self.handle, self.cache, self.ids = handle, cache, ids
        self.scratch = QLLMCache(handle)
        self.scratch.mode = "question"
        self.stream = torch.cuda.current_stream(ids.device) if ids.is_cuda else None
        self.cond = threading.Condition()
        self.allowed = -1  # the worker may run the layers up to this one
        self.at = -1  # the layer at whose start the worker waits
        self.done = False
        self.aborted = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.owner = threading.current_thread()  # the prompt call's thread
        self.published: set = set()

    # ---- worker thread
    def _run(self) -> None:
        try:
            stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
            orig = type(self.handle.base).forward.__get__(self.handle.base)
            with stream, torch.no_grad():
                orig(input_ids=self.ids, use_cache=True, **{self.handle.cache_kw: self.scratch})
        except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
            self.error = exc
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def _worker_at(self, i: int) -> None:
        with self.cond:
            self.at = i
            self.cond.notify_all()
            while self.allowed < i and not self.aborted:
                self.cond.wait()
            if self.aborted:
                raise _QuestionAborted()

    # ---- caller's thread
    def _advance(self, upto: int) -> None:
        """Let the worker run through layer ``upto`` and wait until it stops after it (or ends)."""
        with self.cond:
            self.allowed = max(self.allowed, upto)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="qllm-question", daemon=True)
                self.thread.start()
            self.cond.notify_all()
            while not self.done and self.at <= upto:
                self.cond.wait()
        if self.error is not None:
            self.abort()
            raise self.error
        self._publish()

    def at_layer(self, i: int) -> None:
        """Decoder layer ``i`` is about to run, in this thread."""
        me = threading.current_thread()
        if me is self.thread:
            self._worker_at(i)
        elif me is self.owner:
            self._advance(i)
        # any other thread: not part of this pass (a model shared across threads is the caller's to order)

    def _publish(self) -> None:
        """Hand the question vectors of the layers done so far to the prompt's cache."""
        cache, handle = self.cache, self.handle
        for i, m in list(self.scratch.memories.items()):
            if i in self.published or m.question is None:
                continue
            if handle.question_heads and cache.relevance is None:
                cache.relevance = QuestionRelevance(handle.question_heads, m.device)
            mem = cache.memory(i, m.n_q_heads, m.n_kv_heads, m.head_dim, m.dtype, m.device)
            mem.question = m.question
            mem.question_tokens = m.question_tokens
            self.published.add(i)

    def finish(self) -> None:
        """Run what is left of the question's forward and wait for it."""
        self._advance(1 << 62)
        self.thread.join()
        log.info("qllm: question of %d tokens encoded", self.ids.shape[1])

    def abort(self) -> None:
        """Unwind the worker (the prompt call failed) and wait for it."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()


def _layer_pre_hook(handle: PatchHandle, i: int):
    def hook(module, args):
        qp = handle.question_pass
        if qp is not None:
            qp.at_layer(i)
    hook._qllm_keeps_nothing = True  # holds no tensor (qllm.fused may then write layer outputs in place)
    return hook


def _question_pass(handle: PatchHandle, cache: QLLMCache, input_ids: torch.Tensor | None) -> "_QuestionPass | None":
    """Check the question and set up its forward (not started), or None when there is none."""
    cfg = handle.config
    q = handle.question
    cache.has_question = True  # decided once per cache
    if not cfg.uses_question:
        if cfg.strategy == "infllm" and q is not None:
            log.info("qllm: strategy 'infllm' ignores the question")
        return
    if q is None:
        log.info("qllm: no question given: retrieval uses the text's queries only (InfLLM behaviour)")
        cache.has_question = False
        return
    if "ids" in q:
        ids = q["ids"]
    else:
        a, b = q["span"]
        if input_ids is None:
            raise _bad_input("question span needs input_ids (not inputs_embeds)")
        if not (0 <= a < b <= input_ids.shape[1]):
            raise _bad_input(f"question span: expected 0 <= start < end <= {input_ids.shape[1]}, got ({a}, {b})")
        ids = input_ids[0, a:b]
    dev = handle.base.device if hasattr(handle.base, "device") else ids.device
    ids = ids.reshape(1, -1)
    if ids.device.type == "cpu" and dev.type == "cuda":
        # through pinned memory, enqueued: a pageable copy would wait for the GPU queue
        ids = ids.pin_memory().to(dev, non_blocking=True)
    else:
        ids = ids.to(dev)
    n = ids.shape[1]
    if n == 0:
        raise _bad_input("question: empty")
    if n > cfg.question_limit:
        raise _bad_input(f"question: {n} tokens, at most {cfg.question_limit} supported "
                         "(QLLMConfig.max_question_tokens, default n_local)")
    cache.question_ids = ids[0].detach().clone()
    return _QuestionPass(handle, cache, ids)


def _encode_question(handle: PatchHandle, cache: QLLMCache, input_ids: torch.Tensor | None) -> None:
    """Run the question tokens through the model once, whole, to get per-layer question vectors."""
    qp = _question_pass(handle, cache, input_ids)
    if qp is not None:
        qp.finish()


# -------------------------------------------------------------------- API
def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, "_qllm", None) is not None


def patch(model: torch.nn.Module, config: QLLMConfig | None = None) -> torch.nn.Module:
    """Give ``model`` query-aware context memory; returns the same model.

    Parameters
    ----------
    model : a transformers causal LM (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma3).
    config : QLLMConfig, default ``QLLMConfig()``.
    """
    if config is None:
        config = QLLMConfig()
    if not isinstance(config, QLLMConfig):
        raise TypeError(f"qllm.patch: config: expected QLLMConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qllm.patch: model: expected a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("qllm.patch: model is already patched (call qllm.unpatch first)")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    mtype = getattr(text_config, "model_type", "")
    if mtype not in _SUPPORTED:
        log.warning("qllm: model type %r is not one of the tested families %s", mtype, _SUPPORTED)
    base, layers = _find_layers(model)
    layer_types = getattr(text_config, "layer_types", None)
    attn = {}
    for i, layer in enumerate(layers):
        mod = getattr(layer, "self_attn", None)
        if mod is None:
            raise TypeError(f"qllm.patch: model: layer {i} has no self_attn")
        if layer_types is not None and layer_types[i] != "full_attention":
            continue  # sliding-window layers keep their own attention
        attn[i] = mod
    params = inspect.signature(type(base).forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    rotary = getattr(base, "rotary_emb", None)
    rotary_layer_type = None
    if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
        rotary_layer_type = "full_attention"
    if rotary is None and config.strategy != "full":
        raise TypeError(f"qllm.patch: model: no rotary embedding module found on {type(base).__name__}")
    handle = PatchHandle(model=model, config=config, text_config=text_config, base=base, attn_modules=attn,
                         orig_attn_impl=text_config._attn_implementation, cache_kw=cache_kw,
                         rotary=rotary, rotary_layer_type=rotary_layer_type)
    handle.question_heads = resolve_question_heads(config, text_config, set(attn))
    if config.fused_kernels:
        handle.fused = fuse(model)
    model._qllm = handle
    if config.strategy == "full":
        log.info("qllm: strategy 'full': the model keeps its own dense attention")
        return model
    _register_attention()
    for mod in layers:
        mod.self_attn._qllm_owner = handle
    for i, mod in attn.items():
        handle.hooks.append(mod.register_forward_pre_hook(_attn_pre_hook(handle), with_kwargs=True))
    for i, layer in enumerate(layers):
        handle.hooks.append(layer.register_forward_pre_hook(_layer_pre_hook(handle, i)))
    for modname in sorted({type(m).__module__ for m in attn.values()}):
        if _wrap_rope(modname):
            handle.rope_modules.append(modname)
    text_config._attn_implementation = ATTN_NAME
    base.forward = _wrap_forward(handle)
    if model is not base and "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        model.forward = _wrap_top(handle)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` completely; returns the model."""
    handle: PatchHandle | None = getattr(model, "_qllm", None)
    if handle is None:
        raise ValueError("qllm.unpatch: model is not patched")
    unfuse(model, handle.fused)
    for h in handle.hooks:
        h.remove()
    for modname in handle.rope_modules:
        _unwrap_rope(modname)
    if handle.config.strategy != "full":
        handle.text_config._attn_implementation = handle.orig_attn_impl
        handle.base.__dict__.pop("forward", None)
        top = model.__dict__.get("forward")
        if getattr(top, "_qllm_top", False):
            if top._qllm_prev is not None:
                model.forward = top._qllm_prev
            else:
                del model.__dict__["forward"]
        _, layers = _find_layers(model)
        for layer in layers:
            layer.self_attn.__dict__.pop("_qllm_owner", None)
    del model._qllm
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, config: QLLMConfig | None = None) -> Iterator[torch.nn.Module]:
    """``with qllm.patched(model, config): ...`` -- patch for the block, then unpatch."""
    patch(model, config)
    try:
        yield model
    finally:
        unpatch(model)


def set_question(model: torch.nn.Module, question=None, *, tokenizer=None, span: tuple[int, int] | None = None):
    """Tell a patched model the user's question for the next text it reads.

    Exactly one of:
      * ``question``: a string (needs ``tokenizer``) or a 1-D tensor/list of token ids;
      * ``span=(start, end)``: token positions of the question inside the next prompt.
    ``set_question(model)`` with nothing clears it (InfLLM behaviour, logged).
    The question applies to every fresh cache until changed.
    """
    handle: PatchHandle | None = getattr(model, "_qllm", None)
    if handle is None:
        raise ValueError("qllm.set_question: model is not patched (call qllm.patch first)")
    if question is not None and span is not None:
        raise ValueError("qllm.set_question: give either question or span, not both")
    if span is not None:
        if (not isinstance(span, (tuple, list)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise ValueError(f"qllm.set_question: span: expected (start, end) ints, got {span!r}")
        if not 0 <= span[0] < span[1]:
            raise ValueError(f"qllm.set_question: span: expected 0 <= start < end, got {tuple(span)}")
        handle.question = {"span": (int(span[0]), int(span[1]))}
    elif question is None:
        handle.question = None
    elif isinstance(question, str):
        if tokenizer is None:
            raise ValueError("qllm.set_question: tokenizer is required for a question string")
        if not question.strip():
            raise ValueError("qllm.set_question: question: empty string")
        ids = tokenizer(question, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        handle.question = {"ids": ids}
    else:
        ids = torch.as_tensor(question)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("qllm.set_question: question: expected a non-empty 1-D sequence of token ids")
        handle.question = {"ids": ids.long()}
    return model


@contextlib.contextmanager
def record(model: torch.nn.Module) -> Iterator[list]:
    """Record (layer, q, k, v, out) of every patched attention call -- for tests and inspection."""
    handle: PatchHandle = getattr(model, "_qllm")
    handle.recorder = []
    try:
        yield handle.recorder
    finally:
        handle.recorder = None
