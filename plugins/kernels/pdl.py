"""Programmatic dependent launch, as every kernel enters it (dispatch.PDL says whether and how it is on), and
the L2 prefetch a kernel issues before it waits (dispatch.PDL_PREFETCH).

PDL 1 lets the next kernel launch as soon as this one starts; PDL 2 only once every program of this one has
finished its main loop (pdl_release), so the next kernel's programs, which wait on SMs until this one is
done, do not take SM slots this one's later waves still need.
"""
import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL this kernel waits here until its predecessor is done (and its writes are visible); with
    PDL 1 the next kernel may launch from here on."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL != 0:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """With PDL 2: the next kernel may launch once every program of this one got here (past its main loop).
    Kernels that never call it release at exit."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Hopper bulk prefetch of nbytes (a multiple of 16, 16-byte aligned) at each pointer into L2.
    Issued before pdl_enter, it streams weights (which no earlier kernel writes) while the previous
    kernel still runs. GPU only: the Triton interpreter has no inline PTX."""
    tl.inline_asm_elementwise("{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r",
                              [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)
