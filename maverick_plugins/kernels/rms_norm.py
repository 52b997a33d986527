"""RMSNorm, one program per token row (hidden 5120 fits one block of registers)."""
import torch
import triton
import triton.language as tl

from .pdl import pdl_enter, pdl_launch, pdl_release


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pdl_release(PDL)  # few programs at decode sizes (one wave): release at once
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)  # round like the reference, then scale
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    assert x2.stride(-1) == 1
    out = torch.empty_like(x2)
    N = shape[-1]
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), N, eps, BLOCK=block,
                                     **pdl_launch(x.device), num_warps=8 if block >= 4096 else 4)
    return out.view(shape)
