"""Programmatic dependent launch, as every kernel enters it (dispatch.PDL says whether it is on)."""
import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL the next kernel may launch now, and this one waits here until its predecessor is done."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
