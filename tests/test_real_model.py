"""The real default model on the CPU, small budget, facts planted in the first quarter of a
~6K-token essay text (far outside the 256-token window).

qllm (the default: the question scores blocks through the model's calibrated question heads,
``qllm/calibration/smollm2-135m-instruct.json``, calibrated on other facts) answers; streaming with
the same init + window does not.  With the representative-based question term (the paper's) this
model does not rank the fact's block into its top-4 (benchmarks/needles.py measures both).
"""

from __future__ import annotations

import pytest
import torch

import qllm
from qllm.data import Needle, build_needle_text

pytestmark = pytest.mark.slow

FACTS = [
    (Needle("The secret ingredient of the soup is saffron.", "What is the secret ingredient of the soup?",
            "saffron"), 0.20),
    (Needle("The meeting was moved to the city of Lisbon.", "To which city was the meeting moved?", "Lisbon"), 0.10),
    (Needle("The secret number is 71432.", "What is the secret number?", "71432"), 0.15),
]
N_TOKENS = 6000
CFG = qllm.QLLMConfig.small()


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    return qllm.load_model()


def _needle_blocks(tok, text, needle):
    """Ids of the blocks holding the fact sentence in the chat prompt."""
    ids = qllm.build_prompt(tok, text, needle.question)[0].tolist()
    fact = tok(" " + needle.fact.split(" is ")[0], add_special_tokens=False)["input_ids"][1:4]
    ans = tok(" " + needle.answer, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(fact)] == fact)
    end = next(i for i in range(start, len(ids)) if ids[i:i + len(ans)] == ans) + len(ans)
    first, last = (start - CFG.n_init) // CFG.block_size, (end - 1 - CFG.n_init) // CFG.block_size
    return list(range(first, last + 1)), len(ids)


@pytest.fixture(scope="module")
def cases(model_tok):
    _, tok = model_tok
    out = []
    for needle, depth in FACTS:
        text = build_needle_text(tok, N_TOKENS, needle, depth)
        blocks, n = _needle_blocks(tok, text, needle)
        out.append((needle, depth, text, blocks, n))
    return out


def _ask(model, tok, text, needle, strategy):
    return qllm.generate(model, tok, text, needle.question, config=CFG.replace(strategy=strategy),
                         max_new_tokens=10)


@pytest.mark.parametrize("i", range(len(FACTS)), ids=[n.answer for n, _ in FACTS])
def test_qllm_answers_streaming_does_not(model_tok, cases, i):
    """The product claim on the default model: retrieval (with the question) finds the fact."""
    model, tok = model_tok
    needle, depth, text, blocks, n = cases[i]
    assert 5000 < n < 7000 and blocks[0] * CFG.block_size + CFG.n_init < n // 4 + 64  # first quarter
    answer = _ask(model, tok, text, needle, "streaming")
    assert needle.answer not in answer, f"streaming answered {answer!r}: the fact leaked into the window"
    answer = _ask(model, tok, text, needle, "qllm")
    assert needle.answer in answer, f"qllm answered {answer!r}"


def test_question_heads_rank_the_fact_block_first(model_tok, cases):
    """The calibration shipped for this model is used, and its heads put the fact's block on top."""
    model, tok = model_tok
    needle, depth, text, blocks, n = cases[0]
    ids = qllm.build_prompt(tok, text, needle.question)
    with qllm.patched(model, CFG):
        assert model._qllm.question_heads, "no calibrated question heads resolved for the default model"
        qllm.set_question(model, needle.question, tokenizer=tok)
        cache = qllm.QLLMCache(model._qllm)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        n_blocks = next(iter(cache.memories.values())).n_blocks
        ranks = []
        for layer in sorted(cache.memories):
            c = cache.relevance.score(layer, n_blocks)
            ranks.append(min(int((c > c[b]).sum()) for b in blocks))
        retrieved = cache.retrieved_blocks()
    print(f"\nfact blocks {blocks} of {n_blocks}: rank by the question-head score per layer {ranks}")
    assert all(r < CFG.topk for r in ranks), ranks
    with_fact = sum(any(b in v for b in blocks) for v in retrieved.values())
    assert with_fact >= 20, f"the fact's block is retrieved in only {with_fact} of {len(retrieved)} layers"
