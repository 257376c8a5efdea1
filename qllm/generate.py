"""High-level helpers: ask a question about a long context, and the
``"qllm-text-generation"`` transformers pipeline."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from .config import QLLMConfig
from .patch import is_patched, patch, set_question, unpatch

log = logging.getLogger("qllm")

__all__ = ["build_prompt", "generate", "QLLMTextGenerationPipeline", "register_pipeline"]


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
             progress: Callable[[int, int, object], None] | None = None, **generate_kwargs) -> str:
    """Answer ``question`` about ``context`` with query-aware context memory.

    The prompt is the chat template applied to ``context + question``; the
    question is also handed to the memory separately, so retrieval knows it
    while reading.  An unpatched model is patched for the call (``config``,
    default ``QLLMConfig()``) and restored afterwards.

    Returns the generated text (special tokens removed).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
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
            with torch.no_grad():
                out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                     max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     pad_token_id=pad, **generate_kwargs)
        finally:
            handle.question, handle.progress = old_q, old_p
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


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
