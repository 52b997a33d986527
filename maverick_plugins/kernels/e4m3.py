"""The static FP8 quantization of maverick_plugins/fp8.py, inside a kernel: x / scale saturated to +-448 and rounded
to e4m3 (round to nearest even), as quantize_fp8_static does it."""
import triton
import triton.language as tl


@triton.jit
def to_e4m3(x, scale):
    return tl.clamp(x.to(tl.float32) / scale, -448.0, 448.0).to(tl.float8e4nv)
