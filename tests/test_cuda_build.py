"""The CUDA sources compile for both targets, with no GPU needed.

setup.py builds (or, with a CPU torch, compile-checks) the default target,
sm_90a, where head dim 128 runs the wgmma attention kernel.  An sm_90 build
(QLLM_CUDA_ARCH=90) must still compile: there the wgmma wrappers compile to
traps that the host never launches, and every kernel runs mma.sync.  This
test compiles csrc/cuda/*.cu for sm_90, and checks in the sm_90a object that
the attention kernel really contains wgmma (HGMMA) instructions while the
sm_90 one has none, and (with cuobjdump) where the machine code of the
pipelined kernel waits; fused.cu's kernels keep to registers and 16-byte accesses; the CUDA
ops' bindings (csrc/torch/ops_cuda.cpp, ops_fused_cuda.cpp) pass a syntax check against the CPU
torch's headers.  Skipped without nvcc.
"""

from __future__ import annotations

import glob
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
    # the attention on wgmma
    assert "attn_kernelI13__nv_bfloat16Li128ELi1ELi4ELb1EE" in a
    # the token scores on wgmma: one and two Q stages, both dtypes
    for dt in ("13__nv_bfloat16", "6__half"):
        for qst in (1, 2):
            assert f"tscore_wg_kernelI{dt}Li128ELi{qst}E" in a
    p = _ptx("90", tmp_path, ())
    assert "wgmma" not in p
    assert "tscore_wg_kernel" not in p


# ------------------------------------------------------- machine code (SASS)

import sass_report  # noqa: E402  (benchmarks/sass_report.py, on the path via _cuda_helpers)

CUOBJDUMP = sass_report.find_cuobjdump(NVCC)


def _sm90a_functions(name: str, tmp_path_factory) -> dict:
    """{mangled kernel name: [(address, instruction), ...]} of csrc/cuda/<name> built for sm_90a."""
    if CUOBJDUMP is None:
        pytest.skip("cuobjdump not found")
    cubin = str(tmp_path_factory.mktemp("sass") / (name + ".cubin"))
    sass_report.compile_cubin(os.path.join(ROOT, "csrc", "cuda", name), cubin, "90a", nvcc=NVCC)
    return sass_report.sass_functions(sass_report.dump_sass(cubin, CUOBJDUMP))


@pytest.fixture(scope="module")
def sm90a_sass(tmp_path_factory):
    """attend.cu's kernels built for sm_90a (_sm90a_functions)."""
    return _sm90a_functions("attend.cu", tmp_path_factory)


def test_no_local_memory_in_the_default_kernels(sm90a_sass):
    """The kernels the default build runs keep their arrays in registers: no LDL/STL (a softmax
    reduction tree whose loops were not unrolled once put its array in local memory and made the
    attention 2.6x slower on the H100)."""
    default = [r"attn(_dyn)?_kernelI\w+Li(64|128)ELi1ELi4ELb[01]ELb[01]E", r"tscore(_wg|_dyn)?_kernelI",
               r"\d(prep|qcomb|qrec|cut|seam|combine|tier_copy|store_kv)_kernelI", r"\d(select|qsel|bscore|bscore_pairs)_kernel"]
    checked = {}
    for name, ins in sm90a_sass.items():
        if any(re.search(p, name) for p in default):
            checked[sass_report.short(name)] = sass_report.local_accesses([t for _, t in ins])
    assert len(checked) >= 30, sorted(checked)
    assert not {k: v for k, v in checked.items() if v}, {k: v for k, v in checked.items() if v}


def test_no_generic_memory_accesses(sm90a_sass):
    """Every load and store in attend.cu's kernels names its memory space (LDS/STS, LDG/STG):
    none is generic (LD/ST).  A shared-memory pointer rebuilt from a rounded integer, or one
    that may point to shared or global memory, made the attention's tile table, the token
    scores' lse reads and the top-k's score reads generic loads."""
    bad = {sass_report.short(n): sass_report.generic_accesses([t for _, t in ins]) for n, ins in sm90a_sass.items()}
    assert len(bad) >= 30
    assert not {k: v for k, v in bad.items() if v}, {k: v for k, v in bad.items() if v}


