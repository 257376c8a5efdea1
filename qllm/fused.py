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
  ``down_proj(silu_mul(gate_proj(x), up_proj(x)))``, bitwise the module's output;
* decoder layers of the classes in :data:`LAYER_CLASSES` whose MLP fuses and whose class
  ``forward`` is the plain pre-norm block (checked on its source, :func:`_plain_layer`): the two
  residual adds move into the projections' GEMMs.  ``o_proj`` gets ``addmm(residual, x, W.T)``
  (cuBLAS adds the residual in its epilogue; in place into the input inside
  :func:`residual_in_place`, when the input is the previous fused layer's output) and
  ``down_proj`` adds into the post-attention hidden states in place, so the add kernels and
  their passes over the hidden states go.  Each
  sum is rounded once (the module rounds the product, then the sum): not bitwise the module's,
  closer to float32.

Inside :func:`rows_used` a fused decoder layer runs its attention over every row but ``o_proj``,
the post-attention norm and the MLP over only the last rows asked for: the patched model does
this for its last layer when the caller keeps only the last positions' logits (``logits_to_keep``
of the causal LM, as ``generate`` calls it), since the other rows of that layer's output feed
nothing.  At 128K tokens of an 8B model that is ~2% of the prefill.

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

import ast
import contextlib
import contextvars
import functools
import inspect
import logging
import textwrap
import types

import torch

from ._ext import ops
from ._log import log_once

__all__ = ["fuse", "unfuse", "is_fused", "residual_in_place", "rows_used", "NORM_CLASSES", "MLP_CLASSES", "LAYER_CLASSES"]

NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
"""Class names whose forward is ``weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(dtype)``."""

MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
"""Class names whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
"""Decoder layer classes whose residual adds fuse may fold into the GEMMs (when their forward is
the plain pre-norm block, :func:`_plain_layer`)."""

_FUSED = "_qllm_fused"  # instance attribute of a fused module: what fuse replaced ("norm" / "mlp" / "layer" / "residual")
_RESIDUAL = "_qllm_residual"  # o_proj's pending (residual, in place), set by the fused layer forward for one call
_LAYER_OUT = "_qllm_layer_out"  # mark of a fused layer's output tensor
_IN_PLACE = contextvars.ContextVar("qllm_residual_in_place", default=False)
_ROWS = contextvars.ContextVar("qllm_rows_used", default=None)  # (layer, n): see rows_used


@contextlib.contextmanager
def residual_in_place(on: bool = True):
    """Inside the block (this thread), a fused layer whose input is the previous fused layer's
    output adds its attention residual into that input in place (``addmm_``) instead of into a
    copy (``addmm`` copies the residual first: one more pass over the hidden states per layer).
    Only for callers that know no one else holds the layers' outputs: the patched model's forward
    (qllm.patch) turns it on for its layer loop unless hidden states are to be returned."""
    token = _IN_PLACE.set(bool(on))
    try:
        yield
    finally:
        _IN_PLACE.reset(token)
_HALF = (torch.float16, torch.bfloat16)
_cuda_ops: bool | None = None


@contextlib.contextmanager
def rows_used(layer: torch.nn.Module, n: int):
    """Inside the block (this thread), the fused decoder layer ``layer`` runs its attention over
    every row of its input (the attention's memory takes them all) but ``o_proj``'s residual GEMM,
    the post-attention norm and the MLP over only its last ``n`` rows; the other rows of the
    layer's output are NaN.  For a model's last layer when the caller uses only the last
    positions' outputs (the patched forward under ``logits_to_keep``): the rows it leaves out
    feed nothing.  Applies only where the layer's fused forward runs, inside
    :func:`residual_in_place`, with no hook that may hold the attention's output; elsewhere the
    layer computes every row."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"qllm.fused.rows_used: n: expected an int >= 0, got {n!r}")
    token = _ROWS.set((layer, n))
    try:
        yield
    finally:
        _ROWS.reset(token)


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


def _residual_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """o_proj of a fused layer: plain ``linear`` unless the layer left a residual for this call,
    which then enters the GEMM (``addmm``, one rounding).  A residual of another shape is left
    pending: the layer adds it itself."""
    pending = self.__dict__.get(_RESIDUAL)
    r, in_place, n = pending if pending is not None else (None, False, None)
    if r is None or r.shape != (*x.shape[:-1], self.out_features) or r.dtype != x.dtype or r.device != x.device:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    del self.__dict__[_RESIDUAL]
    if n is not None:  # rows_used: the last n rows only ([1, S, *]); the others are left to the layer
        S = r.shape[1]
        if in_place:
            if n > 0:
                r[0, S - n:].addmm_(x[0, S - n:], self.weight.t())
            return r
        out = torch.empty(r.shape, dtype=r.dtype, device=r.device)  # contiguous: the layer views its rows
        if n > 0:
            torch.addmm(r[0, S - n:], x[0, S - n:], self.weight.t(), out=out[0, S - n:])
        return out
    if in_place:
        r.view(-1, r.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), self.weight.t())
        return r
    return torch.addmm(r.reshape(-1, r.shape[-1]), x.reshape(-1, x.shape[-1]), self.weight.t()).view(r.shape)


