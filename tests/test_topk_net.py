"""The block top-k's sorting network (csrc/cuda/topk_net.cuh), checked on the CPU.

attend.cu's topk_lists (the device top-k of every selection with k <= 8) keeps a
sorted list per thread and merges them with butterfly exchanges.
tests/cuda_host/topk_net_check.cpp runs the same list and merge code with the
threads and the warps' exchanges emulated, and compares the result with a plain
sort on 512 tie-heavy cases (NaN, -0 / +0, -inf, n from 0 to 8192, k from 1 to 8).
The CUDA tests check the kernels themselves on a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_topk_network_matches_a_sort(tmp_path):
    exe = str(tmp_path / "topk_net_check")
    src = os.path.join(ROOT, "tests", "cuda_host", "topk_net_check.cpp")
    build = subprocess.run([CXX, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror",
                            "-I" + os.path.join(ROOT, "csrc", "cuda"), src, "-o", exe],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stdout.strip() == "cases 512 wrong 0"
