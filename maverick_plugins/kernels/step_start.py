"""The step's first kernels: its tokens' embedding rows (this rank's slice of the vocabulary) and the RoPE
angles' cos and sin. Each replaces a chain of small torch kernels (8 launches for the masked gather, 4 for
cos / sin): at decode sizes a launch is the whole cost of such an op, about 2 us in a CUDA graph."""
import torch
import triton
import triton.language as tl

EMBED_BLOCK = 1024  # hidden columns a program copies (5120: 5 programs a token)


@triton.jit
def _embedding_rows_kernel(ids_ptr, w_ptr, out_ptr, start, rows, H, BLOCK: tl.constexpr):
    """out[t] = weight[ids[t] - start] where this rank holds that row, else zeros (grid: tokens, H / BLOCK)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    local = tl.load(ids_ptr + t) - start
    mine = (local >= 0) & (local < rows)
    row = tl.where(mine, local, 0).to(tl.int64)
    x = tl.load(w_ptr + row * H + offs, mask=(offs < H) & mine, other=0.0)
    tl.store(out_ptr + t.to(tl.int64) * H + offs, x, mask=offs < H)


@triton.jit
def _rope_cos_sin_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, T, HALF, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """cos and sin of position * inv_freq in fp32 (tl.cos / tl.sin build as libdevice's precise cosf / sinf on
    NVIDIA, the same PTX as tl.extra.cuda.libdevice.cos: no approx instructions, full range reduction)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.arange(0, BLOCK_F)
    pos = tl.load(pos_ptr + t, mask=t < T, other=0).to(tl.float32)
    inv = tl.load(inv_ptr + f, mask=f < HALF, other=0.0)
    angle = pos[:, None] * inv[None, :]
    mask = (t < T)[:, None] & (f < HALF)[None, :]
    idx = t[:, None].to(tl.int64) * HALF + f[None, :]
    tl.store(cos_ptr + idx, tl.cos(angle), mask=mask)
    tl.store(sin_ptr + idx, tl.sin(angle), mask=mask)


def embedding_rows_triton(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    T, (rows, H) = ids.numel(), weight.shape
    assert weight.stride(1) == 1 and weight.stride(0) == H, "embedding weight must be contiguous [rows, hidden]"
    out = torch.empty((T, H), dtype=weight.dtype, device=weight.device)
    if T:
        _embedding_rows_kernel[(T, triton.cdiv(H, EMBED_BLOCK))](ids, weight, out, start, rows, H, BLOCK=EMBED_BLOCK,
                                                                num_warps=4)
    return out


def rope_cos_sin_triton(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, half = positions.numel(), inv_freq.numel()
    cos = torch.empty((T, half), dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    block_f = triton.next_power_of_2(half)
    block_t = max(1, 1024 // block_f)  # 16 tokens a program at head_dim 128: 8 angles a thread, 90 registers
    if T:
        _rope_cos_sin_kernel[(triton.cdiv(T, block_t),)](positions, inv_freq, cos, sin, T, half, BLOCK_T=block_t,
                                                         BLOCK_F=block_f, num_warps=4)
    return cos, sin
