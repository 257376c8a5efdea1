"""The CUDA sources compile for both targets, with no GPU needed.

setup.py builds (or, with a CPU torch, compile-checks) the default target,
sm_90a, where head dim 128 runs the wgmma attention kernel.  An sm_90 build
(QLLM_CUDA_ARCH=90) must still compile: there the wgmma wrappers compile to
traps that the host never launches, and every kernel runs mma.sync.  This
test compiles csrc/cuda/*.cu for sm_90, and checks in the sm_90a object that
the attention kernel really contains wgmma (HGMMA) instructions while the
sm_90 one has none.  Skipped without nvcc.
"""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from _cuda_helpers import ROOT, find_nvcc

NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _compile(src: str, arch: str, out: str, extra: tuple[str, ...] = ()) -> None:
    target = f"-arch=compute_{arch}" if "-ptx" in extra else f"-gencode=arch=compute_{arch},code=sm_{arch}"
    cmd = [NVCC, "-O1", "-std=c++20", target, "--expt-relaxed-constexpr",
           "-I" + os.path.join(ROOT, "csrc", "include"), *extra, src, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"nvcc failed for {os.path.basename(src)} (sm_{arch}):\n" + r.stderr[-4000:]


def test_sources_exist():
    names = {os.path.basename(s) for s in SOURCES}
    assert {"attend.cu", "ops_kernels.cu"} <= names, names


@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_compiles_for_sm90(src, tmp_path):
    _compile(src, "90", str(tmp_path / "k.o"), ("-c",))


def _ptx(arch: str, tmp_path, defines: tuple[str, ...]) -> str:
    out = str(tmp_path / f"attend_{arch}.ptx")
    _compile(os.path.join(ROOT, "csrc", "cuda", "attend.cu"), arch, out, ("-ptx", *defines))
    with open(out) as f:
        return f.read()


def test_wgmma_only_in_the_sm90a_build(tmp_path):
    """The sm_90a PTX issues wgmma.mma_async (S = Q K^T m64n64k16 and P V
    m64n128k16) and waits with wait_group 1 (the pipeline); sm_90 has none."""
    a = _ptx("90a", tmp_path, ("-DQLLM_SM90A=1",))
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in a
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in a
    assert "wgmma.wait_group.sync.aligned 1;" in a
    # the attention on wgmma with the wait for P V after the softmax (QLLM_ATTN_WAIT_LATE=1) and without
    for wl in (0, 1):
        assert f"attn_kernelI13__nv_bfloat16Li128ELi1ELi4ELb1ELb{wl}E" in a
    # the token scores on wgmma: one and two Q stages, both dtypes
    for dt in ("13__nv_bfloat16", "6__half"):
        for qst in (1, 2):
            assert f"tscore_wg_kernelI{dt}Li128ELi{qst}E" in a
    p = _ptx("90", tmp_path, ())
    assert "wgmma" not in p
    assert "tscore_wg_kernel" not in p
