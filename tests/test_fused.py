"""qllm.fused on the CPU: which modules fuse() picks, the fallback (the module's own forward,
logged), unfuse, idempotence, the wiring of the fused forwards (with the ops stood in by the
Hugging Face formula), QLLMConfig.fused_kernels and patch / unpatch.  The CUDA kernels themselves
are tested in test_cuda_fused.py."""

from __future__ import annotations

import copy
import logging
import textwrap
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


def _layers(model):
    """(decoder layers, their o_proj modules) fuse should pick on a Llama-family model."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return layers, [m.self_attn.o_proj for m in layers]


def _forwards(model) -> dict:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fuse_picks_every_norm_and_mlp(family):
    model = make_model(family)
    norms, mlps = _expected(model)
    # 2 layers x (input, post-attention) + final norm; Qwen3 adds q/k norms per layer
    assert len(norms) == (9 if family == "qwen3" else 5) and len(mlps) == 2
    layers, o_projs = _layers(model)
    assert len(layers) == 2
    before = _forwards(model)
    got = fuse(model)
    assert {id(m) for m in got} == {id(m) for m in norms + mlps + layers + o_projs}
    assert [m._qllm_fused for m in layers + o_projs] == ["layer"] * 2 + ["residual"] * 2
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
    assert len(got) == 4 + 1 + 2  # 4 layer norms, the MLP of layer 1, layer 1 and its o_proj
    assert model.model.norm not in got and model.model.layers[0].mlp not in got
    assert model.model.layers[1].mlp in got and isinstance(model.model.layers[1].mlp, LlamaMLP)
    assert model.model.layers[0] not in got and model.model.layers[1] in got  # layer 0: its MLP does not fuse


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
    checks passed, the model's logits are the model's (to float32 rounding: the fused layers add
    the residuals inside the GEMMs), every norm calls rms_norm with its own weight and eps, every
    MLP silu_mul on (gate_proj(x), up_proj(x))."""
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
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    assert sum(c[0] == "rms_norm" for c in calls) == len(norms)
    assert sum(c[0] == "silu_mul" for c in calls) == len(mlps)
    eps = sorted(c[2][0] for c in calls if c[0] == "rms_norm")
    assert eps == sorted(m.variance_epsilon for m in norms)
    assert all(c[1][0] == c[1][1] == (1, 24, 128) for c in calls if c[0] == "silu_mul")  # [1, T, intermediate]
    unfuse(model)


