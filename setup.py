"""Build qllm's native parts.

Three pieces:
  * ``qllm_core``  -- the C11 core (csrc/src), a static library (build_clib);
  * ``qllm._core`` -- CPython + NumPy C API binding of the core (csrc/python);
  * ``qllm._C``    -- ATen extension registering ``torch.ops.qllm`` (csrc/torch),
                      plus the CUDA kernels (csrc/cuda) when CUDA is built.

``QLLM_CUDA=auto|0|1`` (default auto): with ``auto`` the CUDA sources are built
when nvcc is found.  If the installed torch is a CPU build, the CUDA sources are
still compiled (to catch errors) but not linked: there is no CUDA torch to
register them with.  ``QLLM_CUDA=1`` fails when nvcc is missing.
``QLLM_CUDA_ARCH`` (default ``90a``) picks the target (sm_90a; ``90`` for sm_90 / compute_90).
``MAX_JOBS`` (default: the CPU count) bounds the compilers run side by side (1: one by one).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
from setuptools import setup
from setuptools.extension import Extension

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")
C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-fPIC", "-pthread"]
CXX_FLAGS = ["-std=c++20", "-O3", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]


def _log(msg: str) -> None:
    print(f"[qllm setup] {msg}", file=sys.stderr)


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in ("/usr/local/cuda/bin/nvcc",):
        if os.path.exists(cand):
            return cand
    return None


def _cuda_mode() -> str:
    mode = os.environ.get("QLLM_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"QLLM_CUDA: expected auto, 0 or 1, got {mode!r}")
    return mode


def _nvcc_flags(arch: str) -> list[str]:
    """QLLM_CUDA_ARCH=90a (the default) builds the arch-specific target, which the
    wgmma attention kernel needs (the default at run time; QLLM_ATTN_WGMMA=0 picks
    the mma.sync one); QLLM_NVCC_EXTRA
    adds flags (e.g. -DQLLM_WG_MNMAJ_LBO=... from benchmarks/micro/wgmma_probe.cu)."""
    flags = [
        "-O3",
        "-std=c++20",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "--expt-relaxed-constexpr",
        "-Xcompiler=-Wall,-Wextra",
        "-lineinfo",
        f"-I{INCLUDE}",
    ]
    if arch.endswith("a"):
        flags.append("-DQLLM_SM90A=1")
    return flags + os.environ.get("QLLM_NVCC_EXTRA", "").split()


def _jobs() -> int:
    """Compiler processes run at once (``MAX_JOBS``, default: the CPU count; 1 = one by one)."""
    raw = os.environ.get("MAX_JOBS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise SystemExit(f"MAX_JOBS: expected a positive integer, got {raw!r}")
        return int(raw)
    return max(1, os.cpu_count() or 1)


def _compile_cuda_check(nvcc: str, arch: str, build_temp: str) -> None:
    """Compile every .cu to an object: CPU torch cannot load them, but errors surface."""
    from concurrent.futures import ThreadPoolExecutor

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    os.makedirs(build_temp, exist_ok=True)

    def one(src: str) -> None:
        obj = os.path.join(build_temp, os.path.basename(src) + ".o")
        _log("nvcc (compile check) " + os.path.basename(src))
        subprocess.check_call([nvcc, "-c", src, "-o", obj, "-Xcompiler=-fPIC", *_nvcc_flags(arch)])

    with ThreadPoolExecutor(max_workers=_jobs()) as pool:
        list(pool.map(one, sources))  # re-raises the first failure
    _log(f"compiled {len(sources)} CUDA source(s); not linked: torch is a CPU build")


class _ParallelCompiles:
    """Runs an extension's compiler commands as background processes, at most ``jobs`` at once.

    The distutils compiler compiles one source at a time through ``call`` (``spawn`` in older
    setuptools) with the whole command line already formed, torch's nvcc swap included; this
    stands in for both on the compiler instance: a compile command (``-c``) starts and returns,
    anything else (the link) first waits for every compile and fails if one failed.
    """

    def __init__(self, compiler, jobs: int) -> None:
        self.compiler, self.jobs, self.running = compiler, jobs, []
        self.orig = {n: compiler.__dict__.get(n) for n in ("call", "spawn") if hasattr(compiler, n)}

    def __enter__(self):
        for name in self.orig:
            setattr(self.compiler, name, self._runner(getattr(self.compiler, name)))
        return self

    def __exit__(self, *exc) -> None:
        for name, own in self.orig.items():
            if own is None:
                self.compiler.__dict__.pop(name, None)
            else:
                setattr(self.compiler, name, own)
        self.wait()

    def wait(self, keep: int = 0) -> None:
        while len(self.running) > keep:
            cmd, proc = self.running.pop(0)
            if proc.wait() != 0:
                for _, other in self.running:
                    other.wait()
                self.running.clear()
                from setuptools.errors import CompileError
                raise CompileError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}")

    def _runner(self, original):
        def run(cmd, *args, **kwargs):
            if "-c" in cmd and "-o" in cmd and not args and set(kwargs) <= {"env"}:
                self.wait(self.jobs - 1)
                self.running.append((list(cmd), subprocess.Popen(list(cmd), env=kwargs.get("env"))))
                return None
            self.wait()
            return original(cmd, *args, **kwargs)
        return run


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    mode = _cuda_mode()
    arch = os.environ.get("QLLM_CUDA_ARCH", "90a")
    nvcc = _find_nvcc() if mode != "0" else None
    if mode == "1" and nvcc is None:
        raise SystemExit("QLLM_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    torch_has_cuda = torch.version.cuda is not None
    build_cuda = nvcc is not None and torch_has_cuda
    check_cuda = nvcc is not None and not torch_has_cuda

    core = Extension(
        "qllm._core",
        sources=sorted(glob.glob("csrc/python/*.c")),
        include_dirs=[INCLUDE, np.get_include()],
        extra_compile_args=C_FLAGS + ["-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION"],
        extra_link_args=["-pthread"],
    )
    torch_sources = sorted(glob.glob("csrc/torch/*.cpp"))
    # torch's headers are system headers for us: -Werror applies to our code only.
    from torch.utils.cpp_extension import include_paths

    cxx_flags = CXX_FLAGS + [f for p in include_paths() for f in ("-isystem", p)]
    if build_cuda:
        _log(f"building CUDA kernels for sm_{arch} with {nvcc}")
        ops = CUDAExtension(
            "qllm._C",
            sources=torch_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[INCLUDE],
            define_macros=[("QLLM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": _nvcc_flags(arch)},
            extra_link_args=["-pthread"],
        )
    else:
        if nvcc is None:
            _log("nvcc not found or QLLM_CUDA=0: CPU-only build")
        ops = CppExtension(
            "qllm._C",
            sources=torch_sources,
            include_dirs=[INCLUDE],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-pthread"],
        )
    return [core, ops], (nvcc, arch) if check_cuda else None


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    exts, cuda_check = _extensions()

    # No ninja: torch's ninja path compiles .c files with the C++ compiler; the plain
    # path compiles the C binding with the C compiler and the torch extension as C++.
    class build_ext(BuildExtension.with_options(use_ninja=False)):
        def run(self):
            if cuda_check is not None:
                _compile_cuda_check(cuda_check[0], cuda_check[1],
                                    os.path.join(self.build_temp, "cuda_check"))
            super().run()

        def build_extension(self, ext):
            # the torch extension's sources (CUDA kernels included) compile side by side
            jobs = _jobs()
            if jobs == 1 or len(ext.sources) < 2:
                return super().build_extension(ext)
            _log(f"{ext.name}: {len(ext.sources)} sources, up to {jobs} compilers at once (MAX_JOBS)")
            with _ParallelCompiles(self.compiler, jobs):
                return super().build_extension(ext)

    setup(
        libraries=[
            (
                "qllm_core",
                {
                    "sources": sorted(glob.glob("csrc/src/*.c")),
                    "include_dirs": [INCLUDE],
                    "cflags": C_FLAGS,
                },
            )
        ],
        ext_modules=exts,
        cmdclass={"build_ext": build_ext},
    )


if __name__ == "__main__":
    main()
