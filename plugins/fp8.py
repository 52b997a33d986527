"""FP8 (e4m3) reference ops: what every FP8 GPU kernel must compute.

Per-tensor static scales follow ModelOpt: scale = amax / 448, x8 = saturate(x / scale),
x = x8 * scale. A GEMM multiplies the FP8 values exactly (every e4m3 product fits fp32) and
accumulates in fp32, then applies input_scale * weight_scale once.
"""
import torch

from .activation import swiglu
from .dispatch import kernels_enabled, threshold

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to +-448 and rounded to e4m3 (round to nearest even)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_dynamic_per_token(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale amax/448 computed on the fly (Meta's FP8 activations). Returns (x8, scale [T, 1])."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(eps) / FP8_MAX
    return quantize_fp8_static(x, scale), scale


def quantize_fp8(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 linear's activation: static per-tensor scale (ModelOpt) or, with None, dynamic per token
    (Meta). Returns (x8, fp32 scale: a scalar or [..., 1])."""
    if input_scale is None:
        return quantize_fp8_dynamic_per_token(x)
    return quantize_fp8_static(x, input_scale), input_scale.float()


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x8.float() * scale.float()).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 linear: the low-latency kernel for a few tokens on CUDA, else the reference."""
    if x.dim() == 2 and x.shape[0] <= threshold(x, "gemm_max_tokens"):
        y = _few_tokens(x, weight, weight_scale, input_scale, out_dtype, swiglu=False)
        if y is not None:
            return y
    if x.is_cuda and kernels_enabled() and x.dim() == 2 and weight.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0:
        return fp8_linear_cublas(x, weight, weight_scale, input_scale, out_dtype)
    return fp8_linear_ref(x, weight, weight_scale, input_scale, out_dtype)


def fp8_linear_cublas(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Many tokens (prefill, large batches): cuBLAS FP8 through torch._scaled_mm, same math as the
    reference (exact e4m3 products, fp32 accumulation, scales applied once)."""
    x8, xs = quantize_fp8(x, input_scale)
    ws = weight_scale.float()
    if ws.numel() > 1 or xs.numel() > 1:  # row-wise scaling needs both operands row-wise
        xs = xs.reshape(-1, 1).expand(x8.shape[0], 1).contiguous()
        ws = ws.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    return torch._scaled_mm(x8, weight.t(), scale_a=xs, scale_b=ws, out_dtype=out_dtype)


def fp8_linear_swiglu(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up of an FP8 gate|up GEMM: fused in the kernel epilogue for a few tokens on CUDA."""
    if x.dim() == 2 and x.shape[0] <= threshold(x, "gemm_max_tokens"):
        y = _few_tokens(x, weight, weight_scale, input_scale, out_dtype, swiglu=True)
        if y is not None:  # None: per-token activations beyond the GEMV's shapes, as in fp8_linear
            return y
    return swiglu(fp8_linear(x, weight, weight_scale, input_scale, out_dtype))  # cuBLAS for many tokens on CUDA


def _few_tokens(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None, out_dtype: torch.dtype, swiglu: bool) -> torch.Tensor | None:
    """The min-latency kernels: the register-resident GEMV for a token (two at the shapes where it wins),
    the split-K GEMM beyond. Activations quantized per token (input_scale None): the GEMV only, else None."""
    from .kernels import fp8_gemv

    x = x.contiguous()
    config = None
    if x.shape[0] <= threshold(x, "gemv_max_tokens"):
        config = fp8_gemv.config_for(weight.shape[0], weight.shape[1], x.shape[0], swiglu)
    if config is not None:
        return fp8_gemv.fp8_gemv(x, weight, weight_scale, input_scale, out_dtype, swiglu=swiglu, config=config)
    if input_scale is None:
        return None
    from .kernels.fp8_gemm import fp8_gemm_small_m

    return fp8_gemm_small_m(x, weight, weight_scale, input_scale, out_dtype, swiglu=swiglu)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = quant(x) @ weight^T * scales.

    x [..., K] high precision; weight [N, K] e4m3; weight_scale a scalar or [N] / [N, 1] (per output
    channel); input_scale a scalar (static) or None (dynamic per token).
    """
    x8, x_scale = quantize_fp8(x, input_scale)
    acc = x8.float() @ weight.float().t()  # exact products, fp32 accumulation
    w_scale = weight_scale.float().reshape(-1) if weight_scale.numel() > 1 else weight_scale.float()
    return (acc * x_scale * w_scale).to(out_dtype)
