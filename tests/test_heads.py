"""Question heads: configuration, the shipped calibration lookup, calibration files, calibrate()."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

import qllm
from qllm.heads import (CALIBRATION_NEEDLES, calibrate, find_calibration, fingerprint, load_calibration,
                        resolve_question_heads)

SMOL = dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0)


def text_config(**changes):
    d = dict(SMOL)
    d.update(changes)
    return SimpleNamespace(**d)


def test_shipped_calibration_matches_default_model_shape():
    cal = find_calibration(text_config())
    assert cal is not None and cal["file"] == "smollm2-135m-instruct.json"
    assert len(cal["question_heads"]) == 8
    hits = torch.tensor(cal["hits"])
    assert hits.shape == (30, 9) and int(hits.max()) <= cal["examples"]
    # the chosen heads are the ones with the most hits
    chosen = sorted(int(hits[l, h]) for l, h in cal["question_heads"])
    assert chosen[0] >= int(hits.flatten().sort(descending=True).values[7])


def test_fingerprint_differs_for_another_shape():
    assert find_calibration(text_config(num_hidden_layers=31)) is None
    assert find_calibration(text_config(rope_theta=10000.0)) is None
    fp = fingerprint(SimpleNamespace(**{k: v for k, v in SMOL.items() if k != "head_dim"}))
    assert fp["head_dim"] == 64  # derived from hidden_size / heads


def test_resolve(caplog):
    layers = set(range(30))
    cfg = qllm.QLLMConfig.small()
    with caplog.at_level(logging.INFO, logger="qllm"):
        assert resolve_question_heads(cfg, text_config(), layers) == tuple(
            sorted(tuple(p) for p in find_calibration(text_config())["question_heads"]))
        assert "calibration smollm2-135m-instruct.json" in caplog.text
        assert resolve_question_heads(cfg, text_config(vocab_size=1000), layers) is None
        assert "no question-head calibration" in caplog.text
    assert resolve_question_heads(cfg.replace(question_heads=None), text_config(), layers) is None
    assert resolve_question_heads(cfg.replace(strategy="infllm"), text_config(), layers) is None
    explicit = cfg.replace(question_heads=[(3, 1)])
    assert resolve_question_heads(explicit, text_config(), layers) == ((3, 1),)
    with pytest.raises(ValueError, match="layer 3 is not a patched attention layer"):
        resolve_question_heads(explicit, text_config(), {0, 1, 2})
    with pytest.raises(ValueError, match="head 9 of layer 3"):
        resolve_question_heads(cfg.replace(question_heads=[(3, 9)]), text_config(), layers)


def test_load_calibration(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"question_heads": [[2, 1], [0, 3]]}))
    assert load_calibration(str(good)) == ((2, 1), (0, 3))
    with pytest.raises(FileNotFoundError, match="no such calibration file"):
        load_calibration(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    for text, msg in (("{", "not JSON"), ("{}", "no 'question_heads'"), ('{"question_heads": [[1]]}', "pairs")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_calibration(str(bad))


def test_config_validation():
    assert qllm.QLLMConfig().question_heads == "auto"
    assert qllm.QLLMConfig(question_heads=[[1, 2], [0, 0]]).question_heads == ((0, 0), (1, 2))
    for bad, exc in (([], ValueError), ([(1, -1)], ValueError), ([(1.5, 0)], ValueError), (3, TypeError),
                     ("all", TypeError), ([(0, 1), (0, 1)], ValueError), ([(True, 0)], ValueError)):
        with pytest.raises(exc, match="QLLMConfig.question_heads"):
            qllm.QLLMConfig(question_heads=bad)


@pytest.mark.slow
def test_calibrate_on_the_default_model():
    """A short calibration run finds heads that rank planted facts' blocks first."""
    model, tok = qllm.load_model()
    seen = []
    res = calibrate(model, tok, n_tokens=2000, depths=(0.3,), needles=CALIBRATION_NEEDLES[:2], n_heads=5,
                    progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    hits = torch.tensor(res["hits"])
    assert hits.shape == (30, 9) and res["examples"] == 2 and int(hits.max()) <= 2
    heads = [tuple(p) for p in res["question_heads"]]
    assert len(set(heads)) == 5 and all(0 <= l < 30 and 0 <= h < 9 for l, h in heads)
    assert all(int(hits[l, h]) == 2 for l, h in heads)  # these heads found the fact in both texts
    with pytest.raises(ValueError, match="n_heads"):
        calibrate(model, tok, n_heads=0)