@pytest.fixture(scope="module")
def fused_sass(tmp_path_factory):
    """{short kernel name: [instruction, ...]} of fused.cu built for sm_90a."""
    funcs = _sm90a_functions("fused.cu", tmp_path_factory)
    return {sass_report.short(n): [t for _, t in ins] for n, ins in funcs.items()}


def test_fused_kernels_machine_code(fused_sass):
    """fused.cu (RMSNorm, SiLU-gate product): no local memory and no generic accesses in any kernel;
    the vector paths move 16 bytes per access -- the RMSNorm keeping NJ vectors of x (and of the
    weight) per thread reads each with one LDG.E.128 and writes with one STG.E.128, the silu_mul
    reads gate and up with one each -- and every RMSNorm takes rsqrtf (MUFU.RSQ) as torch.rsqrt does."""
    k = fused_sass
    assert len(k) == 2 * (2 * 8 + 2 + 2), sorted(k)  # dtypes x (vec: 2 row shapes x NJ 1..8, any: 2, silu: 2)
    assert not {n: v for n, ins in k.items() if (v := sass_report.local_accesses(ins))}
    assert not {n: v for n, ins in k.items() if (v := sass_report.generic_accesses(ins))}
    count = lambda n, s: sum(s in t for t in k[n])  # noqa: E731
    for dt in ("bf16", "f16"):
        for tpr in (32, 256):
            for nj in range(1, 9):
                n = f"rms_norm_vec_kernel<{dt},{tpr},{nj}>"
                assert (count(n, "LDG.E.128"), count(n, "STG.E.128")) == (2 * nj, nj), n
                assert count(n, "MUFU.RSQ") == 1, n
            assert count(f"rms_norm_any_kernel<{dt},{tpr}>", "LDG.E.128") == 0
            assert count(f"rms_norm_any_kernel<{dt},{tpr}>", "MUFU.RSQ") == 1
        n = f"silu_mul_kernel<{dt},1>"
        assert (count(n, "LDG.E.128"), count(n, "STG.E.128")) == (2, 1), n
        assert count(f"silu_mul_kernel<{dt},0>", "LDG.E.128") == 0


def test_wgmma_pipeline_in_machine_code(sm90a_sass):
    """The main loop of the wgmma attention (prefill and decode step) issues S of tile t+1 and
    P V of tile t (8 + 4 wgmma) and waits for S only (wait_group 1: P V keeps running), and it
    reports how many of the tile's exponentials precede the wait for P V of tile t-1 (ptxas
    hoists that wait; NOTES_gpu.md rounds 7-8 measured the order that keeps it late no faster)."""
    for kern, dt in [(k, d) for k in ("attn_kernel", "attn_dyn_kernel") for d in ("13__nv_bfloat16", "6__half")]:
        names = [n for n in sm90a_sass if f"{len(kern)}{kern}I{dt}Li128ELi1ELi4ELb1EE" in n]
        assert len(names) == 1, names
        loop = sass_report.main_loop(sm90a_sass[names[0]])
        assert sum("HGMMA.64x64x16" in t for t in loop) == 8, (kern, dt)
        assert sum("HGMMA.64x128x16" in t for t in loop) == 4, (kern, dt)
        assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in t for t in loop), (kern, dt)
        exps = sass_report.wait_position(loop)
        assert exps is not None and 0 <= exps <= 34, (kern, dt, exps)
        print(f"{kern} {dt}: exponentials before the wait for P V: {exps}; while S runs: "
              f"{sass_report.exps_under_s(loop)}")


def test_sass_report_exps_under_s():
    """The parser behind the overlap test, on a hand-written loop."""
    loop = ["HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88", "HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88, gsb0",
            "MUFU.EX2 R1, R1", "FADD R2, R2, R1", "MUFU.EX2 R3, R3", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
            "MUFU.EX2 R4, R4", "HGMMA.64x128x16.F32.BF16 R24, R152, gdesc[UR8].tnspB, R24, gsb0",
            "HGMMA.64x64x16.F32.BF16 R120, gdesc[UR8], R120, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1"]
    assert sass_report.exps_under_s(loop) == [2, 0]


