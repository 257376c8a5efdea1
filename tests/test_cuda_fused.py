"""torch.ops.qllm.rms_norm / silu_mul (csrc/cuda/fused.cu) against the Hugging Face / torch code
they replace, on the same GPU, and qllm.fused on a tiny Llama.  Skipped without CUDA.

* rms_norm: on inputs whose sum of squares is exact in f32 in any order (multiples of 1/8) the
  output is bitwise HF's LlamaRMSNorm -- that checks every rounding step but the order of the sum;
  on random inputs >= 99.9% of the elements are bitwise equal and none is more than 3 ulps off
  (a sum rounded differently moves rsqrt by an f32 ulp; the output rounds across at most one
  bf16/f16 boundary, which the weight's multiply can widen to 3 ulps);
* silu_mul: bitwise F.silu(gate) * up;
* both over f16 / bf16, hidden sizes 1, 7, 576, 4096, 5123 (vector path with a scalar tail for one
  row, element-wise path otherwise) and larger ones, 1 / 3 / 1000 rows, strided / misaligned /
  transposed / expanded inputs, empty tensors; bad inputs raise; opcheck; CUDA-graph capture;
* a tiny random Llama in bf16 / f16: fused logits vs unfused within a fraction of the model's own
  low-precision error, the ops seen in the profile, unfuse bitwise back to the model's;
* a fused decoder layer of Llama-3-8B width (residual adds inside the o_proj / down_proj GEMMs):
  no further from a float32 run of the layer than the unfused layer is, the layer's input untouched,
  the output written into o_proj's output, and the same in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qllm  # noqa: F401  (registers torch.ops.qllm)
import qllm.fused as fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
HIDDEN = [1, 7, 576, 4096, 5123]
ROWS = [1, 3, 1000]
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _need_ops():
    if not hasattr(torch.ops.qllm, "rms_norm"):
        pytest.fail("qllm was built without CUDA kernels (torch.ops.qllm.rms_norm missing) on a CUDA machine")


def ops():
    return torch.ops.qllm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def _grid(g, *shape, dtype):
    """Multiples of 1/8 in [-2, 2]: exact in f16 / bf16, their squares' sums exact in f32 in any
    order for rows of up to 2^24 / 256 elements."""
    return (torch.randint(-16, 17, shape, generator=g).float() / 8).to(dtype).to(DEV)


def hf_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm on x (the module itself, with weight w)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m = LlamaRMSNorm(w.shape[0], eps=eps).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        return m(x)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """f16/bf16 bits as integers in the order of the values (adjacent values differ by 1)."""
    i = t.view(torch.int16).int()
    return torch.where(i < 0, -(i & 0x7FFF), i)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype and a.shape == b.shape
    return (_ordered(a.contiguous()) - _ordered(b.contiguous())).abs()


# ================================================================= rms_norm

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_exact_sums_bitwise(dtype, H, rows):
    g = _gen(H * 7 + rows)
    x, w = _grid(g, rows, H, dtype=dtype), _randn(g, H, dtype=dtype)
    got = ops().rms_norm(x, w, EPS)
    want = hf_norm(x, w, EPS)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_random(dtype, H, rows):
    g = _gen(H * 11 + rows)
    scale = 30.0 if dtype == torch.bfloat16 else 3.0  # residual-stream-like magnitudes
    x, w = _randn(g, rows, H, dtype=dtype, scale=scale), _randn(g, H, dtype=dtype)
    got = ops().rms_norm(x, w, EPS)
    want = hf_norm(x, w, EPS)
    d = ulps(got, want)
    assert int(d.max()) <= 3, f"max {int(d.max())} ulps"
    assert float((d == 0).float().mean()) >= 0.999, f"{int((d > 0).sum())} of {d.numel()} differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [2048, 2056, 16384, 16392])
def test_rms_norm_wide_rows(dtype, H):
    """Row shapes at the edges of the register-resident paths (one warp per row up to 2048 (+7),
    one CTA per row up to 16384 (+7), then the element-wise kernel)."""
    g = _gen(H)
    x, w = _grid(g, 3, H, dtype=dtype), _randn(g, H, dtype=dtype)
    assert torch.equal(ops().rms_norm(x, w, EPS), hf_norm(x, w, EPS))


def _norm_layouts(g, rows, H, dtype):
    """(name, x) with the values of a [rows, H] grid tensor in other memory layouts."""
    base = _grid(g, rows, H, dtype=dtype)
    wide = torch.zeros(rows, H + 8, dtype=dtype, device=DEV)
    wide[:, :H] = base
    yield "row stride H+8 (aligned rows)", wide[:, :H]
    wide2 = torch.zeros(rows, H + 8, dtype=dtype, device=DEV)
    wide2[:, 3:3 + H] = base
    yield "row stride H+8, offset 3 (misaligned)", wide2[:, 3:3 + H]
    flat = torch.zeros(rows * H + 1, dtype=dtype, device=DEV)
    flat[1:] = base.flatten()
    yield "storage offset 1 (misaligned)", flat[1:].view(rows, H)
    yield "transposed (last dim strided)", base.t().contiguous().t()
    x3 = base.reshape(1, rows, H).expand(2, rows, H).transpose(0, 1)  # [rows, 2, H], strides (H, 0, 1)
    yield "expanded, leading dims not collapsible", x3
    yield "3-D contiguous", base.reshape(rows, 1, H)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [7, 576, 4096])
def test_rms_norm_layouts(dtype, H):
    g = _gen(H + 5)
    w_full = _randn(g, 2 * H, dtype=dtype)
    for w_name, w in (("contiguous weight", w_full[:H].clone()), ("strided weight", w_full[::2])):
        for name, x in _norm_layouts(g, 5, H, dtype):
            got = ops().rms_norm(x, w, EPS)
            assert got.shape == x.shape and got.is_contiguous(), (name, w_name)
            assert torch.equal(got, hf_norm(x, w, EPS)), (name, w_name)


def test_rms_norm_expanded_rows_and_eps():
    """Every row the same storage row (row stride 0); a large eps enters the result."""
    g = _gen(3)
    row = _grid(g, 1, 576, dtype=torch.bfloat16)
    w = _randn(g, 576, dtype=torch.bfloat16)
    x = row.expand(6, 576)
    for eps in (1e-6, 0.5):
        got = ops().rms_norm(x, w, eps)
        assert torch.equal(got, hf_norm(x, w, eps))
        assert torch.equal(got[0], got[5])
    assert not torch.equal(ops().rms_norm(x, w, 1e-6), ops().rms_norm(x, w, 0.5))


def test_rms_norm_empty():
    w = torch.ones(64, dtype=torch.bfloat16, device=DEV)
    out = ops().rms_norm(torch.empty(0, 64, dtype=torch.bfloat16, device=DEV), w, EPS)
    assert out.shape == (0, 64)


# ================================================================= silu_mul

def torch_silu_mul(g, u):
    return F.silu(g) * u


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_bitwise(dtype, C, rows):
    g = _gen(C * 13 + rows)
    gate, up = _randn(g, rows, C, dtype=dtype, scale=4.0), _randn(g, rows, C, dtype=dtype)
    got = ops().silu_mul(gate, up)
    want = torch_silu_mul(gate, up)
    assert got.dtype == dtype and got.shape == gate.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_extremes(dtype):
    """Large |gate| (exp overflows to inf: silu -> -0 or gate), zeros, tiny values."""
    vals = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 88.0, -88.0, 100.0, -100.0, 1e4, -1e4, 3.0, -3.0])
    if dtype == torch.float16:
        vals = vals.clamp(-6e4, 6e4)
    gate = vals.repeat(37).to(dtype).to(DEV)
    up = torch.linspace(-5, 5, gate.numel()).to(dtype).to(DEV)
    assert torch.equal(ops().silu_mul(gate, up), torch_silu_mul(gate, up))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [7, 576, 4096])
def test_silu_mul_layouts(dtype, C):
    g = _gen(C + 1)
    rows = 5
    gu = _randn(g, rows, 2 * C, dtype=dtype, scale=3.0)
    cases = {
        "halves of a fused gate_up (row stride 2C)": gu.chunk(2, dim=-1),
        "misaligned halves": (gu[:, 1:1 + C], gu[:, C - 1:2 * C - 1]),
        "transposed": (gu[:, :C].t().contiguous().t(), gu[:, C:].contiguous()),
        "3-D, leading dims not collapsible": (gu[:, :C].reshape(rows, 1, C).expand(rows, 2, C).transpose(0, 1),
                                              gu[:, C:].reshape(rows, 1, C).expand(rows, 2, C).transpose(0, 1)),
        "one contiguous, one strided": (gu[:, :C].contiguous(), gu[:, C:]),
    }
    for name, (a, b) in cases.items():
        got = ops().silu_mul(a, b)
        assert got.shape == a.shape and got.is_contiguous(), name
        assert torch.equal(got, torch_silu_mul(a, b)), name


def test_silu_mul_empty():
    e = torch.empty(3, 0, dtype=torch.float16, device=DEV)
    assert ops().silu_mul(e, e).shape == (3, 0)


# =============================================================== bad inputs

def test_bad_inputs_raise():
    bf = dict(dtype=torch.bfloat16, device=DEV)
    x, w = torch.randn(4, 64, **bf), torch.ones(64, **bf)
    cases = [
        (TypeError, "x: expected dtype float16 or bfloat16", lambda: ops().rms_norm(x.float(), w.float(), EPS)),
        (TypeError, "weight: expected dtype bfloat16", lambda: ops().rms_norm(x, w.float(), EPS)),
        (TypeError, "weight: expected dtype bfloat16", lambda: ops().rms_norm(x, w.half(), EPS)),
        (ValueError, "weight: expected shape", lambda: ops().rms_norm(x, torch.ones(63, **bf), EPS)),
        (ValueError, "weight: expected shape", lambda: ops().rms_norm(x, torch.ones(1, 64, **bf), EPS)),
        (ValueError, "x: expected at least 1 dim", lambda: ops().rms_norm(x[0, 0], w[:1], EPS)),
        (ValueError, "x: expected hidden", lambda: ops().rms_norm(torch.ones(4, 0, **bf), torch.ones(0, **bf), EPS)),
        (ValueError, "eps", lambda: ops().rms_norm(x, w, float("nan"))),
        (ValueError, "eps", lambda: ops().rms_norm(x, w, -1.0)),
        (ValueError, "weight: expected a tensor on cuda", lambda: ops().rms_norm(x, w.cpu(), EPS)),
        (ValueError, "weight: expected a tensor on cpu", lambda: ops().rms_norm(x.cpu(), w, EPS)),
        (NotImplementedError, "rms_norm", lambda: ops().rms_norm(x.cpu(), w.cpu(), EPS)),
        (TypeError, "gate: expected dtype float16 or bfloat16", lambda: ops().silu_mul(x.float(), x.float())),
        (TypeError, "up: expected dtype bfloat16", lambda: ops().silu_mul(x, x.half())),
        (ValueError, "up: expected gate's shape", lambda: ops().silu_mul(x, x[:, :32])),
        (ValueError, "up: expected gate's shape", lambda: ops().silu_mul(x, x.reshape(64, 4))),
        (ValueError, "up: expected a tensor on cuda", lambda: ops().silu_mul(x, x.cpu())),
        (NotImplementedError, "silu_mul", lambda: ops().silu_mul(x.cpu(), x.cpu())),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_opcheck():
    g = _gen(9)
    x = _randn(g, 3, 5, 24, dtype=torch.bfloat16)
    w = _randn(g, 24, dtype=torch.bfloat16)
    torch.library.opcheck(ops().rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(ops().rms_norm.default, (x[:, ::2].half(), w.half(), 1e-6))
    torch.library.opcheck(ops().silu_mul.default, (x, x.flip(0)))


# ============================================================ CUDA graphs

def test_capture_in_a_cuda_graph():
    """Both ops and the fused modules' forwards capture and replay (no host synchronisation)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, hidden_act="silu")
    norm = LlamaRMSNorm(576, eps=1e-5).to(DEV, torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    mlp = LlamaMLP(cfg).to(DEV, torch.bfloat16)
    fused.fuse(norm)
    fused.fuse(mlp)
    g = _gen(4)
    x = _randn(g, 64, 576, dtype=torch.bfloat16)
    gate, up = _randn(g, 64, 1536, dtype=torch.bfloat16), _randn(g, 64, 1536, dtype=torch.bfloat16)
    run = lambda: (ops().rms_norm(x, norm.weight, 1e-5), ops().silu_mul(gate, up), norm(x), mlp(x))  # noqa: E731
    unfused_mlp = lambda: mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # noqa: E731
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the graph
            run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = run()
        for seed in (5, 6):  # new inputs in the captured buffers
            g = _gen(seed)
            x.copy_(_randn(g, 64, 576, dtype=torch.bfloat16))
            gate.copy_(_randn(g, 64, 1536, dtype=torch.bfloat16))
            up.copy_(_randn(g, 64, 1536, dtype=torch.bfloat16))
            graph.replay()
            want = run()
            for a, b in zip(outs[:3], want[:3]):  # the fused kernels: bitwise
                assert torch.equal(a, b)
            assert torch.equal(outs[0], outs[2])  # the module's fused forward: the op
            # the MLP's matmuls may pick other cuBLAS kernels inside a capture: close, not bitwise
            torch.testing.assert_close(outs[3], want[3])
            torch.testing.assert_close(outs[3], unfused_mlp())


# ============================================================= tiny model

def _tiny_llama(seed: int, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm weights away from 1, so the weight multiply matters
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    ref = LlamaForCausalLM(cfg).eval()
    model = model.to(DEV, dtype)
    ref.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    return model, ref  # ref: float32 on the CPU with the model's (rounded) weights


def _op_counts(fn) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {op: sum(n == f"qllm::{op}" for n in names) for op in ("rms_norm", "silu_mul")}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_llama_fused(dtype):
    model, ref = _tiny_llama(0, dtype)
    ids = torch.randint(0, 256, (1, 300), generator=_gen(1))
    with torch.no_grad():
        want32 = ref(ids).logits
        before = model(ids.to(DEV)).logits
        assert _op_counts(lambda: model(ids.to(DEV))) == {"rms_norm": 0, "silu_mul": 0}
        got_mods = fused.fuse(model)
        assert len(got_mods) == 5 + 2 + 2 * 2  # norms, MLPs, decoder layers and their o_proj
        got = model(ids.to(DEV)).logits
        assert _op_counts(lambda: model(ids.to(DEV))) == {"rms_norm": 5, "silu_mul": 2}
    base = float((before.float().cpu() - want32).norm() / want32.norm())  # the model's own low-precision error
    fused32 = float((got.float().cpu() - want32).norm() / want32.norm())
    err = float((got.float() - before.float()).norm() / before.float().norm())
    print(f"{dtype}: fused vs unfused {err:.3g}, unfused vs float32 {base:.3g}, fused vs float32 {fused32:.3g}")
    # The ops' last-bit differences (the sum of squares' order) grow through the
    # layers like the model's own rounding: on an H100, f16 measured fused vs
    # unfused 4.8e-4 against the unfused model's 8.1e-4 from float32 (bf16 within
    # a quarter of it).  So: no further from unfused than unfused is from float32,
    # and about as accurate as unfused; a wrong kernel is off by orders more.
    assert err <= min(base, 5e-3), (err, base)
    assert fused32 <= 1.5 * base, (fused32, base)
    assert float((got.argmax(-1) == before.argmax(-1)).float().mean()) >= 0.98
    assert fused.unfuse(model) == 11
    with torch.no_grad():
        assert torch.equal(model(ids.to(DEV)).logits, before)


def test_patched_tiny_llama_uses_the_ops():
    """qllm.patch fuses by default (fused_kernels=True) and unpatch undoes it; the ops run in the
    patched model's forward on CUDA."""
    model, _ = _tiny_llama(2, torch.bfloat16)
    ids = torch.randint(0, 256, (1, 200), generator=_gen(3)).to(DEV)
    cfg = qllm.QLLMConfig(n_init=16, n_local=64, block_size=16, topk=3, repr_topk=4, exc_block_size=32,
                          chunk_size=128)
    with torch.no_grad():
        with qllm.patched(model, cfg):
            assert len(model._qllm.fused) == 11
            counts = _op_counts(lambda: model(ids))
        assert counts["rms_norm"] >= 5 and counts["silu_mul"] >= 2
        with qllm.patched(model, cfg.replace(fused_kernels=False)):
            assert _op_counts(lambda: model(ids)) == {"rms_norm": 0, "silu_mul": 0}
    assert not any(fused.is_fused(m) for m in model.modules())


def _layer_8b(seed: int, dtype, tokens: int):
    """One Llama decoder layer of Llama-3-8B width (hidden 4096, 32 / 8 heads, MLP 14336), its
    input, rotary tables, and a float32 copy (the reference)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, attn_implementation="sdpa")
    lay = LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for p in lay.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    ref = LlamaDecoderLayer(cfg, 0).eval().to(DEV)
    lay = lay.to(DEV, dtype)
    ref.load_state_dict({k: v.float() for k, v in lay.state_dict().items()})
    x = _randn(_gen(seed + 1), 1, tokens, 4096, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(cfg).to(DEV)(x, torch.arange(tokens, device=DEV)[None])
    return lay, ref, x, (cos, sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 333])
def test_fused_layer_8b_width(dtype, tokens):
    """The residual adds inside the GEMMs: as close to float32 as the unfused layer (one rounding
    per sum instead of two), the input untouched, the output in o_proj's output tensor."""
    lay, ref, x, pe = _layer_8b(4, dtype, tokens)
    kw = dict(attention_mask=None, position_embeddings=pe)
    with torch.no_grad():
        want32 = ref(x.float(), attention_mask=None, position_embeddings=tuple(t.float() for t in pe))
        before = lay(x, **kw)
        got_mods = fused.fuse(lay)
        assert lay in got_mods and lay.self_attn.o_proj in got_mods
        keep = x.clone()
        ptrs = []

        def ptr(m, a, o):
            ptrs.append(o.data_ptr())
        ptr._qllm_keeps_nothing = True  # an address only: the layer may still add into o_proj's output
        h = lay.self_attn.o_proj.register_forward_hook(ptr)
        got = lay(x, **kw)
        h.remove()
    assert torch.equal(x, keep)
    assert ptrs == [got.data_ptr()]

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    base, mine, between = rel(before, want32), rel(got, want32), rel(got, before)
    print(f"{dtype} T={tokens}: fused layer vs float32 {mine:.3g}, unfused vs float32 {base:.3g}, "
          f"fused vs unfused {between:.3g}")
    assert mine <= 1.05 * base, (mine, base)
    assert between <= 2 * base, (between, base)
    # inside residual_in_place, an input marked as a fused layer's output takes the attention
    # residual in place: the same values (addmm copies the residual, then runs the same GEMM)
    x2 = x.clone()
    setattr(x2, "_qllm_layer_out", torch.nn.Module())  # as if made by a fused layer with no hooks
    with torch.no_grad(), fused.residual_in_place():
        got2 = lay(x2, **kw)
    assert got2.data_ptr() == x2.data_ptr() and torch.equal(got2, got)
    fused.unfuse(lay)


def test_fused_layer_in_a_cuda_graph():
    """The fused layer captured in a CUDA graph replays to what it computes eagerly on new inputs."""
    lay, _, x, pe = _layer_8b(5, torch.bfloat16, 64)
    kw = dict(attention_mask=None, position_embeddings=pe)
    fused.fuse(lay)
    with torch.no_grad():
        lay(x, **kw)  # warm-up (cuBLAS workspaces) before the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            lay(x, **kw)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lay(x, **kw)
        for seed in (6, 7):
            x.copy_(_randn(_gen(seed), 1, 64, 4096, dtype=torch.bfloat16))
            graph.replay()
            want = lay(x, **kw)
            torch.testing.assert_close(out, want)
    fused.unfuse(lay)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
def test_fused_layer_rows_used(dtype, in_place):
    """rows_used(layer, n): the attention runs over every row, o_proj's GEMM, the norm and the MLP
    over the last n only.  Those rows are the whole layer's rows to rounding (the same GEMMs on
    fewer rows may pick other cuBLAS kernels), the others are NaN; the input is untouched unless
    the residual goes in place.  n >= S, outside residual_in_place, or for another layer: every
    row, bitwise the plain fused layer."""
    S = 200
    lay, ref, x, pe = _layer_8b(8, dtype, S)
    kw = dict(attention_mask=None, position_embeddings=pe)
    fused.fuse(lay)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    with torch.no_grad():
        want32 = ref(x.float(), attention_mask=None, position_embeddings=tuple(t.float() for t in pe))
        with fused.residual_in_place():
            full = lay(x, **kw)  # unmarked input: not in place
            for n in (0, 1, 37, S - 1):
                xi = x.clone()
                if in_place:
                    setattr(xi, "_qllm_layer_out", torch.nn.Module())
                with fused.rows_used(lay, n):
                    got = lay(xi, **kw)
                if in_place:
                    assert got.data_ptr() == xi.data_ptr()
                else:
                    assert torch.equal(xi, x)
                assert got.shape == full.shape
                assert bool(torch.isnan(got[:, :S - n]).all()), n
                if n:
                    tail = got[:, S - n:]
                    assert bool(torch.isfinite(tail).all())
                    base, mine = rel(full[:, S - n:], want32[:, S - n:]), rel(tail, want32[:, S - n:])
                    assert mine <= 1.1 * base and rel(tail, full[:, S - n:]) <= 2 * base, (n, mine, base)
            for n in (S, S + 5):  # every row is used
                with fused.rows_used(lay, n):
                    assert torch.equal(lay(x.clone(), **kw), full)
            with fused.rows_used(torch.nn.Linear(1, 1), 3):  # another layer
                assert torch.equal(lay(x.clone(), **kw), full)
        with fused.rows_used(lay, 3):  # outside residual_in_place
            assert torch.equal(lay(x.clone(), **kw), full)
    with pytest.raises(ValueError, match="n: expected an int >= 0"):
        with fused.rows_used(lay, -1):
            pass
    fused.unfuse(lay)


def test_patched_model_last_layer_rows(monkeypatch):
    """A patched CUDA model called with logits_to_keep=1 runs its last layer's MLP over the kept
    position only (per chunk: none, then one); the kept logits are those of the call that keeps every
    position (logits_to_keep=0) to rounding, the layer memories bitwise equal, and decoding after
    gives the same tokens."""
    model, _ = _tiny_llama(9, torch.bfloat16)
    ids = torch.randint(0, 256, (1, 300), generator=_gen(10)).to(DEV)
    cfg = qllm.QLLMConfig(n_init=16, n_local=64, block_size=16, topk=3, repr_topk=4, exc_block_size=32,
                          chunk_size=128)
    rows = []

    class Rec:
        def __getattr__(self, name):
            return getattr(ops_real, name)

        def silu_mul(self, g, u):
            rows.append(g.shape[-2])
            return ops_real.silu_mul(g, u)

    ops_real = fused.ops
    monkeypatch.setattr(fused, "ops", Rec())
    with qllm.patched(model, cfg), torch.no_grad():
        kw = model._qllm.cache_kw
        outs = {}
        for keep in (0, 1):
            rows.clear()
            cache = qllm.QLLMCache(model._qllm)
            cache.reserve_tokens = 400
            logits = model(ids, **{kw: cache}, use_cache=True, logits_to_keep=keep).logits
            outs[keep] = (logits[:, -1:], cache, list(rows))
        assert outs[0][2] == [128, 128, 128, 128, 44, 44]  # chunks x layers
        assert outs[1][2] == [128, 128, 44, 1]  # the last layer: no row of chunks 1, 2; chunk 3's last
        a, b = outs[0][0].float(), outs[1][0].float()
        assert float((a - b).norm() / a.norm()) < 2e-2
        ca, cb = outs[0][1], outs[1][1]
        for i, m in ca.memories.items():
            r = cb.memories[i]
            n = m.n_seen
            assert torch.equal(m.k_store[:, :n], r.k_store[:, :n]) and torch.equal(m.scores, r.scores), i
            assert torch.equal(m.block_reprs(), r.block_reprs()), i
        tok = a.argmax(-1)
        for _ in range(8):
            la = model(tok, **{kw: ca}, use_cache=True, logits_to_keep=1).logits
            lb = model(tok, **{kw: cb}, use_cache=True, logits_to_keep=1).logits
            assert torch.equal(la, lb)  # the same memories: the same decode
            tok = la.argmax(-1)
        # labels / hidden states asked: every row
        rows.clear()
        model(ids[:, :100], use_cache=True, logits_to_keep=1, output_hidden_states=True)
        assert rows == [100, 100]
