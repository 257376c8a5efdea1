"""The CUDA sources compile for both targets, with no GPU needed.

setup.py builds (or, with a CPU torch, compile-checks) the default target,
sm_90a, where head dim 128 runs the wgmma attention kernel.  An sm_90 build
(QLLM_CUDA_ARCH=90) must still compile: there the wgmma wrappers compile to
traps that the host never launches, and every kernel runs mma.sync.  This
test compiles csrc/cuda/*.cu for sm_90, and checks in the sm_90a object that
the attention kernel really contains wgmma (HGMMA) instructions while the
sm_90 one has none, and (with cuobjdump) where the machine code of the
pipelined kernel waits.  Skipped without nvcc.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
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


# ------------------------------------------------------- machine code (SASS)

def _find_cuobjdump() -> str | None:
    """cuobjdump beside nvcc, on the PATH, or from the nvidia-cuda-cuobjdump wheel (the Makefile
    installs it and nvidia-cuda-nvdisasm, which it runs, into .venv)."""
    if NVCC is not None and os.path.exists(os.path.join(os.path.dirname(NVCC), "cuobjdump")):
        return os.path.join(os.path.dirname(NVCC), "cuobjdump")
    p = shutil.which("cuobjdump")
    if p:
        return p
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec is not None else []:
        hits = sorted(glob.glob(os.path.join(base, "cu*", "bin", "cuobjdump")))
        if hits:
            return hits[-1]
    return None


CUOBJDUMP = _find_cuobjdump()


def _sass_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{mangled kernel name: [(address, instruction), ...]} of a cuobjdump --dump-sass listing."""
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    return funcs


def _main_loop(ins: list[tuple[int, str]]) -> list[str]:
    """The instructions of the longest loop (the span of the longest backward branch)."""
    best = None
    for a, t in ins:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and (best is None or a - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), a)
    assert best is not None, "no loop"
    return [t for a, t in ins if best[0] <= a <= best[1]]


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found")
def test_wgmma_wait_after_softmax_in_machine_code(tmp_path):
    """The point of the pipelined wgmma attention: the softmax of tile t runs while P V of tile t-1
    is on the tensor cores.  ptxas hoists the wait for P V above the softmax when the two sit in
    straight-line code (the default kernel, WL = false: recorded, not asserted); the
    QLLM_ATTN_WAIT_LATE kernel (WL = true) must keep all 32 exponentials of the tile before the
    wait, with the loop's 12 wgmma (8 for S, 4 for P V) and the wait for S of tile t+1 only."""
    cubin = str(tmp_path / "attend.cubin")
    cmd = [NVCC, "-cubin", "-O3", "-std=c++20", "-gencode=arch=compute_90a,code=sm_90a",
           "--expt-relaxed-constexpr", "-DQLLM_SM90A=1", "-I" + os.path.join(ROOT, "csrc", "include"),
           os.path.join(ROOT, "csrc", "cuda", "attend.cu"), "-o", cubin]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    env = dict(os.environ, PATH=os.path.dirname(CUOBJDUMP) + os.pathsep + os.environ.get("PATH", ""))  # nvdisasm
    r = subprocess.run([CUOBJDUMP, "--dump-sass", cubin], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    funcs = _sass_functions(r.stdout)
    for dt in ("13__nv_bfloat16", "6__half"):
        report = {}
        for wl in (0, 1):
            names = [n for n in funcs if f"attn_kernelI{dt}Li128ELi1ELi4ELb1ELb{wl}E" in n]
            assert len(names) == 1, names
            loop = _main_loop(funcs[names[0]])
            waits = [i for i, t in enumerate(loop) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in t]
            assert waits, f"{dt} WL={wl}: no wait for P V in the main loop"
            exps_before = sum("MUFU.EX2" in t for t in loop[:waits[0]])
            report[wl] = exps_before
            if wl == 1:
                assert sum("HGMMA" in t for t in loop) == 12
                assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in t for t in loop)
                assert exps_before >= 32, f"{dt}: only {exps_before} exponentials before the wait for P V"
        print(f"{dt}: exponentials before the wait for P V: default {report[0]}, QLLM_ATTN_WAIT_LATE {report[1]}")
