"""High-level helpers: ask a question about a long context, and the
``"qllm-text-generation"`` transformers pipeline."""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable

import torch

from .config import QLLMConfig
from .patch import is_patched, patch, set_question, unpatch

log = logging.getLogger("qllm")

__all__ = ["build_prompt", "generate", "decode_tokens", "QLLMTextGenerationPipeline", "register_pipeline"]


def build_prompt(tokenizer, context: str, question: str | None) -> torch.Tensor:
    """Chat-formatted prompt ids [1, T]: the context, then the question, as one user turn."""
    if not isinstance(context, str):
        raise TypeError(f"context: expected a str, got {type(context).__name__}")
    if question is not None and not isinstance(question, str):
        raise TypeError(f"question: expected a str or None, got {type(question).__name__}")
    content = context if not question else f"{context}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                            add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(content + "\n", return_tensors="pt")["input_ids"]
    return ids


@contextlib.contextmanager
def _ensure_patched(model, config: QLLMConfig | None):
    if is_patched(model):
        if config is not None and config != model._qllm.config:
            raise ValueError("config: the model is already patched with another config "
                             "(unpatch it first or omit config)")
        yield model
        return
    patch(model, config)
    try:
        yield model
    finally:
        unpatch(model)


def generate(model, tokenizer, context: str, question: str | None = None, *, max_new_tokens: int = 64,
             config: QLLMConfig | None = None, do_sample: bool = False,
             progress: Callable[[int, int, object], None] | None = None, cuda_graph: bool | None = None,
             **generate_kwargs) -> str:
    """Answer ``question`` about ``context`` with query-aware context memory.

    The prompt is the chat template applied to ``context + question``; the
    question is also handed to the memory separately, so retrieval knows it
    while reading.  An unpatched model is patched for the call (``config``,
    default ``QLLMConfig()``) and restored afterwards.

    ``cuda_graph``: decode each token as one CUDA-graph replay of the whole
    model (:class:`qllm.gpu.GraphDecoder`; tokens that cut a block replay a
    second graph, or run eagerly with tiered memory or question heads),
    in qllm's own decode loop: greedy, or sampling with ``temperature`` /
    ``top_k`` / ``top_p`` (as ``model.generate`` does them), stopping at
    ``eos_token_id``.  ``None`` (default): on when the model runs the CUDA fast
    path in every layer and the generation arguments are those; otherwise
    ``model.generate`` decodes.  ``True`` where it cannot apply logs why and
    uses ``model.generate``; ``False`` always uses ``model.generate``.

    On the CUDA fast path with no ``QLLMConfig.device_blocks``, a text whose
    layer memories would take more than 60% of the free GPU memory is read
    with tiered memory: a block budget chosen to fit
    (:func:`qllm.gpu.auto_device_blocks`, logged), the other blocks in pinned
    host memory.  The answer is the same (tiers change where blocks live, not
    what is computed).

    Returns the generated text (special tokens removed).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph: expected a bool or None, got {type(cuda_graph).__name__}")
    ids = build_prompt(tokenizer, context, question)
    device = next(model.parameters()).device
    with _ensure_patched(model, config):
        handle = model._qllm
        old_q, old_p = handle.question, handle.progress
        try:
            if question:
                set_question(model, question, tokenizer=tokenizer)
            else:
                set_question(model)
            handle.progress = progress
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            why = None if cuda_graph is False else _graph_loop_unsupported(model, generate_kwargs)
            if cuda_graph and why is not None:
                log.warning("qllm.generate: cuda_graph=True, but %s: decoding with model.generate", why)
            with torch.no_grad():
                if cuda_graph is not False and why is None:
                    new = decode_tokens(model, ids.to(device), max_new_tokens, do_sample=do_sample,
                                        **generate_kwargs)[0]
                else:
                    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                         max_new_tokens=max_new_tokens, do_sample=do_sample,
                                         pad_token_id=pad, **generate_kwargs)
                    new = out[0, ids.shape[1]:]
        finally:
            handle.question, handle.progress = old_q, old_p
    return tokenizer.decode(new, skip_special_tokens=True).strip()


# ------------------------------------------------- qllm's own decode loop
_LOOP_KWARGS = ("temperature", "top_k", "top_p", "eos_token_id")
# generation settings whose neutral values the loop assumes (anything else: model.generate)
_NEUTRAL = {"num_beams": (None, 1), "num_return_sequences": (None, 1), "repetition_penalty": (None, 1.0),
            "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
            "typical_p": (None, 1.0), "min_p": (None,), "top_h": (None,), "epsilon_cutoff": (None, 0.0),
            "eta_cutoff": (None, 0.0),
            "min_length": (None, 0), "min_new_tokens": (None, 0), "bad_words_ids": (None,),
            "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
            "renormalize_logits": (None, False), "remove_invalid_values": (None, False), "stop_strings": (None,),
            "guidance_scale": (None, 1.0), "watermarking_config": (None,), "penalty_alpha": (None,),
            "prompt_lookup_num_tokens": (None,), "assistant_model": (None,)}


def _graph_loop_unsupported(model, generate_kwargs: dict) -> str | None:
    """Why qllm's graph decode loop does not apply (None when it does)."""
    from .gpu import graph_unsupported

    why = graph_unsupported(model)
    if why is not None:
        return why
    other = sorted(k for k in generate_kwargs if k not in _LOOP_KWARGS)
    if other:
        return f"generation arguments {other} (the graph loop takes {list(_LOOP_KWARGS)})"
    gc = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL.items():
        val = getattr(gc, name, None)
        if val not in neutral:
            return f"generation_config.{name}={val!r}"
    return None


