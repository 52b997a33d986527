"""What qkv_post does to q and k, on rows loaded straight from the fused QKV output: interleaved RoPE,
QK-norm (L2 over head_dim, no weight), the NoPE temperature of q. Each step rounds to the model dtype,
as the reference's tensors do between ops. Shared by the qkv_post kernel and the decode attention kernel
(which takes the raw QKV at one new token a sequence and so needs no qkv_post launch).
"""
import triton
import triton.language as tl


@triton.jit
def load_qk_rows(row_ptr, tok, ok, cos_ptr, sin_ptr, eps, offs_d, dt: tl.constexpr, HEAD_DIM: tl.constexpr,
                 USE_ROPE: tl.constexpr, QK_NORM: tl.constexpr):
    """Rows [R, HEAD_DIM] (f32 holding dt values) of q or k heads: row_ptr [R] points at each row's head in
    the QKV output, tok [R] is its token (the row of cos, sin), rows not ok are zeros."""
    x = tl.load(row_ptr[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if USE_ROPE:  # pair (2i, 2i+1) rotates by angle i: the partner of column d is d ^ 1
        partner = tl.load(row_ptr[:, None] + (offs_d ^ 1)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        cs = tok[:, None] * (HEAD_DIM // 2) + (offs_d // 2)[None, :]
        c = tl.load(cos_ptr + cs, mask=ok[:, None], other=0.0)
        s = tl.load(sin_ptr + cs, mask=ok[:, None], other=0.0)
        odd = (offs_d % 2 == 1)[None, :]
        x = tl.where(odd, partner * s + x * c, x * c - partner * s).to(dt).to(tl.float32)
    if QK_NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        x = (x * r[:, None]).to(dt).to(tl.float32)
    return x


@triton.jit
def temperature(pos, floor_scale, attn_scale):
    """The NoPE layers' query scale log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1 at positions pos."""
    return tl.log(tl.floor((pos.to(tl.float32) + 1.0) / floor_scale) + 1.0) * attn_scale + 1.0
