"""The block top-k's list code (csrc/cuda/topk_net.cuh), checked on the CPU.

attend.cu's topk_lists (the device top-k of every selection with k <= 8) keeps a
sorted list per thread and takes the best k in rounds of warp reductions; the
seam's select CTA ranks the blocks not cut now, and the last CTA merges that list
with the cut blocks' scores.  tests/cuda_host/topk_net_check.cpp runs the same
list code with the threads, the warps' reductions and the shuffles emulated, and
compares both with a plain sort: 512 tie-heavy selections (NaN, -0 / +0, -inf, n
from 0 to 8192, k from 1 to 8) and 2048 merges (cut ranges at the end, in the
middle, past the end; the cut blocks winning or not).  The CUDA tests check the
kernels themselves on a GPU.
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
    assert run.stdout.strip() == "cases 2560 wrong 0"