def test_sass_report_names():
    """The report's short kernel names (no tools needed)."""
    n = "_ZN9qllm_cuda41_GLOBAL__N__a405865b_9_attend_cu_f1a1dc7111attn_kernelI13__nv_bfloat16Li128ELi1ELi4ELb1ELb0EEEvNS0_8AttnArgsE"
    assert sass_report.short(n) == "attn_kernel<bf16,128,1,4,1,0>"
    n = "_ZN9qllm_cuda41_GLOBAL__N__a405865b_9_attend_cu_f1a1dc7116tscore_wg_kernelI6__halfLi128ELi1EEEvNS0_6TsArgsE"
    assert sass_report.short(n) == "tscore_wg_kernel<f16,128,1>"
    loop = ["MUFU.EX2 R1, R1", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R2, R2"]
    assert sass_report.wait_position(loop) == 1 and sass_report.wait_position(loop[:1]) is None
    ins = [(0x10, "IMAD R1, R2, R3, R4"), (0x20, "@P0 BRA 0x10"), (0x30, "BRA 0x0"), (0x40, "EXIT")]
    # the longest backward branch (0x30 -> 0x0), not the inner one (0x20 -> 0x10)
    assert sass_report.main_loop(ins) == ["IMAD R1, R2, R3, R4", "@P0 BRA 0x10", "BRA 0x0"]
    assert sass_report.main_loop(ins[:1]) == []


@pytest.mark.parametrize("name", ["ops_cuda.cpp", "ops_fused_cuda.cpp"])
def test_ops_cuda_bindings_compile(name, tmp_path):
    """The CUDA ops' bindings (csrc/torch/ops_cuda.cpp, ops_fused_cuda.cpp) build only against a
    CUDA torch, so the extension build here skips them.  A syntax check against this CPU torch's
    headers -- they ship c10/cuda except one CMake-generated header, an empty stub here -- and
    nvcc's CUDA headers catches their errors before the GPU machine does.  The same check of a
    copy with an error injected inside the file's ``#ifdef QLLM_WITH_CUDA`` body must fail (the
    body is really compiled)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    dry = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'INCLUDES="(-I[^"]+)"', dry.stdout + dry.stderr)
    assert m, "nvcc --dryrun printed no include path:\n" + (dry.stdout + dry.stderr)[-2000:]
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    # the extension's C++ flags (setup.py CXX_FLAGS): torch's headers as system headers, -Werror
    torch_dir = os.path.join(ROOT, "csrc", "torch")
    cmd = [gxx, "-std=c++20", "-fsyntax-only", "-DQLLM_WITH_CUDA", "-Wall", "-Wextra", "-Werror",
           "-Wno-unused-parameter", *(f for p in torch_ext.include_paths() for f in ("-isystem", p)),
           "-isystem", str(tmp_path / "stub"), *m.group(1).replace("-I", "-isystem ").split(),
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + torch_dir]
    src = os.path.join(torch_dir, name)
    r = subprocess.run(cmd + [src], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(src) as f:
        text = f.read()
    end = text.rindex("#endif")  # the end of the QLLM_WITH_CUDA body
    bad = tmp_path / name  # its includes resolve through -I csrc/torch
    bad.write_text(text[:end] + 'int qllm_injected_error = "not an int";\n' + text[end:])
    r = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "qllm_injected_error" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name", ["seam_trace.cu", "select_combine.cu", "pc_attention.cu"])
def test_micro_benchmarks_compile(name, tmp_path):
    """The micro-benchmarks include attend.cu (seam_trace.cu with its QLLM_SEAM_TRACE phase
    stamps): they must keep compiling as the kernels change, or a GPU call is spent on it."""
    src = os.path.join(ROOT, "benchmarks", "micro", name)
    _compile(src, "90", str(tmp_path / "m.o"), ("-c", "-I" + os.path.join(ROOT, "csrc")))