def _fused_layer_setup(monkeypatch, family="llama", seed=7):
    """A model fused with the ops stood in and the CUDA checks passed, and a float64 copy of it
    unfused (the slow reference)."""
    model = make_model(family, seed=seed)
    ref = copy.deepcopy(model).double()
    ns, calls = _stand_in_ops()
    monkeypatch.setattr(fused, "ops", ns)
    monkeypatch.setattr(fused, "_why_not", lambda what, x, ws: None)
    fuse(model)
    return model, ref, calls


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_layer_folds_the_residuals(monkeypatch, family):
    """A fused decoder layer: o_proj's output already holds the residual (it is the layer's
    post-attention hidden state, against a float64 run of the unfused model), the MLP's residual
    is added into that same tensor in place (the layer returns o_proj's output tensor), MLP and
    down_proj are not called as modules, and the logits match the float64 model."""
    model, ref, calls = _fused_layer_setup(monkeypatch, family)
    ids = ids_of(30, seed=8)
    seen = {}

    def keep(name):
        def hook(mod, args, out):  # out's value now (the fused layer adds into o_proj's output later) and its address
            seen.setdefault(name, []).append((args[0].clone(), out.clone(), out.data_ptr()))
        hook._qllm_keeps_nothing = True  # copies only: the fused layer may still add in place
        return hook

    handles = []
    for i, (lay, rlay) in enumerate(zip(model.model.layers, ref.model.layers)):
        handles += [lay.self_attn.o_proj.register_forward_hook(keep(f"o{i}")),
                    lay.register_forward_hook(keep(f"layer{i}")),
                    rlay.register_forward_hook(keep(f"ref_layer{i}")),
                    rlay.self_attn.o_proj.register_forward_hook(keep(f"ref_o{i}")),
                    rlay.mlp.register_forward_hook(keep(f"ref_mlp{i}"))]
    got = logits(model, ids)
    want = logits(ref, ids)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    for i in range(len(model.model.layers)):
        (x, o_out, o_ptr), = seen[f"o{i}"]
        (layer_in, layer_out, out_ptr), = seen[f"layer{i}"]
        (_, ref_o, _), = seen[f"ref_o{i}"]
        (ref_in, _, _), = seen[f"ref_layer{i}"]
        # o_proj returned residual + x W^T: the layer input plus the reference projection
        torch.testing.assert_close(o_out.double(), ref_in + ref_o, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(o_out.double(), ref_o, atol=1e-3)  # the residual is in it
        assert out_ptr == o_ptr  # the MLP's add went into o_proj's output
        (_, ref_mlp, _), = seen[f"ref_mlp{i}"]
        torch.testing.assert_close(layer_out.double(), ref_in + ref_o + ref_mlp, rtol=1e-4, atol=1e-4)
    assert sum(c[0] == "silu_mul" for c in calls) == len(model.model.layers)


def test_fused_layer_leaves_the_input_alone(monkeypatch):
    """The residual enters o_proj out of place: the layer's input (here the caller's own embeddings)
    is not written."""
    model, _, _ = _fused_layer_setup(monkeypatch)
    emb = model.model.embed_tokens(ids_of(20, seed=9)).detach()
    keep = emb.clone()
    with torch.no_grad():
        model(inputs_embeds=emb)
    assert torch.equal(emb, keep)


def test_fused_layer_adds_a_residual_o_proj_did_not_take(monkeypatch, caplog):
    """An attention that never calls o_proj (here a stand-in): the layer adds the residual itself,
    logs it once, and leaves nothing pending on o_proj."""
    model, ref, _ = _fused_layer_setup(monkeypatch)
    lay, rlay = model.model.layers[0], ref.model.layers[0]
    stub = lambda hidden_states, **kw: (0.5 * hidden_states, None)  # noqa: E731
    lay.self_attn.forward = stub
    rlay.self_attn.forward = stub
    qllm._log._seen.difference_update({m for m in qllm._log._seen if "did not take" in m})
    ids = ids_of(16, seed=10)
    with caplog.at_level(logging.WARNING, logger="qllm"):
        got = logits(model, ids)
        logits(model, ids)
    torch.testing.assert_close(got.double(), logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert sum("did not take the residual" in r.getMessage() for r in caplog.records) == 1
    assert "_qllm_residual" not in lay.self_attn.o_proj.__dict__


def test_fused_layer_clears_the_residual_on_error(monkeypatch):
    model, ref, _ = _fused_layer_setup(monkeypatch)
    attn = model.model.layers[1].self_attn

    def boom(**kw):
        raise RuntimeError("attention failed")

    attn.forward = boom
    with pytest.raises(RuntimeError, match="attention failed"):
        logits(model, ids_of(12))
    assert "_qllm_residual" not in attn.o_proj.__dict__
    del attn.forward
    ids = ids_of(12, seed=11)
    torch.testing.assert_close(logits(model, ids).double(), logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_fused_layer_falls_back_with_hooks_or_positional_args(monkeypatch, caplog):
    """Hooks on the MLP or down_proj (the fused layer would skip them) or positional arguments: the
    layer's own forward runs (bitwise the unfused layer), logged."""
    model = make_model("llama", seed=12)
    lay = model.model.layers[0]
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(13))
    cos, sin = model.model.rotary_emb(x, torch.arange(10)[None])
    kw = dict(position_embeddings=(cos, sin), attention_mask=None)
    with torch.no_grad():
        want = lay(x, **kw)
        ns, _ = _stand_in_ops()
        monkeypatch.setattr(fused, "ops", ns)
        monkeypatch.setattr(fused, "_why_not", lambda what, x, ws: None)
        fuse(model)
        qllm._log._seen.difference_update({m for m in qllm._log._seen if m.startswith("qllm: fused decoder")})
        with caplog.at_level(logging.INFO, logger="qllm"):
            h = lay.mlp.down_proj.register_forward_hook(lambda m, a, o: None)
            assert torch.equal(lay(x, **kw), want)
            h.remove()
            assert torch.equal(lay(x, None, **{k: v for k, v in kw.items() if k != "attention_mask"}), want)
        msgs = [r.getMessage() for r in caplog.records]
        assert any("hooks on its MLP or down_proj" in m for m in msgs), msgs
        assert any("positional arguments" in m for m in msgs), msgs
        # without the hook the fused path runs again: o_proj takes the residual
        seen = []

        def ptr(m, a, o):
            seen.append(o.data_ptr())
        ptr._qllm_keeps_nothing = True  # an address only
        h = lay.self_attn.o_proj.register_forward_hook(ptr)
        out = lay(x, **kw)
        h.remove()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert seen == [out.data_ptr()]  # the fused forward: the layer returns o_proj's output


_PLAIN = """
def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
            use_cache=False, position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    # Self Attention
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states
"""


@pytest.mark.parametrize("change,plain", [
    (None, True),  # the block as transformers 5.17 writes it (past_key_values, not cache)
    (("hidden_states = residual + hidden_states\n    return", "hidden_states = residual + 0.5 * hidden_states\n    return"), False),
    (("        position_ids=position_ids,\n", ""), False),  # an argument not passed on
    (("attention_mask=attention_mask", "attention_mask=None"), False),  # an argument changed
    (("    residual = hidden_states\n    hidden_states = self.post", "    hidden_states = hidden_states * 2\n    residual = hidden_states\n    hidden_states = self.post"), False),
])
def test_plain_layer_check(change, plain, tmp_path, monkeypatch):
    """_plain_layer accepts exactly the pre-norm block fuse computes; any change keeps the class's
    own forward (and the layer unfused), checked on the source."""
    body = _PLAIN if change is None else _PLAIN.replace(*change)
    assert body != _PLAIN or change is None
    path = tmp_path / "variant_layer.py"
    path.write_text("import torch\n" + textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("variant_layer")
    importlib.reload(mod)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cls = type("LlamaDecoderLayer", (LlamaDecoderLayer,), {"forward": mod.forward})
    assert fused._plain_layer(cls) is plain
    model = make_model("llama")
    for lay in model.model.layers:
        lay.__class__ = cls
    got = fuse(model)
    assert all((lay in got) is plain for lay in model.model.layers)
    assert sum(fused._kind(m) == "mlp" for m in got) == 2  # the MLPs fuse either way


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
    layers, o_projs = _layers(model)
    cfg = CFG.replace(strategy=strategy)
    with qllm.patched(model, cfg.replace(fused_kernels=False)):
        want = logits(model, ids)
    with qllm.patched(model, cfg.replace(fused_kernels=on)):
        assert len(model._qllm.fused) == (len(norms) + len(mlps) + 2 * len(layers) if on else 0)
        assert all(is_fused(m) == on for m in norms + mlps + layers + o_projs)
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


def _layer_ptrs(model):
    """Each decoder layer's (input, o_proj output) data pointers -- in a fused layer o_proj's output
    is the tensor the layer returns -- through hooks on input_layernorm and o_proj (hooks on the
    layer itself would turn the in-place add off)."""
    ptrs, handles = [], []

    def out_ptr(m, a, o):
        ptrs[-1].append(o.data_ptr())
    out_ptr._qllm_keeps_nothing = True  # an address only: the fused layer may still add in place
    for lay in model.model.layers:
        handles.append(lay.input_layernorm.register_forward_pre_hook(lambda m, a: ptrs.append([a[0].data_ptr()])))
        handles.append(lay.self_attn.o_proj.register_forward_hook(out_ptr))
    return ptrs, handles


def test_fused_layer_in_place_only_inside_residual_in_place(monkeypatch):
    """Inside residual_in_place, layer 1 (whose input is layer 0's output) adds its attention residual
    into its input in place; layer 0's input (the embeddings) is never written; outside, no layer
    writes its input.  Same logits either way (float64 reference)."""
    model, ref, _ = _fused_layer_setup(monkeypatch, seed=14)
    ids = ids_of(24, seed=15)
    want = logits(ref, ids)
    for inside in (False, True):
        ptrs, handles = _layer_ptrs(model)
        with fused.residual_in_place(inside):
            got = logits(model, ids)
        for h in handles:
            h.remove()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        assert ptrs[0][0] != ptrs[0][1]
        assert (ptrs[1][0] == ptrs[1][1]) is inside
    assert not fused._IN_PLACE.get()


@pytest.mark.parametrize("where", ["o_proj", "self_attn"])
def test_fused_layer_mlp_add_apart_when_a_hook_may_keep_o_proj_output(monkeypatch, where):
    """A hook that may keep o_proj's output (on o_proj, or the attention's output tuple): the MLP's
    residual add goes into a new tensor, so the kept one stays what it was."""
    model, ref, _ = _fused_layer_setup(monkeypatch, seed=20)
    kept = []
    lay = model.model.layers[0]
    if where == "o_proj":
        h = lay.self_attn.o_proj.register_forward_hook(lambda m, a, o: kept.append((o, o.clone())))
    else:
        h = lay.self_attn.register_forward_hook(lambda m, a, o: kept.append((o[0], o[0].clone())))
    ids = ids_of(18, seed=21)
    try:
        got = logits(model, ids)
    finally:
        h.remove()
    torch.testing.assert_close(got.double(), logits(ref, ids), rtol=1e-4, atol=1e-4)
    (t, copy_), = kept
    assert torch.equal(t, copy_)


@pytest.mark.parametrize("where", ["layer 0 output", "layer 1 input", "global"])
def test_fused_layer_not_in_place_when_a_hook_may_keep_tensors(monkeypatch, where):
    """A user's hook that may keep a layer's output or input (on the producing layer, the consuming
    layer, or a global module hook) turns the in-place add off: the kept tensor stays what it was."""
    model, ref, _ = _fused_layer_setup(monkeypatch, seed=18)
    kept = []

    def keep_out(m, a, o):
        if isinstance(m, type(model.model.layers[0])) and not kept:
            kept.append((o, o.clone()))

    def keep_in(m, a):
        kept.append((a[0], a[0].clone()))

    lay0, lay1 = model.model.layers[0], model.model.layers[1]
    if where == "layer 0 output":
        h = lay0.register_forward_hook(keep_out)
    elif where == "layer 1 input":
        h = lay1.register_forward_pre_hook(keep_in)
    else:
        h = torch.nn.modules.module.register_module_forward_hook(keep_out)
    ptrs, handles = _layer_ptrs(model)
    ids = ids_of(22, seed=19)
    try:
        with fused.residual_in_place():
            got = logits(model, ids)
    finally:
        h.remove()
        for x in handles:
            x.remove()
    torch.testing.assert_close(got.double(), logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert ptrs[1][0] != ptrs[1][1]
    (t, copy_), = kept
    assert torch.equal(t, copy_)


@pytest.mark.parametrize("hidden", [False, True])
def test_patched_model_in_place_keeps_returned_hidden_states(monkeypatch, hidden):
    """The patched model's forward turns residual_in_place on for its layer loop only when no hidden
    states are returned: with output_hidden_states=True every returned hidden state is the unfused
    model's (none overwritten by a later layer), without it layer 1 runs in place."""
    model = make_model("llama", seed=16)
    ids = ids_of(20, seed=17)
    with qllm.patched(model, CFG.replace(fused_kernels=False)):
        with torch.no_grad():
            want = model(input_ids=ids, output_hidden_states=True)
    ns, _ = _stand_in_ops()
    monkeypatch.setattr(fused, "ops", ns)
    monkeypatch.setattr(fused, "_why_not", lambda what, x, ws: None)
    with qllm.patched(model, CFG):
        assert any(getattr(m, "_qllm_fused", None) == "layer" for m in model._qllm.fused)
        ptrs, handles = _layer_ptrs(model)
        with torch.no_grad():
            got = model(input_ids=ids, output_hidden_states=hidden)
        for h in handles:
            h.remove()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    if hidden:
        assert len(got.hidden_states) == len(want.hidden_states)
        for a, b in zip(got.hidden_states, want.hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (ptrs[1][0] == ptrs[1][1]) is (not hidden)
    # the MLP's add goes into o_proj's output either way (qllm's own attention pre-hook holds nothing):
    # layer 0 returns o_proj's output tensor, layer 1's input
    assert ptrs[1][0] == ptrs[0][1]