def _layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    mlp, o_proj = self.mlp, self.self_attn.o_proj
    down = mlp.down_proj
    why = ("qllm: fused decoder layer: positional arguments after hidden_states: the module's own forward runs"
           if args else
           "qllm: fused decoder layer: hooks on its MLP or down_proj: the module's own forward runs"
           if mlp._forward_hooks or mlp._forward_pre_hooks or down._forward_hooks or down._forward_pre_hooks
           else _why_not("decoder layer", hidden_states,
                                 (o_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight, down.weight)))
    if why is not None:
        log_once(logging.INFO, why)
        return type(self).forward(self, hidden_states, *args, **kwargs)
    residual = hidden_states
    # in place into the input only when it is the previous fused layer's output, inside the
    # patched model's layer loop (residual_in_place): the caller's own tensors are never written
    prev = getattr(hidden_states, _LAYER_OUT, None)  # the fused layer that produced the input, if one did
    in_place = (_IN_PLACE.get() and prev is not None and hidden_states.is_contiguous()
                and _keeps_nothing(prev, inputs=False) and _keeps_nothing(self, inputs=True))
    n = _rows_of(self, hidden_states)
    o_proj.__dict__[_RESIDUAL] = (residual, in_place, n)
    try:
        # the class forward passes its named arguments and **kwargs through unchanged (_plain_layer)
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    finally:
        pending = o_proj.__dict__.pop(_RESIDUAL, None)
    if pending is not None:
        log_once(logging.WARNING, f"qllm: fused decoder layer {type(self).__name__}: o_proj did not take the "
                                  "residual (not called with the layer's shape): added apart")
        h = residual + h
        n = None  # o_proj computed every row
    if n is not None:  # rows_used: o_proj's output holds the last n rows; no one uses the others
        S = h.shape[1]
        if n < S:
            h[:, :S - n].fill_(float("nan"))
        if n > 0:
            last = h[:, S - n:]  # [1, n, hidden], contiguous
            x = self.post_attention_layernorm(last)
            act = ops.silu_mul(mlp.gate_proj(x), mlp.up_proj(x))
            last.view(n, -1).addmm_(act.view(n, -1), down.weight.t())
        setattr(h, _LAYER_OUT, self)
        return h
    # h is o_proj's output: this forward's own tensor, or its input written in place (ours too), so
    # the MLP's residual add goes into it in place -- unless a hook on o_proj or the attention may
    # hold it
    x = self.post_attention_layernorm(h)
    act = ops.silu_mul(mlp.gate_proj(x), mlp.up_proj(x))
    if _keeps_nothing(o_proj, inputs=False) and _keeps_nothing(self.self_attn, inputs=False):
        h.view(-1, h.shape[-1]).addmm_(act.view(-1, act.shape[-1]), down.weight.t())
    else:
        h = torch.addmm(h.reshape(-1, h.shape[-1]), act.view(-1, act.shape[-1]), down.weight.t()).view(h.shape)
    setattr(h, _LAYER_OUT, self)
    return h


def _rows_of(layer: torch.nn.Module, hidden_states: torch.Tensor) -> int | None:
    """The n of an active :func:`rows_used` for this layer call, or None (every row): only inside
    residual_in_place, one sequence ([1, S, hidden]), n < S, and no hook that may hold the
    attention's output (its rows are overwritten)."""
    used = _ROWS.get()
    if used is None or used[0] is not layer or not _IN_PLACE.get():
        return None
    n = used[1]
    if hidden_states.dim() != 3 or hidden_states.shape[0] != 1 or n >= hidden_states.shape[1]:
        return None
    if not (_keeps_nothing(layer.self_attn.o_proj, inputs=False) and _keeps_nothing(layer.self_attn, inputs=False)
            and _keeps_nothing(layer, inputs=False)):
        return None
    return n


