/*
 * ops_fused_cuda.cpp -- torch.ops.qllm.rms_norm / silu_mul: the fused model
 * kernels of csrc/cuda/fused.cu (qllm/fused.py patches them into Llama-style
 * models).  CUDA builds only: the ops exist when qllm was built with CUDA
 * (callers check hasattr(torch.ops.qllm, "rms_norm")).
 *
 *   rms_norm(x, weight, eps)  x [..., H] f16|bf16, weight [H] x's dtype
 *                             -> [..., H]: Llama's RMSNorm (fused.cu says
 *                             which rounding steps it reproduces)
 *   silu_mul(gate, up)        gate, up same shape and dtype (f16|bf16)
 *                             -> silu(gate) * up, bitwise torch's
 *
 * Inputs need a contiguous last dim and leading dims that collapse into rows
 * at one stride; anything else is copied contiguous first (dtypes are never
 * changed).  Outputs are new contiguous tensors.  No host synchronisation:
 * both ops can be captured in a CUDA graph.  A Meta implementation runs the
 * same checks.
 *
 * Errors: wrong dtype -> TypeError; shapes, devices, eps -> ValueError;
 * messages "qllm.<op>: <argument>: expected ..., got ...".
 */
#ifdef QLLM_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>

#include "../cuda/attend_checks.cuh"
#include "../cuda/qllm_cuda.cuh"
#include "tensor_view.h"

