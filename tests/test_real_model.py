"""The real default model on the CPU: retrieval, not the window, answers questions about a long text.

SmolLM2-135M-Instruct (embedded GGUF), small budget (n_local=256, block_size=64, topk=4,
exc_block_size=256).  A fact is planted in the first quarter of a ~6K-token essay text: far
outside the 256-token window.  qllm must answer it; streaming (same init + window, no memory
blocks) must not -- so the answer comes from the retrieved blocks.
"""

from __future__ import annotations

import pytest
import torch

import qllm
from qllm.data import Needle, build_needle_text

pytestmark = pytest.mark.slow

FACTS = [
    (Needle("The secret number is 71432.", "What is the secret number?", "71432"), 0.10),
    (Needle("The name of the captain's dog is Biscuit.", "What is the name of the captain's dog?", "Biscuit"), 0.20),
    (Needle("The meeting was moved to the city of Lisbon.", "To which city was the meeting moved?", "Lisbon"), 0.15),
]
N_TOKENS = 6000


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    model, tok = qllm.load_model()
    return model, tok


@pytest.fixture(scope="module")
def texts(model_tok):
    _, tok = model_tok
    return {needle.answer: build_needle_text(tok, N_TOKENS, needle, depth) for needle, depth in FACTS}


def _ask(model, tok, text, needle, strategy):
    cfg = qllm.QLLMConfig.small(strategy=strategy)
    return qllm.generate(model, tok, text, needle.question, config=cfg, max_new_tokens=10)


@pytest.mark.parametrize("needle,depth", FACTS, ids=[n.answer for n, _ in FACTS])
def test_qllm_answers_fact_far_outside_window(model_tok, texts, needle, depth):
    model, tok = model_tok
    text = texts[needle.answer]
    n = len(tok(text)["input_ids"])
    assert 5000 < n < 7000
    answer = _ask(model, tok, text, needle, "qllm")
    assert needle.answer in answer, f"qllm answered {answer!r}, expected {needle.answer!r}"
    assert not qllm.is_patched(model)


@pytest.mark.parametrize("needle,depth", FACTS, ids=[n.answer for n, _ in FACTS])
def test_streaming_same_window_does_not(model_tok, texts, needle, depth):
    model, tok = model_tok
    answer = _ask(model, tok, texts[needle.answer], needle, "streaming")
    assert needle.answer not in answer, f"streaming answered {answer!r}: the fact leaked into the window"
