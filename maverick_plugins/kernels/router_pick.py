"""The router's pick inside a kernel, as moe_router makes it: the largest logit (ties: the lowest expert id)
and its sigmoid score rounded to the activation dtype. The router's own top-k and the MoE passes that pick
from the router's logits (one token) use the same code, so they pick the same expert."""
import triton
import triton.language as tl


@triton.jit
def row_logits(row_ptr, E, E_POW2: tl.constexpr):
    """(one token's E logits as f32 [E_POW2], -inf past E; their offsets)."""
    offs = tl.arange(0, E_POW2)
    return tl.load(row_ptr + offs, mask=offs < E, other=float("-inf")).to(tl.float32), offs


@triton.jit
def argmax_lowest(x, offs, E_POW2: tl.constexpr):
    """(the offset of the largest of x, the lowest where tied; that largest value)."""
    best = tl.max(x, axis=0)
    return tl.min(tl.where(x == best, offs, E_POW2), axis=0), best


@triton.jit
def sigmoid_score(best, dtype: tl.constexpr):
    """sigmoid(best) in dtype (the router scales the expert's input by it)."""
    return (1.0 / (1.0 + tl.exp(-best))).to(dtype)
