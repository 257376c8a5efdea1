"""Fused CUDA kernels for the model's RMSNorms and MLP gates (``torch.ops.qllm.rms_norm``,
``torch.ops.qllm.silu_mul``; csrc/cuda/fused.cu).

Hugging Face's Llama-style RMSNorm runs about six elementwise kernels over float32 copies of
the hidden states, and the MLP's ``act_fn(gate) * up`` two more; at 128K tokens they cost more
GPU time than the attention.  :func:`fuse` gives every matching module an instance ``forward``
that calls one fused kernel instead:

* RMSNorm modules of the classes in :data:`NORM_CLASSES` (Llama, Mistral, Qwen2, Qwen3: the
  ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)`` formula; Gemma's
  ``(1 + weight)`` norm is not one of them) -> ``rms_norm(x, weight, eps)``.  Same rounding
  steps as the module, so the output is bitwise the module's except where the f32 sum of
  squares, added in another order, rounds differently (an ulp of the output, rarely);
* MLP modules of the classes in :data:`MLP_CLASSES` with SiLU as ``act_fn`` ->
  ``down_proj(silu_mul(gate_proj(x), up_proj(x)))``, bitwise the module's output.

The fused forward runs when the input is a CUDA float16 / bfloat16 tensor, the module's
weights have that dtype, no gradient is needed and qllm was built with CUDA; otherwise the
module's own forward runs, and the reason is logged once (INFO, logger ``qllm``).
:func:`unfuse` restores the modules exactly.  :func:`qllm.patch` calls :func:`fuse` when
``QLLMConfig.fused_kernels`` is on (the default) and ``unpatch`` undoes it.

Fusing twice is idempotent: modules already fused are left as they are (and only the newly
fused ones are returned).  Modules that already carry an instance ``forward`` of someone
else's (e.g. an accelerate offload hook) are left alone, logged.
"""

from __future__ import annotations

import logging
import types

import torch

from ._ext import ops
from ._log import log_once

__all__ = ["fuse", "unfuse", "is_fused", "NORM_CLASSES", "MLP_CLASSES"]

NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
"""Class names whose forward is ``weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(dtype)``."""

MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
"""Class names whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

_FUSED = "_qllm_fused"  # instance attribute of a fused module: what fuse replaced ("norm" / "mlp")
_HALF = (torch.float16, torch.bfloat16)
_cuda_ops: bool | None = None


def _have_cuda_ops() -> bool:
    """Whether this build of qllm registered CUDA kernels for both ops (checked once)."""
    global _cuda_ops
    if _cuda_ops is None:
        has = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
        _cuda_ops = (hasattr(ops, "rms_norm") and hasattr(ops, "silu_mul") and has is not None
                     and has("qllm::rms_norm", "CUDA") and has("qllm::silu_mul", "CUDA"))
    return _cuda_ops


def _why_not(what: str, x: torch.Tensor, weights: tuple) -> str | None:
    """None when the fused kernel can run on x with these weights, else the reason (a message)."""
    if not _have_cuda_ops():
        return f"qllm: fused {what}: this qllm build has no CUDA kernels: the module's own forward runs"
    if not x.is_cuda:
        return f"qllm: fused {what}: input on {x.device.type}, not CUDA: the module's own forward runs"
    if x.dtype not in _HALF:
        return (f"qllm: fused {what}: input dtype {x.dtype} (fused kernels take float16 / bfloat16): "
                "the module's own forward runs")
    for w in weights:
        if w.dtype != x.dtype or w.device != x.device:
            return (f"qllm: fused {what}: weight {w.dtype} on {w.device}, input {x.dtype} on {x.device}: "
                    "the module's own forward runs")
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return f"qllm: fused {what}: gradients needed (the fused kernels have none): the module's own forward runs"
    return None


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    why = _why_not("RMSNorm", hidden_states, (self.weight,))
    if why is None:
        return ops.rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
    log_once(logging.INFO, why)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    why = _why_not("MLP", x, (self.gate_proj.weight, self.up_proj.weight))
    if why is None:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))
    log_once(logging.INFO, why)
    return type(self).forward(self, x)


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _kind(module: torch.nn.Module) -> str | None:
    """"norm" / "mlp" when fuse handles this module, else None."""
    name = type(module).__name__
    if name in NORM_CLASSES:
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None),
                                                                     (int, float)):
            return "norm"
    elif name in MLP_CLASSES:
        projs = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(p, torch.nn.Linear) for p in projs) and _is_silu(getattr(module, "act_fn", None)):
            return "mlp"
    return None


def is_fused(module: torch.nn.Module) -> bool:
    """Whether :func:`fuse` replaced this module's forward."""
    return module.__dict__.get(_FUSED) is not None


def fuse(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Give every matching RMSNorm and MLP module of ``model`` the fused forward (see the module
    docstring); returns the modules fused by this call (none already fused are counted again)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qllm.fused.fuse: model: expected a torch.nn.Module, got {type(model).__name__}")
    done = []
    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None or is_fused(mod):
            continue
        if "forward" in mod.__dict__:
            log_once(logging.INFO, f"qllm: fused kernels: {type(mod).__name__} {name!r} already has an instance "
                                   "forward (a hook of another library?): left as it is")
            continue
        mod.forward = types.MethodType(_norm_forward if kind == "norm" else _mlp_forward, mod)
        setattr(mod, _FUSED, kind)
        done.append(mod)
    return done


def unfuse(model: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> int:
    """Restore the forwards :func:`fuse` replaced: of ``modules`` (e.g. what one ``fuse`` call
    returned) or of every fused module of ``model``.  Returns how many were restored."""
    mods = list(model.modules()) if modules is None else modules
    n = 0
    for mod in mods:
        if is_fused(mod):
            del mod.__dict__["forward"]
            del mod.__dict__[_FUSED]
            n += 1
    return n
