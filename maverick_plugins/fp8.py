"""FP8 (e4m3) reference ops: what every FP8 GPU kernel must compute.

Per-tensor static scales follow ModelOpt: scale = amax / 448, x8 = saturate(x / scale),
x = x8 * scale. A GEMM multiplies the FP8 values exactly (every e4m3 product fits fp32) and
accumulates in fp32, then applies input_scale * weight_scale once.
"""
import torch

from .activation import swiglu
from . import dispatch

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
    """FP8 linear: the kernel dispatch.linear chooses (GEMV, split-K GEMM, cuBLAS), else the reference."""
    kind, config = dispatch.linear(x, weight, swiglu=False, static_input=input_scale is not None)
    if kind == "cublas":
        return fp8_linear_cublas(x, weight, weight_scale, input_scale, out_dtype)
    if kind == "reference":
        return fp8_linear_ref(x, weight, weight_scale, input_scale, out_dtype)
    return _min_latency(kind, config, x, weight, weight_scale, input_scale, out_dtype, swiglu=False)


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
    """silu(gate) * up of an FP8 gate|up GEMM: fused in the GEMV's or GEMM's epilogue where dispatch.linear
    picks one of them, else the plain linear (cuBLAS for many tokens on CUDA) and then the SwiGLU."""
    kind, config = dispatch.linear(x, weight, swiglu=True, static_input=input_scale is not None)
    if kind in ("gemv", "gemm"):
        return _min_latency(kind, config, x, weight, weight_scale, input_scale, out_dtype, swiglu=True)
    return swiglu(fp8_linear(x, weight, weight_scale, input_scale, out_dtype))


def _min_latency(kind: str, config: tuple, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 input_scale: torch.Tensor | None, out_dtype: torch.dtype, swiglu: bool) -> torch.Tensor:
    """The register-resident GEMV (a token or two) or the split-K GEMM (up to 16 tokens)."""
    if kind == "gemv":
        from .kernels.fp8_gemv import fp8_gemv

        return fp8_gemv(x.contiguous(), weight, weight_scale, input_scale, out_dtype, swiglu=swiglu, config=config)
    from .kernels.fp8_gemm import fp8_gemm_small_m

    return fp8_gemm_small_m(x.contiguous(), weight, weight_scale, input_scale, out_dtype, swiglu=swiglu, config=config)


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
