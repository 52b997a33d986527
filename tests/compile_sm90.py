"""Compile Triton kernels for Hopper (sm_90 PTX) on a machine without a GPU: `python tests/compile_sm90.py NAME...`.

Run by tests/test_sm90_compile.py in a subprocess without TRITON_INTERPRET, so kernels changed on a
CPU-only machine are at least known to build for the GPU. Prints one line per kernel: name, then
counts of a few instructions the tests look for.
"""
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import maverick  # noqa: E402,F401  (binds maverick_plugins)

_I32 = "i32"
_ATTN_COMMON = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv",
                "table_ptr": "*i32", "ctx_ptr": "*i32", "qidx_ptr": "*i64", "qpos_ptr": "*i64",
                "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
_STRIDES = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_cs", "stride_ch"]


def kernels():
    from maverick_plugins.kernels import allreduce_norm, decode_attention, fp8_gemm, prefill_attention

    yield "fp8_gemm serial split-K", fp8_gemm._fp8_gemm_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "x_scale_ptr": "*fp32", "out_ptr": "*bf16",
        "partial_ptr": "*fp32", "counter_ptr": "*i32", "M": _I32, "N_OUT": _I32, "K": _I32, "K_PER_SPLIT": _I32,
        "stride_xm": _I32, "stride_wn": _I32, "stride_om": _I32,
    }, {"ROW_SCALES": False, "SWIGLU": True, "SPLIT_K": 4, "SERIAL": True, "BLOCK_M": 16, "BLOCK_N": 64,
        "BLOCK_K": 256, "PDL": False}, 4

    yield "allreduce_norm", allreduce_norm._allreduce_add_rms_norm_kernel, {
        "d_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16",
        "buf_ptrs": "*i64", "pad_ptrs": "*i64", "err_ptr": "*i32", "rank": _I32, "site": _I32,
        "site_offset": _I32, "N": _I32, "eps": "fp32", "max_spin": _I32,
    }, {"WORLD": 4, "SPARE": 64, "BLOCK": 8192}, 8
    for local, fp8 in ((True, True), (False, False)):
        yield f"decode_attention local={local} fp8={fp8}", decode_attention._partial_kernel, {
            **_ATTN_COMMON, "m_out": "*fp32", "l_out": "*fp32", "acc_out": "*fp32",
            "Q": _I32, "NBT": _I32, "SPLIT_LEN": _I32, "CHUNK": _I32, "sm_scale": "fp32",
            **{s: _I32 for s in _STRIDES},
        }, {"GROUP": 5, "HEAD_DIM": 128, "BLOCK_R": 16, "BLOCK_KV": 64, "BLOCK_Q": 16, "NUM_SPLITS": 8,
            "LOCAL": local, "FP8": fp8, "BF16_DOT": True, "PDL": local}, 4  # PDL: one variant each way
        yield f"prefill_attention local={local} fp8={fp8}", prefill_attention._prefill_kernel, {
            **_ATTN_COMMON, "out_ptr": "*bf16", "Q": _I32, "NBT": _I32, "CHUNK": _I32, "sm_scale": "fp32",
            **{s: _I32 for s in _STRIDES + ["stride_ot", "stride_oh"]},
        }, {"GROUP": 5, "HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KV": 64,
            "LOCAL": local, "FP8": fp8, "BF16_DOT": True}, 4


def main(names: list[str]) -> int:
    for name, fn, sig, consts, warps in kernels():
        if names and not any(name.startswith(n) for n in names):
            continue
        sig = {**sig, **{k: "constexpr" for k in consts}}
        ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": warps}).asm["ptx"]
        print(f"{name}: acq_rel_add={ptx.count('atom.global.gpu.acq_rel.add')} "
              f"release_sys_cas={ptx.count('atom.global.release.sys.cas')} "
              f"acquire_sys_cas={ptx.count('atom.global.acquire.sys.cas')} griddepcontrol={ptx.count('griddepcontrol')} mma={ptx.count('mma.sync') + ptx.count('wgmma')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
