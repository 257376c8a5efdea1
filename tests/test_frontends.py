"""User-facing entry points on the real default model: qllm.generate, the pipeline task,
the CLI, and the quickstart notebook (executed with a short text so it cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qllm
from qllm.data import Needle

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDLE = Needle("The secret ingredient of the soup is saffron.", "What is the secret ingredient of the soup?",
                "saffron")
SHORT = ("The kitchen was busy all morning. " * 6) + NEEDLE.fact + (" Guests arrived at noon." * 4)


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    return qllm.load_model()


def test_generate_helper_short_context_answers(model_tok):
    model, tok = model_tok
    answer = qllm.generate(model, tok, SHORT, NEEDLE.question, config=qllm.QLLMConfig.small(), max_new_tokens=12)
    assert NEEDLE.answer in answer
    assert not qllm.is_patched(model)


def test_generate_helper_matches_unpatched_on_short_text(model_tok):
    """Shorter than n_init + n_local: qllm is ordinary attention, so greedy text is identical."""
    model, tok = model_tok
    ids = qllm.build_prompt(tok, SHORT, NEEDLE.question)
    assert ids.shape[1] < 128 + 256
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()
    got = qllm.generate(model, tok, SHORT, NEEDLE.question, config=qllm.QLLMConfig.small(), max_new_tokens=12)
    assert got == want


def test_generate_helper_bad_input(model_tok):
    model, tok = model_tok
    with pytest.raises(TypeError, match="context"):
        qllm.generate(model, tok, None, "q")
    with pytest.raises(ValueError, match="max_new_tokens"):
        qllm.generate(model, tok, "text", "q", max_new_tokens=0)


def test_pipeline_task(model_tok):
    from transformers import pipeline

    model, tok = model_tok
    pipe = pipeline("qllm-text-generation", model=model, tokenizer=tok)
    out = pipe(SHORT, question=NEEDLE.question, max_new_tokens=12, qllm_config=qllm.QLLMConfig.small())
    assert NEEDLE.answer in out["generated_text"]
    out2 = pipe({"context": SHORT, "question": NEEDLE.question}, max_new_tokens=12,
                qllm_config=qllm.QLLMConfig.small())
    assert out2["generated_text"] == out["generated_text"]
    assert not qllm.is_patched(model)


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "qllm", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600, **kw)


def test_cli_ask(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text(SHORT)
    r = _cli("ask", str(f), "--question", NEEDLE.question, "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert NEEDLE.answer in r.stdout
    assert "tokens" in r.stderr  # what was read is reported


def test_cli_errors(tmp_path):
    r = _cli("ask", str(tmp_path / "missing.txt"), "--question", "x")
    assert r.returncode == 2 and "no such file" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    r = _cli("ask", str(empty), "--question", "x")
    assert r.returncode == 2 and "empty" in r.stderr
    r = _cli("ask", str(empty))
    assert r.returncode != 0 and "--question" in r.stderr
    r = _cli("ask", str(empty), "--question", "x", "--topk", "-1")
    assert r.returncode == 2 and "topk" in r.stderr


def test_quickstart_notebook_executes(monkeypatch):
    """Run every code cell of notebooks/quickstart.ipynb in one namespace (short text)."""
    monkeypatch.setenv("QLLM_NB_TOKENS", "2500")
    with open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")) as f:
        nb = json.load(f)
    ns: dict = {}
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code_cells) >= 3
    for cell in code_cells:
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), ns)
    cfg = ns["cfg"]
    retrieved = ns["retrieved"]
    assert len(retrieved) == ns["model"].config.num_hidden_layers
    n_blocks = (ns["ids"].shape[1] - cfg.n_init - cfg.n_local) // cfg.block_size
    for blocks in retrieved.values():
        assert len(blocks) == min(cfg.topk, n_blocks)
        assert all(0 <= b < n_blocks + 1 for b in blocks) and blocks == sorted(blocks)
    assert isinstance(ns["answer"], str) and ns["answer"]
    assert 0 <= ns["needle_block"] <= n_blocks


def test_cli_progress_shows_the_host_tier(capsys):
    """The reading bar reports the memories' bytes, and the host tier apart when there is one."""
    from qllm.cli import _Progress

    class FakeCache:
        def __init__(self, total, host):
            self.total, self.host = total, host

        def nbytes(self):
            return self.total

        def host_nbytes(self):
            return self.host

    p = _Progress(True)
    p(10, 20, FakeCache(3 * 2**20, 0))
    p(20, 20, FakeCache(5 * 2**20, 2 * 2**20))
    err = capsys.readouterr().err
    assert "memory 3.0 MiB," in err
    assert "memory 5.0 MiB (host tier 2.0 MiB)" in err
