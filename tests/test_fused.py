"""qllm.fused on the CPU: which modules fuse() picks, the fallback (the module's own forward,
logged), unfuse, idempotence, the wiring of the fused forwards (with the ops stood in by the
Hugging Face formula), QLLMConfig.fused_kernels and patch / unpatch.  The CUDA kernels themselves
are tested in test_cuda_fused.py."""

from __future__ import annotations

import copy
import logging
import types

import pytest
import torch
import torch.nn.functional as F

import qllm
import qllm._log
import qllm.fused as fused
from qllm.fused import fuse, is_fused, unfuse

from test_patch import CFG, _one_thread, ids_of, logits, make_model  # noqa: F401  (_one_thread: autouse here too)


def _expected(model):
    """(norm modules, MLP modules) fuse should pick on a Llama-family model: by class name."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    return norms, mlps


def _forwards(model) -> dict:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fuse_picks_every_norm_and_mlp(family):
    model = make_model(family)
    norms, mlps = _expected(model)
    # 2 layers x (input, post-attention) + final norm; Qwen3 adds q/k norms per layer
    assert len(norms) == (9 if family == "qwen3" else 5) and len(mlps) == 2
    before = _forwards(model)
    got = fuse(model)
    assert {id(m) for m in got} == {id(m) for m in norms + mlps}
    assert all(is_fused(m) and "forward" in m.__dict__ for m in got)
    changed = {n for n, f in _forwards(model).items() if f is not before[n]}
    assert len(changed) == len(got)  # nothing else touched
    assert unfuse(model) == len(got)
    assert _forwards(model) == before and not any(is_fused(m) for m in model.modules())


def test_fuse_leaves_gemma_and_lookalikes_alone():
    """Gemma3's (1 + weight) norm and gelu MLP are not fused; neither is a subclass of LlamaRMSNorm
    under another name (its forward may differ), nor a LlamaMLP whose act_fn is not SiLU."""
    assert fuse(make_model("gemma3")) == []
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    class ScaledRMSNorm(LlamaRMSNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    model = make_model("llama")
    model.model.norm = ScaledRMSNorm(64)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    got = fuse(model)
    assert len(got) == 4 + 1  # 4 layer norms, the MLP of layer 1
    assert model.model.norm not in got and model.model.layers[0].mlp not in got
    assert model.model.layers[1].mlp in got and isinstance(model.model.layers[1].mlp, LlamaMLP)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cpu_fallback_is_the_model_and_logged(family, caplog):
    model = make_model(family, seed=3)
    ids = ids_of(40, seed=4)
    before = logits(model, ids)
    qllm._log._seen.difference_update({m for m in qllm._log._seen if m.startswith("qllm: fused")})
    fuse(model)
    with caplog.at_level(logging.INFO, logger="qllm"):
        after = logits(model, ids)
    assert torch.equal(after, before)
    msgs = [r.getMessage() for r in caplog.records if r.name == "qllm"]
    for what in ("RMSNorm", "MLP"):
        hits = [m for m in msgs if m.startswith(f"qllm: fused {what}:") and "own forward runs" in m]
        assert len(hits) == 1, msgs  # once per reason, not per call
    unfuse(model)
    assert torch.equal(logits(model, ids), before)


def test_fallback_reasons():
    w = torch.ones(8)
    x = torch.ones(2, 8)
    assert "CUDA" in fused._why_not("RMSNorm", x, (w,))
    orig = fused._cuda_ops
    try:
        fused._cuda_ops = True  # as in a CUDA build: the next reason shows
        assert "input on cpu" in fused._why_not("RMSNorm", x, (w,))
    finally:
        fused._cuda_ops = orig


def _stand_in_ops():
    """torch.ops.qllm.rms_norm / silu_mul as the Hugging Face formulas (what the CUDA kernels compute)."""
    def rms_norm(x, weight, eps):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * y.to(x.dtype)

    calls = []

    def record(name, fn):
        def f(*args):
            calls.append((name, tuple(a.shape for a in args if isinstance(a, torch.Tensor)), args[2:]))
            return fn(*args)
        return f

    ns = types.SimpleNamespace(rms_norm=record("rms_norm", rms_norm),
                               silu_mul=record("silu_mul", lambda g, u: F.silu(g) * u))
    return ns, calls


def test_fused_forwards_call_the_ops(monkeypatch):
    """The fused forwards' wiring on the CPU: with the ops stood in by the formulas and the
    checks passed, the model's logits are bitwise the model's, every norm calls rms_norm with its
    own weight and eps, every MLP silu_mul on (gate_proj(x), up_proj(x))."""
    model = make_model("qwen3", seed=5)
    norms, mlps = _expected(model)
    for i, m in enumerate(norms):  # distinct eps per norm: the call must pass the module's own
        m.variance_epsilon = 1e-6 * (i + 1)
    ids = ids_of(24, seed=6)
    before = logits(model, ids)
    ns, calls = _stand_in_ops()
    monkeypatch.setattr(fused, "ops", ns)
    monkeypatch.setattr(fused, "_why_not", lambda what, x, ws: None)
    fuse(model)
    assert torch.equal(logits(model, ids), before)
    assert sum(c[0] == "rms_norm" for c in calls) == len(norms)
    assert sum(c[0] == "silu_mul" for c in calls) == len(mlps)
    eps = sorted(c[2][0] for c in calls if c[0] == "rms_norm")
    assert eps == sorted(m.variance_epsilon for m in norms)
    assert all(c[1][0] == c[1][1] == (1, 24, 128) for c in calls if c[0] == "silu_mul")  # [1, T, intermediate]
    unfuse(model)


def test_fuse_is_idempotent_and_skips_foreign_forwards():
    model = make_model("llama")
    first = fuse(model)
    fwd = _forwards(model)
    assert fuse(model) == [] and _forwards(model) == fwd  # fused modules are left as they are
    unfuse(model)
    norm = model.model.norm
    hook = lambda x: x  # noqa: E731  (another library's instance forward)
    norm.forward = hook
    second = fuse(model)
    assert norm not in second and norm.forward is hook and len(second) == len(first) - 1
    unfuse(model)
    assert norm.forward is hook


def test_unfuse_of_given_modules_only():
    model = make_model("llama")
    got = fuse(model)
    assert unfuse(model, got[:2]) == 2
    assert [is_fused(m) for m in got] == [False, False] + [True] * (len(got) - 2)
    assert unfuse(model) == len(got) - 2


def test_deepcopy_of_a_fused_model_binds_the_copy():
    model = make_model("llama")
    fuse(model)
    twin = copy.deepcopy(model)
    assert twin.model.norm.forward.__self__ is twin.model.norm
    assert twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp
    ids = ids_of(20, seed=2)
    assert torch.equal(logits(twin, ids), logits(model, ids))


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_config_fused_kernels_type(bad):
    with pytest.raises(TypeError, match="fused_kernels"):
        qllm.QLLMConfig(fused_kernels=bad)
    assert qllm.QLLMConfig().fused_kernels is True


@pytest.mark.parametrize("strategy", ["qllm", "full"])
@pytest.mark.parametrize("on", [True, False])
def test_patch_fuses_and_unpatch_restores(strategy, on):
    model = make_model("llama", seed=7)
    ids = ids_of(30, seed=8)
    before, fwd = logits(model, ids), _forwards(model)
    norms, mlps = _expected(model)
    cfg = CFG.replace(strategy=strategy)
    with qllm.patched(model, cfg.replace(fused_kernels=False)):
        want = logits(model, ids)
    with qllm.patched(model, cfg.replace(fused_kernels=on)):
        assert len(model._qllm.fused) == (len(norms) + len(mlps) if on else 0)
        assert all(is_fused(m) == on for m in norms + mlps)
        assert torch.equal(logits(model, ids), want)  # CPU: the modules' own forwards
    if strategy == "full":
        assert torch.equal(want, before)
    assert not any(is_fused(m) for m in model.modules())
    assert _forwards(model) == fwd


def test_unpatch_keeps_fusion_made_before_patch():
    model = make_model("llama")
    mine = fuse(model)
    with qllm.patched(model, CFG):
        assert model._qllm.fused == []
    assert all(is_fused(m) for m in mine)
    unfuse(model)