namespace qllm_torch {
namespace {

constexpr const char *kRmsNorm = "qllm.rms_norm";
constexpr const char *kSiluMul = "qllm.silu_mul";

/* ------------------------------------------------------------------ checks */
/* Device-agnostic (dtype, rank, symbolic sizes, device): CUDA and Meta. */

void check_half_dtype(const char *op, const char *name, const at::Tensor &t) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": ", name,
                     ": expected dtype float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

void check_same_dtype(const char *op, const char *name, const at::Tensor &t, const char *ref_name,
                      const at::Tensor &ref) {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, ": expected dtype ",
                     dtype_name(ref.scalar_type()), " (the dtype of ", ref_name, "), got ",
                     dtype_name(t.scalar_type()));
}

void check_rms_norm_args(const at::Tensor &x, const at::Tensor &weight, double eps) {
    const char *op = kRmsNorm;
    check_half_dtype(op, "x", x);
    check_same_dtype(op, "weight", weight, "x", x);
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x: expected at least 1 dim (..., hidden), got a scalar");
    TORCH_CHECK_VALUE(x.sym_size(-1) >= 1, op, ": x: expected hidden (last dim) >= 1, got shape ",
                      shape_str(x.sym_sizes()));
    TORCH_CHECK_VALUE(weight.dim() == 1 && weight.sym_size(0) == x.sym_size(-1), op,
                      ": weight: expected shape [hidden], hidden the last dim of x (shape ",
                      shape_str(x.sym_sizes()), "), got shape ", shape_str(weight.sym_sizes()));
    check_same_device(op, "weight", weight, "x", x);
    const float e = static_cast<float>(eps);
    TORCH_CHECK_VALUE(std::isfinite(e) && e >= 0.0f, op,
                      ": eps: expected a finite float32 value >= 0, got ", std::to_string(eps));
}

void check_silu_mul_args(const at::Tensor &gate, const at::Tensor &up) {
    const char *op = kSiluMul;
    check_half_dtype(op, "gate", gate);
    check_same_dtype(op, "up", up, "gate", gate);
    TORCH_CHECK_VALUE(gate.dim() >= 1, op, ": gate: expected at least 1 dim, got a scalar");
    TORCH_CHECK_VALUE(up.sym_sizes() == gate.sym_sizes(), op, ": up: expected gate's shape ",
                      shape_str(gate.sym_sizes()), ", got ", shape_str(up.sym_sizes()));
    check_same_device(op, "up", up, "gate", gate);
}

/* --------------------------------------------------------------- row views */

/* t (last dim contiguous) as rows of its last dim: the stride between rows
 * when the leading dims collapse into one, else -1. */
int64_t row_stride(const at::Tensor &t) {
    if (t.stride(-1) != 1) return -1;
    int64_t rs = -1, span = 1;
    for (int64_t i = t.dim() - 2; i >= 0; --i) {
        if (t.size(i) == 1) continue;
        if (rs < 0) {
            rs = t.stride(i);
            span = t.size(i);
        } else if (t.stride(i) != rs * span) {
            return -1;
        } else {
            span *= t.size(i);
        }
    }
    return rs < 0 ? t.size(-1) : rs; /* one row: any stride */
}

/* t itself when it is rows at one stride, else a contiguous copy; rs = row stride. */
at::Tensor as_rows(const at::Tensor &t, int64_t &rs) {
    rs = row_stride(t);
    if (rs >= 0) return t;
    at::Tensor c = t.contiguous();
    rs = c.size(-1);
    return c;
}

int qllm_dtype_of(const at::Tensor &t) { return t.scalar_type() == at::kHalf ? QLLM_DTYPE_F16 : QLLM_DTYPE_BF16; }

void check_cuda(const char *op, int st) { TORCH_CHECK(st == QLLM_CUDA_OK, op, ": ", qllm_cuda_last_error()); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

/* -------------------------------------------------------------------- CUDA */

at::Tensor rms_norm_cuda(const at::Tensor &x, const at::Tensor &weight, double eps) {
    check_rms_norm_args(x, weight, eps);
    TORCH_CHECK_VALUE(x.is_cuda(), kRmsNorm, ": x: expected a CUDA tensor, got one on ", x.device().str());
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor out = at::empty(x.sizes(), x.options());
    if (out.numel() == 0) return out;
    int64_t rs = 0;
    const at::Tensor xr = as_rows(x, rs);
    const at::Tensor w = weight.is_contiguous() ? weight : weight.contiguous();
    const int64_t H = x.size(-1);
    check_cuda(kRmsNorm, qllm_cuda_rms_norm(qllm_dtype_of(x), xr.const_data_ptr(), rs, w.const_data_ptr(),
                                            static_cast<float>(eps), out.mutable_data_ptr(), out.numel() / H, H,
                                            stream()));
    return out;
}

at::Tensor silu_mul_cuda(const at::Tensor &gate, const at::Tensor &up) {
    check_silu_mul_args(gate, up);
    TORCH_CHECK_VALUE(gate.is_cuda(), kSiluMul, ": gate: expected a CUDA tensor, got one on ", gate.device().str());
    const c10::cuda::CUDAGuard guard(gate.device());
    at::Tensor out = at::empty(gate.sizes(), gate.options());
    if (out.numel() == 0) return out;
    int64_t grs = 0, urs = 0;
    const at::Tensor g = as_rows(gate, grs);
    const at::Tensor u = as_rows(up, urs);
    const int64_t cols = gate.size(-1);
    const int64_t rows = out.numel() / cols;
    /* both contiguous: one row of every element (vectors across row ends) */
    const bool flat = g.is_contiguous() && u.is_contiguous();
    check_cuda(kSiluMul, qllm_cuda_silu_mul(qllm_dtype_of(gate), g.const_data_ptr(), flat ? out.numel() : grs,
                                            u.const_data_ptr(), flat ? out.numel() : urs, out.mutable_data_ptr(),
                                            flat ? 1 : rows, flat ? out.numel() : cols, stream()));
    return out;
}

/* -------------------------------------------------------------------- Meta */

at::Tensor rms_norm_meta(const at::Tensor &x, const at::Tensor &weight, double eps) {
    check_rms_norm_args(x, weight, eps);
    return at::empty_symint(x.sym_sizes(), x.options());
}

at::Tensor silu_mul_meta(const at::Tensor &gate, const at::Tensor &up) {
    check_silu_mul_args(gate, up);
    return at::empty_symint(gate.sym_sizes(), gate.options());
}

}  // namespace
}  // namespace qllm_torch

TORCH_LIBRARY_FRAGMENT(qllm, m) {
    /* x [..., H] f16|bf16, weight [H] x's dtype -> [..., H]:
     * weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(dtype) */
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
    /* gate, up [...] f16|bf16, same shape -> silu(gate) * up */
    m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(qllm, CUDA, m) {
    m.impl("rms_norm", &qllm_torch::rms_norm_cuda);
    m.impl("silu_mul", &qllm_torch::silu_mul_cuda);
}

TORCH_LIBRARY_IMPL(qllm, Meta, m) {
    m.impl("rms_norm", &qllm_torch::rms_norm_meta);
    m.impl("silu_mul", &qllm_torch::silu_mul_meta);
}

#endif /* QLLM_WITH_CUDA */
