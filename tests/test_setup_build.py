"""setup.py's side-by-side compiles (_ParallelCompiles): compile commands overlap, the link waits for
all of them, and a failed compile stops the build with the command named (no link)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("qllm_setup_under_test", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() runs only as __main__
    return mod


class _Compiler:
    """Stands in for the distutils compiler: ``call`` runs a command and records it."""

    def __init__(self):
        self.ran = []

    def call(self, cmd, env=None):
        import subprocess
        subprocess.check_call(cmd, env=env)
        self.ran.append(list(cmd))


def _compile_cmd(tmp_path, name: str, code: int = 0):
    """A 'compile' (has -c and -o): records its start and end times, sleeps, exits with code."""
    script = (f"import time,sys; open({str(tmp_path / (name + '.start'))!r},'w').write(repr(time.time())); "
              f"time.sleep(1.0); open({str(tmp_path / (name + '.end'))!r},'w').write(repr(time.time())); "
              f"sys.exit({code})")
    return [sys.executable, "-c", script, "-o", str(tmp_path / (name + ".o"))]


def _times(tmp_path, name):
    return (float((tmp_path / f"{name}.start").read_text()), float((tmp_path / f"{name}.end").read_text()))


def test_compiles_overlap_and_the_link_waits(tmp_path):
    mod = _setup_module()
    comp = _Compiler()
    link = [sys.executable, "-c", "pass"]  # no -o: a non-compile command
    with mod._ParallelCompiles(comp, jobs=3):
        for n in ("a", "b", "c"):
            comp.call(_compile_cmd(tmp_path, n))
        assert comp.ran == []  # the compiles went to the background
        comp.call(link)
        # the link ran only after every compile had finished
        assert comp.ran == [link]
        assert all((tmp_path / f"{n}.end").exists() for n in ("a", "b", "c"))
    spans = [_times(tmp_path, n) for n in ("a", "b", "c")]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all three ran at once
    assert "call" not in comp.__dict__  # the compiler's own method is back


def test_jobs_bound_the_compiles_at_once(tmp_path):
    mod = _setup_module()
    comp = _Compiler()
    with mod._ParallelCompiles(comp, jobs=1):
        for n in ("a", "b"):
            comp.call(_compile_cmd(tmp_path, n))
    (sa, ea), (sb, eb) = _times(tmp_path, "a"), _times(tmp_path, "b")
    assert ea <= sb  # one at a time: b started after a ended


def test_a_failed_compile_stops_the_link(tmp_path):
    from setuptools.errors import CompileError

    mod = _setup_module()
    comp = _Compiler()
    bad = _compile_cmd(tmp_path, "bad", code=3)
    with pytest.raises(CompileError, match="command failed \\(3\\)"):
        with mod._ParallelCompiles(comp, jobs=2):
            comp.call(_compile_cmd(tmp_path, "good"))
            comp.call(bad)
            comp.call([sys.executable, "-c", "pass"])
    assert comp.ran == []  # the link never ran


def test_max_jobs_is_checked(monkeypatch):
    mod = _setup_module()
    monkeypatch.setenv("MAX_JOBS", "0")
    with pytest.raises(SystemExit, match="MAX_JOBS: expected a positive integer"):
        mod._jobs()
    monkeypatch.setenv("MAX_JOBS", "5")
    assert mod._jobs() == 5
