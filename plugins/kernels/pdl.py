"""Programmatic dependent launch, as every kernel enters it (dispatch.PDL says whether it is on), and
the L2 prefetch a kernel issues before it waits (dispatch.PDL_PREFETCH)."""
import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL the next kernel may launch now, and this one waits here until its predecessor is done."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Hopper bulk prefetch of nbytes (a multiple of 16, 16-byte aligned) at each pointer into L2.
    Issued before pdl_enter, it streams weights (which no earlier kernel writes) while the previous
    kernel still runs. GPU only: the Triton interpreter has no inline PTX."""
    tl.inline_asm_elementwise("{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r",
                              [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)
