"""Long test texts: the essay haystack with planted facts (needles / passkeys)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

__all__ = ["haystack_dir", "load_haystack", "Needle", "build_needle_text", "passkey_needle", "fact_needles"]


def haystack_dir() -> str:
    """Directory of the essay haystack (``QLLM_HAYSTACK`` overrides)."""
    env = os.environ.get("QLLM_HAYSTACK")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "tests", "data", "haystack_pg_essays"),
                 os.path.join(here, "..", "..", "shared", "data", "haystack_pg_essays")):
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    raise FileNotFoundError("essay haystack not found; set QLLM_HAYSTACK to its directory")


def load_haystack() -> str:
    """All essays concatenated in sorted file order."""
    d = haystack_dir()
    parts = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".txt"):
            with open(os.path.join(d, name), encoding="utf-8") as f:
                parts.append(f.read().strip())
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Needle:
    fact: str        # sentence planted in the text
    question: str    # question about it
    answer: str      # expected answer substring


def passkey_needle(seed: int = 0) -> Needle:
    """A five-digit secret number (phrased so that a 135M model answers it with full attention)."""
    key = random.Random(seed).randint(10000, 99999)
    return Needle(fact=f"The secret number is {key}.", question="What is the secret number?", answer=str(key))


_FACTS = [
    ("The secret ingredient of the soup is saffron.", "What is the secret ingredient of the soup?", "saffron"),
    ("The name of the captain's dog is Biscuit.", "What is the name of the captain's dog?", "Biscuit"),
    ("The meeting was moved to the city of Lisbon.", "To which city was the meeting moved?", "Lisbon"),
    ("The password for the vault is ORCHID.", "What is the password for the vault?", "ORCHID"),
    ("The winning lottery number was 4172.", "What was the winning lottery number?", "4172"),
]


def fact_needles() -> list[Needle]:
    return [Needle(*f) for f in _FACTS]


def build_needle_text(tokenizer, n_tokens: int, needle: Needle, depth: float) -> str:
    """Haystack cut to about ``n_tokens`` tokens with ``needle.fact`` inserted at
    fractional ``depth`` (0 = start, 1 = end), on a sentence boundary."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], got {depth}")
    hay = load_haystack()
    ids = tokenizer(hay, add_special_tokens=False)["input_ids"]
    fact_len = len(tokenizer(" " + needle.fact, add_special_tokens=False)["input_ids"])
    budget = max(n_tokens - fact_len, 16)
    while len(ids) < budget:  # haystack shorter than asked: repeat it
        ids = ids + ids
    text = tokenizer.decode(ids[:budget])
    cut = int(len(text) * depth)
    dot = text.rfind(". ", 0, cut)
    cut = dot + 2 if dot >= 0 and depth > 0 else cut
    return text[:cut] + needle.fact + " " + text[cut:]