def _setting(name: str, kwargs: dict, gc, default):
    val = kwargs.get(name)
    if val is None:
        val = getattr(gc, name, None)
    return default if val is None else val


def _picker(model, prompt: torch.Tensor, do_sample: bool, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [1, T, V] -> next token [1, 1] on the device, as model.generate picks it (greedy, or
    temperature -> top-k -> top-p -> multinomial), without a host sync."""
    if not do_sample:
        return lambda logits: logits[:, -1, :].float().argmax(-1, keepdim=True)
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gc = getattr(model, "generation_config", None)
    warpers = []
    t = _setting("temperature", kwargs, gc, 1.0)
    k = _setting("top_k", kwargs, gc, 50)
    p = _setting("top_p", kwargs, gc, 1.0)
    if t != 1.0:
        warpers.append(TemperatureLogitsWarper(t))
    if k != 0:
        warpers.append(TopKLogitsWarper(k, min_tokens_to_keep=1))
    if p < 1.0:
        warpers.append(TopPLogitsWarper(p, min_tokens_to_keep=1))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = logits[:, -1, :].float()
        for w in warpers:
            scores = w(prompt, scores)
        probs = torch.softmax(scores, dim=-1)
        # torch.multinomial(probs, 1)'s own algorithm (argmax of probs / Exp(1) draws: the same draws,
        # the same token), without its host-side validity check
        return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)

    return pick


def _budget_for(model, cache, n_tokens: int) -> None:
    """On CUDA, a device block budget for ``cache`` when the text's untiered layer memories would
    not fit the free GPU memory (:func:`qllm.gpu.auto_device_blocks`); logged."""
    from .gpu import auto_device_blocks, supports

    handle = model._qllm
    p = next(model.parameters(), None)
    tc = handle.text_config
    hd = next(iter(handle.attn_modules.values())).head_dim if handle.attn_modules else None
    if p is None or hd is None or not supports(p.dtype, p.device, hd):
        return
    free, _ = torch.cuda.mem_get_info(p.device)
    budget = auto_device_blocks(handle.config, n_tokens, len(handle.attn_modules), tc.num_attention_heads,
                                getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads, hd,
                                p.element_size(), free)
    if budget is not None:
        cache.device_blocks = budget
        log.info("qllm: %d tokens: the layer memories would not fit the free GPU memory (%.1f GiB): tiered "
                 "memory with device_blocks=%d per layer (the rest in pinned host memory; set "
                 "QLLMConfig.device_blocks to choose)", n_tokens, free / 2**30, budget)


def decode_tokens(model, ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                  cuda_graph: bool = True, **kwargs) -> torch.Tensor:
    """Prefill ``ids`` [1, T] through the patched ``model`` and generate up to
    ``max_new_tokens`` tokens; returns them [1, n] (the eos token included, as
    ``model.generate`` returns it).  Decode steps are CUDA-graph replays
    (:class:`qllm.gpu.GraphDecoder`) where supported and ``cuda_graph``; else eager.

    ``kwargs``: ``temperature``, ``top_k``, ``top_p`` (with ``do_sample``) and
    ``eos_token_id``, defaults from ``model.generation_config``.  The loop
    enqueues token i+1's step before it waits for token i (read back through
    pinned memory for the stop check), so the host work of a step overlaps the
    device work of the one before; with no eos id it never waits.
    """
    from .cache import QLLMCache
    from .gpu import GraphDecoder

    handle = model._qllm
    bad = sorted(k for k in kwargs if k not in _LOOP_KWARGS)
    if bad:
        raise TypeError(f"decode_tokens: unexpected arguments {bad}")
    gc = getattr(model, "generation_config", None)
    eos = _setting("eos_token_id", kwargs, gc, None)
    eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
    dev = ids.device
    cache = QLLMCache(handle)
    cache.reserve_tokens = ids.shape[1] + max_new_tokens + 8  # CUDA stores sized once: no reallocation
    _budget_for(model, cache, cache.reserve_tokens)
    fwd = {handle.cache_kw: cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        fwd["logits_to_keep"] = 1
    pick = _picker(model, ids, do_sample, kwargs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **fwd).logits
        dec = GraphDecoder(model, cache, max_new_tokens, enabled=cuda_graph)
        pinned = dev.type == "cuda"
        host = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=pinned)
        toks = []
        tok = pick(logits)
        del logits
        for i in range(max_new_tokens):
            toks.append(tok)
            ev = None
            if eos:
                host[i:i + 1].copy_(tok.view(1), non_blocking=pinned)
                if pinned:
                    ev = torch.cuda.Event()
                    ev.record()
            nxt = pick(dec.step(tok)) if i + 1 < max_new_tokens else None
            if eos:
                if ev is not None:
                    ev.synchronize()  # token i only: step i+1 is already queued behind it
                if int(host[i]) in eos:
                    break
            tok = nxt
        out = torch.cat(toks, dim=1)
    log.debug("qllm: decoded %d tokens: %d graph replays, %d eager steps (%s)", out.shape[1], dec.n_replays,
              dec.n_eager, "graph" if dec.enabled else dec.reason)
    return out


# ---------------------------------------------------------------- pipeline
try:
    from transformers import Pipeline
except ImportError:  # pragma: no cover
    Pipeline = object


class QLLMTextGenerationPipeline(Pipeline):
    """``pipeline("qllm-text-generation", model=..., tokenizer=...)``.

    Call with ``pipe(context, question="...", max_new_tokens=64, qllm_config=QLLMConfig(...))``
    or ``pipe({"context": ..., "question": ...})``; returns ``{"generated_text": answer}``.
    """

    def _sanitize_parameters(self, question=None, max_new_tokens=None, qllm_config=None, do_sample=None,
                             **kwargs):
        pre = {} if question is None else {"question": question}
        fwd = {}
        if max_new_tokens is not None:
            fwd["max_new_tokens"] = max_new_tokens
        if qllm_config is not None:
            fwd["qllm_config"] = qllm_config
        if do_sample is not None:
            fwd["do_sample"] = do_sample
        return pre, fwd, {}

    def preprocess(self, inputs, question=None):
        if isinstance(inputs, dict):
            context = inputs.get("context")
            question = inputs.get("question", question)
        else:
            context = inputs
        if not isinstance(context, str):
            raise TypeError(f"context: expected a str, got {type(context).__name__}")
        return {"context": context, "question": question}

    def _forward(self, model_inputs, max_new_tokens=64, qllm_config=None, do_sample=False):
        text = generate(self.model, self.tokenizer, model_inputs["context"], model_inputs["question"],
                        max_new_tokens=max_new_tokens, config=qllm_config, do_sample=do_sample)
        return {"text": text}

    def postprocess(self, model_outputs):
        return {"generated_text": model_outputs["text"]}


def register_pipeline() -> None:
    """Register the task name ``"qllm-text-generation"`` with transformers (idempotent;
    adds a task, changes no model)."""
    from transformers import AutoModelForCausalLM
    from transformers.pipelines import PIPELINE_REGISTRY

    if "qllm-text-generation" in PIPELINE_REGISTRY.get_supported_tasks():
        return
    PIPELINE_REGISTRY.register_pipeline("qllm-text-generation", pipeline_class=QLLMTextGenerationPipeline,
                                        pt_model=AutoModelForCausalLM)
