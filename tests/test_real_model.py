"""The real default model on the CPU, small budget, facts planted in the first quarter of a
~6K-token essay text (far outside the 256-token window).

What this model shows (measured, see the issue note): when the blocks holding the fact are
among the retrieved blocks, qllm answers and streaming with the same init + window does not --
the memory path (blocks, fixed-position attention, merge) carries the fact.  SmolLM2-135M's own
query/key geometry does not rank those blocks into its top-4 (``test_retrieval_rank_is_recorded``
records where they land), so the answer-level test forces the fact's blocks into the retrieved
set through ``qllm.attention.select_blocks`` -- an oracle for the scoring step only.
"""

from __future__ import annotations

import pytest
import torch

import qllm
import qllm.attention as attention
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
def test_retrieved_fact_blocks_answer_streaming_does_not(model_tok, cases, monkeypatch, i):
    model, tok = model_tok
    needle, depth, text, blocks, n = cases[i]
    assert 5000 < n < 7000 and blocks[0] * CFG.block_size + CFG.n_init < n // 4 + 64  # first quarter
    answer = _ask(model, tok, text, needle, "streaming")
    assert needle.answer not in answer, f"streaming answered {answer!r}: the fact leaked into the window"

    real = attention.select_blocks
    forced = []

    def with_fact_blocks(mem, query_mean):
        ids = real(mem, query_mean)
        if ids is None or mem.n_blocks <= blocks[-1]:
            return ids
        keep = [b for b in ids.tolist() if b not in blocks][: max(0, mem.config.topk - len(blocks))]
        forced.append(1)
        return torch.tensor(sorted(keep + blocks), dtype=torch.int32)

    monkeypatch.setattr(attention, "select_blocks", with_fact_blocks)
    answer = _ask(model, tok, text, needle, "qllm")
    assert forced, "retrieval was never called"
    assert needle.answer in answer, f"qllm with the fact's blocks retrieved answered {answer!r}"


def test_retrieval_rank_is_recorded(model_tok, cases):
    """Where the model's own scoring puts the fact's blocks (printed; asserts only sanity)."""
    model, tok = model_tok
    needle, depth, text, blocks, n = cases[0]
    ids = qllm.build_prompt(tok, text, needle.question)
    with qllm.patched(model, CFG):
        qllm.set_question(model, needle.question, tokenizer=tok)
        cache = qllm.QLLMCache(model._qllm)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        ranks = []
        for mem in cache.memories.values():
            s = torch.ops.qllm.retrieval_score(mem.block_reprs(), mem.question, None, 0.0)
            ranks.append(min(int((s > s[b]).sum()) for b in blocks))
    n_blocks = next(iter(cache.memories.values())).n_blocks
    assert len(ranks) == model.config.num_hidden_layers and all(0 <= r < n_blocks for r in ranks)
    print(f"\nfact blocks {blocks} of {n_blocks}: rank by question score per layer {ranks}")