def _keeps_nothing(module: torch.nn.Module, inputs: bool) -> bool:
    """Whether no hook may hold the module's outputs (and, with ``inputs``, its inputs): no forward
    hooks (pre-hooks) but those marked ``_qllm_keeps_nothing`` (qllm's own) and transformers' output
    capture (which keeps tensors only while hidden states are returned, when residual_in_place is
    off), and no global module hooks."""
    nn_module = torch.nn.modules.module
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    for hooks in (module._forward_hooks, module._forward_pre_hooks) if inputs else (module._forward_hooks,):
        for h in hooks.values():
            if not (getattr(h, "_qllm_keeps_nothing", False) or getattr(h, "__name__", "") == "output_capturing_hook"):
                return False
    return True


_LAYER_STEPS = (
    "residual = hidden_states",
    "hidden_states = self.input_layernorm(hidden_states)",
    None,  # hidden_states, _ = self.self_attn(hidden_states=hidden_states, <each argument by name>, **kwargs)
    "hidden_states = residual + hidden_states",
    "residual = hidden_states",
    "hidden_states = self.post_attention_layernorm(hidden_states)",
    "hidden_states = self.mlp(hidden_states)",
    "hidden_states = residual + hidden_states",
    "return hidden_states",
)


@functools.lru_cache(maxsize=None)
def _plain_layer(cls: type) -> bool:
    """Whether ``cls.forward`` is exactly the pre-norm block :func:`_layer_forward` computes:
    the statements of :data:`_LAYER_STEPS`, the attention called with hidden_states and every
    other argument of forward passed by its own name plus ``**kwargs``.  Another transformers
    version that changes the block (a scale, a dropout, other arguments) fails the check and
    keeps its own forward."""
    try:
        fn = inspect.unwrap(cls.forward)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    f = tree.body[0] if tree.body else None
    if not isinstance(f, ast.FunctionDef):
        return False
    body = list(f.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    if len(body) != len(_LAYER_STEPS) or f.args.vararg is not None or f.args.kwarg is None:
        return False
    for stmt, want in zip(body, _LAYER_STEPS):
        if want is not None and ast.unparse(stmt) != want:
            return False
    call = body[2]
    if not (isinstance(call, ast.Assign) and ast.unparse(call.targets[0]) == "(hidden_states, _)"
            and isinstance(call.value, ast.Call) and ast.unparse(call.value.func) == "self.self_attn"
            and not call.value.args):
        return False
    named = [a.arg for a in f.args.args + f.args.kwonlyargs][1:]  # without self
    passed = {}
    for kw in call.value.keywords:
        if kw.arg is None:
            if not (isinstance(kw.value, ast.Name) and kw.value.id == f.args.kwarg.arg):
                return False
            passed["**"] = True
        elif isinstance(kw.value, ast.Name) and kw.value.id == kw.arg:
            passed[kw.arg] = True
        else:
            return False
    return set(passed) == set(named) | {"**"} and named[:1] == ["hidden_states"]


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
    elif name in LAYER_CLASSES:
        o_proj = getattr(getattr(module, "self_attn", None), "o_proj", None)
        mlp = getattr(module, "mlp", None)
        # plain nn.Linear projections only (not a quantized subclass): their weights enter addmm directly
        if (type(o_proj) is torch.nn.Linear and o_proj.bias is None and mlp is not None and _kind(mlp) == "mlp"
                and type(mlp.down_proj) is torch.nn.Linear and mlp.down_proj.bias is None
                and "forward" not in o_proj.__dict__ and ("forward" not in mlp.__dict__ or is_fused(mlp))
                and all(isinstance(getattr(module, n, None), torch.nn.Module)
                        for n in ("input_layernorm", "post_attention_layernorm"))):
            if _plain_layer(type(module)):
                return "layer"
            log_once(logging.INFO, f"qllm: fused kernels: {type(module).__name__}.forward is not the plain "
                                   "pre-norm block: its residual adds stay apart")
    return None


def is_fused(module: torch.nn.Module) -> bool:
    """Whether :func:`fuse` replaced this module's forward."""
    return module.__dict__.get(_FUSED) is not None


def fuse(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Give every matching RMSNorm, MLP and decoder layer of ``model`` the fused forward (see the
    module docstring; a fused layer's ``o_proj`` is returned too); returns the modules fused by
    this call (none already fused are counted again)."""
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
        mod.forward = types.MethodType(_FORWARDS[kind], mod)
        setattr(mod, _FUSED, kind)
        done.append(mod)
        if kind == "layer":
            o_proj = mod.self_attn.o_proj
            o_proj.forward = types.MethodType(_residual_linear_forward, o_proj)
            setattr(o_proj, _FUSED, "residual")
            done.append(o_proj)
    return done


_FORWARDS = {"norm": _norm_forward, "mlp": _mlp_forward, "layer": _layer_forward}


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
