"""Shared pieces of the CUDA tests (imported by tests/test_cuda*.py; no tests here)."""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the nvcc lookup (CUDA_HOME / CUDA_PATH, the PATH, /usr/local/cuda, as setup.py looks) lives
# beside the machine-code report that also needs it
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from sass_report import find_nvcc  # noqa: E402,F401


class DecodeStepRunner:
    """Feeds decode tokens to a CudaDecodeStep the way GraphDecoder does: through static input
    buffers, eagerly (graph=False) or eagerly once, then captured and replayed (graph=True); the
    tokens whose ``prepare()`` declines go through attend_cuda on the same memory.  With
    ``allow_cut`` the tokens that cut a block run as the step too (graph=True: a second graph,
    captured with the first when the step ``can_cut``, whose launch ends with the cut); else
    they are declined.

    ``run(q1, k1, v1)`` -> (output, retrieved ids, whether the step ran); ``n_cuts`` counts the
    steps that cut a block."""

    def __init__(self, step, mem, rope, scaling, q, k, v, graph: bool, allow_cut: bool = False):
        self.step, self.mem, self.rope, self.scaling, self.graph = step, mem, rope, scaling, graph
        self.allow_cut = allow_cut
        self.qs, self.ks, self.vs = torch.zeros_like(q[:, :1]), torch.zeros_like(k[:, :1]), torch.zeros_like(v[:, :1])
        self.g = None  # {cuts: graph}
        self.n_cuts = 0

    def run(self, q1, k1, v1):
        from qllm.gpu import attend_cuda

        self.qs.copy_(q1)
        self.ks.copy_(k1)
        self.vs.copy_(v1)
        if not self.step.prepare(allow_cut=self.allow_cut):
            return attend_cuda(self.mem, self.qs, self.ks, self.vs, self.rope, self.scaling), self.mem.retrieved_log, False
        self.n_cuts += self.step.cuts
        if not self.graph or self.g is None:
            got = self.step.launch(self.qs, self.ks, self.vs)  # eager (the first one also warms up)
            if self.graph:
                torch.cuda.synchronize()
                cuts, self.g = self.step.cuts, {}
                # the cut variant exists only where the step can cut (GraphDecoder checks the same)
                for c in ([False, True] if self.allow_cut and self.step.can_cut else [False]):
                    self.step.cuts = c
                    self.g[c] = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self.g[c]):
                        self.step.launch(self.qs, self.ks, self.vs)  # captured, not run
                self.step.cuts = cuts
        else:
            self.g[self.step.cuts].replay()
            got = self.step.out
        return got, self.step.retrieved, True


class ByteTokenizer:
    """The smallest tokenizer qllm.generate needs: one token per byte (the tiny model's vocab is 256)."""

    chat_template = None
    pad_token_id = None
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return {"input_ids": torch.tensor([list(text.encode())])}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)
