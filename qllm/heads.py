"""Question heads: which (layer, query head) pairs of a model score blocks against the question.

A few attention heads of a language model act as *retrieval heads*: when the
model looks something up in its context, these heads put their attention on
the matching tokens.  :func:`calibrate` finds them without training: it plants
facts in a long text, reads it with every head of every patched layer scoring
every block against the question (:class:`qllm.retrieval.QuestionRelevance`),
and counts, per head, how often the fact's block ranks in the top ``topk`` of
the standardised scores.  The best heads go into ``QLLMConfig.question_heads``.

Calibrations shipped with qllm live in ``qllm/calibration/*.json``, keyed by the
model's shape (:func:`fingerprint`); ``question_heads="auto"`` looks them up.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("qllm")

__all__ = ["fingerprint", "find_calibration", "load_calibration", "resolve_question_heads", "calibrate",
           "CALIBRATION_NEEDLES"]

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration")
_FP_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "rope_theta")


def fingerprint(text_config) -> dict:
    """The shape of a model, as stored with a calibration."""
    out = {}
    for k in _FP_KEYS:
        v = getattr(text_config, k, None)
        if k == "head_dim" and v is None:
            v = text_config.hidden_size // text_config.num_attention_heads
        if k == "rope_theta" and v is None:
            rp = getattr(text_config, "rope_parameters", None) or {}
            v = rp.get("rope_theta") if isinstance(rp, dict) else None
        if k == "num_key_value_heads" and v is None:
            v = text_config.num_attention_heads
        out[k] = float(v) if k == "rope_theta" and v is not None else v
    return out


def find_calibration(text_config, directory: str = _DIR) -> dict | None:
    """The shipped calibration whose fingerprint matches the model, or None."""
    fp = fingerprint(text_config)
    if not os.path.isdir(directory):
        return None
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            cal = json.load(f)
        if cal.get("fingerprint") == fp:
            cal["file"] = name
            return cal
    return None


def load_calibration(path: str) -> tuple:
    """The question heads stored in a calibration JSON (as written by ``qllm calibrate``)."""
    try:
        with open(path, encoding="utf-8") as f:
            cal = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"question heads: no such calibration file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"question heads: {path} is not JSON ({exc})") from None
    heads = cal.get("question_heads") if isinstance(cal, dict) else None
    if not isinstance(heads, list) or not heads:
        raise ValueError(f"question heads: {path} has no 'question_heads' list of [layer, head] pairs")
    try:
        return tuple((int(l), int(h)) for l, h in heads)
    except (TypeError, ValueError):
        raise ValueError(f"question heads: {path}: expected [layer, head] pairs, got {heads!r}") from None


def resolve_question_heads(config, text_config, patched_layers) -> tuple | None:
    """The question heads to use for a model: validated pairs, or None (representative term)."""
    qh = config.question_heads
    if config.strategy != "qllm":
        return None
    n_heads = text_config.num_attention_heads
    if isinstance(qh, str):  # "auto"
        cal = find_calibration(text_config)
        if cal is None:
            log.info("qllm: no question-head calibration for this model (%s): the question scores blocks "
                     "through their representatives (see qllm.heads.calibrate)",
                     getattr(text_config, "model_type", "?"))
            return None
        pairs = tuple(sorted((int(l), int(h)) for l, h in cal["question_heads"]))
        log.info("qllm: question heads from calibration %s: %s", cal["file"], pairs)
    elif qh is None:
        return None
    else:
        pairs = qh
    for l, h in pairs:
        if l not in patched_layers:
            raise ValueError(f"QLLMConfig.question_heads: layer {l} is not a patched attention layer of this "
                             f"model (patched: {sorted(patched_layers)})")
        if h >= n_heads:
            raise ValueError(f"QLLMConfig.question_heads: head {h} of layer {l}: the model has {n_heads} "
                             "query heads")
    return pairs


# ----------------------------------------------------------------- calibration
@dataclass(frozen=True)
class _Fact:
    fact: str
    question: str
    answer: str


# Facts for calibration only: none of them is used by the tests or benchmarks that measure retrieval.
CALIBRATION_NEEDLES = (
    _Fact("The old lighthouse keeper was named Tobias.", "What was the name of the old lighthouse keeper?", "Tobias"),
    _Fact("The treasure is buried under the red oak tree.", "Where is the treasure buried?", "oak"),
    _Fact("The favorite color of the queen is turquoise.", "What is the favorite color of the queen?", "turquoise"),
    _Fact("The train to the coast leaves from platform nine.",
          "From which platform does the train to the coast leave?", "nine"),
    _Fact("The chef's prize-winning cake used cardamom.", "Which spice did the chef's prize-winning cake use?",
          "cardamom"),
    _Fact("The spaceship was named Aurora.", "What was the name of the spaceship?", "Aurora"),
    _Fact("The museum's stolen painting showed a blue heron.", "What did the museum's stolen painting show?",
          "heron"),
    _Fact("The professor's bicycle was painted bright yellow.", "What color was the professor's bicycle?",
          "yellow"),
)


def _find(seq: list, sub: list) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise ValueError("calibration: planted fact not found in the tokenised prompt")


def calibrate(model, tokenizer, *, n_tokens: int = 6000, depths=(0.1, 0.2, 0.3), n_heads: int = 8,
              needles=CALIBRATION_NEEDLES, config=None, progress=None) -> dict:
    """Find a model's question heads (training-free; a few forward passes).

    For each needle and depth: a ~``n_tokens`` essay text with the fact
    planted, read by the patched model with *every* head as a question head;
    a head scores a hit when the fact's block (the block holding the answer
    or the start of the fact) ranks among the ``topk`` highest standardised
    scores.  Returns ``{"question_heads": [...n_heads best...], "hits":
    [[...]] (per layer, per head), "examples": N, ...}``, ready to be saved as
    a calibration JSON (add ``"fingerprint": fingerprint(config)``).
    """
    from .cache import QLLMCache
    from .config import QLLMConfig
    from .data import build_needle_text
    from .generate import build_prompt
    from .patch import patched, set_question
    from .retrieval import standardize

    if n_heads < 1:
        raise ValueError(f"calibrate: n_heads: expected >= 1, got {n_heads}")
    base_cfg = config or QLLMConfig.small()
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    L, H = text_config.num_hidden_layers, text_config.num_attention_heads
    layer_types = getattr(text_config, "layer_types", None)
    layers = [i for i in range(L) if layer_types is None or layer_types[i] == "full_attention"]
    all_pairs = tuple((l, h) for l in layers for h in range(H))
    cfg = base_cfg.replace(strategy="qllm", question_heads=all_pairs)
    hits = torch.zeros(L, H, dtype=torch.long)
    n_ex = 0
    total = len(needles) * len(depths)
    for nd in needles:
        for depth in depths:
            text = build_needle_text(tokenizer, n_tokens, nd, depth)
            ids = build_prompt(tokenizer, text, nd.question)
            seq = ids[0].tolist()
            ans = _find(seq, tokenizer(" " + nd.answer, add_special_tokens=False)["input_ids"])
            fact_ids = tokenizer(" " + nd.fact, add_special_tokens=False)["input_ids"]
            start = _find(seq, fact_ids[1:4]) - 1
            blocks = {(p - cfg.n_init) // cfg.block_size for p in (start, ans)}
            qids = tokenizer(nd.question, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            with patched(model, cfg), torch.no_grad():
                set_question(model, qids)
                cache = QLLMCache(model._qllm)
                model(ids.to(model.device), **{model._qllm.cache_kw: cache}, use_cache=True, logits_to_keep=1)
            rel = cache.relevance
            nb = min(rel.n_filled)
            z = standardize(rel.raw[:nb].float().cpu(), dim=0)  # [nb, n_pairs]
            best = torch.stack([z[b] for b in sorted(blocks) if b < nb]).amax(0)
            rank = (z > best).sum(0)
            for c, (l, h) in enumerate(rel.heads):
                hits[l, h] += int(rank[c] < cfg.topk)
            n_ex += 1
            if progress is not None:
                progress(n_ex, total)
    order = hits.flatten().argsort(descending=True, stable=True)
    heads = [[int(i) // H, int(i) % H] for i in order[:n_heads]]
    return {"question_heads": sorted(heads), "hits": hits.tolist(), "examples": n_ex, "n_tokens": n_tokens,
            "depths": list(depths), "topk": cfg.topk, "block_size": cfg.block_size,
            "needles": [nd.fact for nd in needles]}
