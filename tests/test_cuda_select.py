"""The block top-k of the CUDA fast path (csrc/cuda/attend.cu select_kernel:
warp rounds for k <= 8, radix select above) against a host top-k.

benchmarks/micro/select_combine.cu includes attend.cu, runs select_kernel on
180 inputs full of ties (few distinct values, -0.0 next to +0.0, -inf) for
n from 1 to 12000 and k from 1 to 4096, compares the ids with a host top-k
(descending score, ties toward the lower index, ids ascending), and exits 2
on any mismatch; then it times the kernels.  This test builds it with nvcc
and runs it.  Skipped without CUDA or nvcc.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from _cuda_helpers import ROOT
from _cuda_helpers import find_nvcc as _nvcc


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    pytest.mark.skipif(_nvcc() is None, reason="nvcc not found"),
]


def test_select_kernel_matches_host_topk(tmp_path):
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip(f"the fast path is built for sm_90; this GPU is sm_{major}{minor}")
    exe = str(tmp_path / "select_combine")
    cmd = [_nvcc(), "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-arch=sm_90",
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc"),
           os.path.join(ROOT, "benchmarks", "micro", "select_combine.cu"), "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    m = re.search(r"select_kernel check: (\d+) of (\d+) cases wrong", run.stdout)
    assert m is not None, run.stdout[-4000:] + run.stderr[-2000:]
    wrong, cases = int(m.group(1)), int(m.group(2))
    assert cases >= 150 and wrong == 0, run.stdout[-4000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "status: no error" in run.stdout
