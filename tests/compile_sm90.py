"""Compile Triton kernels for Hopper (sm_90 PTX) on a machine without a GPU: `python tests/compile_sm90.py NAME...`.

Run by tests/test_sm90_compile.py in a subprocess without TRITON_INTERPRET, so kernels changed on a
CPU-only machine are at least known to build for the GPU. Prints one line per kernel: name, then
counts of a few instructions the tests look for, registers and stack (spill) bytes a thread
(byte_loads: one-byte global loads, the sign of an FP8 weight stream that did not vectorize).
Pointers and the integer arguments that are multiples of 16 at run time get Triton's divisibility
hint, as the JIT gives them: without it loads do not vectorize and nothing is representative.
The GPU machines may have another Triton than this machine: to build with theirs, install it apart
(`python -m venv /tmp/tv && /tmp/tv/bin/pip install triton==X.Y.Z`) and put its site-packages first on
PYTHONPATH when running this script.
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from the source tree

_I32 = "i32"
_ATTN_COMMON = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv",
                "table_ptr": "*i32", "ctx_ptr": "*i64", "qidx_ptr": "*i64", "qpos_ptr": "*i64",
                "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
_DIV16_INTS = {"N_OUT", "K", "K_PER_SPLIT", "stride_xm", "stride_wn", "stride_om", "stride_qt", "stride_qh",
               "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_cs", "stride_ch", "stride_ot", "stride_oh",
               "stride_we", "stride_swn", "stride_x", "stride_h", "stride_o", "N_SHARED", "K_SHARED"}
_STRIDES = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_cs", "stride_ch"]


def kernels():
    from maverick_plugins.dispatch import H200
    from maverick_plugins.kernels import (allreduce_norm, decode_attention, fp8_gemm, fp8_gemv, moe_gemv,
                                          prefill_attention, small_ops, step_start)

    gemm = {
        "x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "x_scale_ptr": "*fp32", "out_ptr": "*bf16",
        "partial_ptr": "*fp32", "counter_ptr": "*i32", "M": _I32, "N_OUT": _I32, "K": _I32, "K_PER_SPLIT": _I32,
        "stride_xm": _I32, "stride_wn": _I32, "stride_om": _I32,
    }
    for swap in (False, True):
        yield f"fp8_gemm serial split-K swap={swap}", fp8_gemm._fp8_gemm_kernel, gemm, {
            "ROW_SCALES": False, "SWIGLU": True, "SPLIT_K": 4, "SERIAL": True, "BLOCK_M": 16, "BLOCK_N": 64,
            "BLOCK_K": 256, "SWAP_AB": swap, "PDL": swap}, 4  # PDL: one variant

    gemv = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "x_scale_ptr": "*fp32", "out_ptr": "*bf16",
            "M": _I32, "N_OUT": _I32, "K": _I32, "stride_xm": _I32, "stride_wn": _I32, "stride_om": _I32}
    for (n, k), (block_n, warps) in H200.gemv.items():  # every tuned shape (TP8, TP4), as it runs
        swiglu = (n, k) in ((4096, 5120), (2048, 5120), (8192, 5120))
        ka, kb = fp8_gemv.k_pieces(k)
        yield f"fp8_gemv {n}x{k}", fp8_gemv._fp8_gemv_kernel, gemv, {
            "ROW_SCALES": False, "SWIGLU": swiglu, "BLOCK_N": block_n, "KA": ka, "KB": kb, "DYNAMIC_X": False,
            "PDL": True}, warps
    block_n, warps = H200.gemv_config(25256, 5120, 1, False)  # the FP8 lm_head at TP8: per-token x scale
    yield "fp8_gemv lm_head dynamic", fp8_gemv._fp8_gemv_kernel, gemv, {
        "ROW_SCALES": True, "SWIGLU": False, "BLOCK_N": block_n, "KA": 4096, "KB": 1024, "DYNAMIC_X": True,
        "PDL": True}, warps

    yield "step_start embedding_rows", step_start._embedding_rows_kernel, {
        "ids_ptr": "*i64", "w_ptr": "*bf16", "out_ptr": "*bf16", "start": _I32, "rows": _I32, "H": _I32,
    }, {"BLOCK": step_start.EMBED_BLOCK}, 4
    yield "step_start rope_cos_sin", step_start._rope_cos_sin_kernel, {
        "pos_ptr": "*i64", "inv_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "T": _I32, "HALF": _I32,
    }, {"BLOCK_T": 16, "BLOCK_F": 64}, 4

    yield "allreduce_norm", allreduce_norm._allreduce_add_rms_norm_kernel, {
        "d_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16",
        "buf_ptrs": "*i64", "pad_ptrs": "*i64", "err_ptr": "*i32", "rank": _I32, "site": _I32,
        "site_offset": _I32, "N": _I32, "eps": "fp32", "max_spin": _I32,
    }, {"WORLD": 4, "SPARE": 64, "BLOCK": 8192}, 8
    decode_sig = {
        **_ATTN_COMMON, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64", "m_buf": "*fp32",
        "l_buf": "*fp32", "acc_buf": "*fp32", "Q": _I32, "NBT": _I32, "CHUNK": _I32, "NUM_SPLITS": _I32,
        "sm_scale": "fp32",
        **{s: _I32 for s in _STRIDES}, "eps": "fp32", "floor_scale": "fp32", "attn_scale": "fp32"}
    decode_meta = {"GROUP": 5, "HEAD_DIM": 128, "BLOCK_R": 16, "ROWS": 8, "BLOCK_KV": 64, "BLOCK_Q": 16,
                   "BF16_DOT": True}
    for local, fp8 in ((True, True), (False, False)):
        yield f"decode_attention local={local} fp8={fp8}", decode_attention._decode_kernel, decode_sig, {
            **decode_meta, "LOCAL": local, "FP8": fp8, "USE_ROPE": local, "QK_NORM": local,
            "TEMPERATURE": not local, "CACHE": local, "PDL": local}, 4
        yield f"decode_attention merge local={local}", decode_attention._merge_kernel, {
            "m_buf": "*fp32", "l_buf": "*fp32", "acc_buf": "*fp32", "out_ptr": "*bf16", "qidx_ptr": "*i64",
            "qpos_ptr": "*i64", "ctx_ptr": "*i64", "Q": _I32, "NBT": _I32, "CHUNK": _I32, "NUM_SPLITS": _I32,
            "stride_ot": _I32, "stride_oh": _I32,
        }, {"GROUP": 5, "HEAD_DIM": 128, "BLOCK_D": 32, "ROWS": 8, "BLOCK_KV": 64,
            "MERGE_PARTS": 32, "LOCAL": local, "PDL": local}, 4
        if local:  # one (sequence, kv head), as batch 1 at TP8 launches it: 8 warps, 5 pipeline stages
            yield "decode_attention alone", decode_attention._decode_kernel, decode_sig, {
                **decode_meta, "LOCAL": False, "FP8": True,
                "USE_ROPE": False, "QK_NORM": False, "TEMPERATURE": True, "CACHE": True, "PDL": True}, \
                {"num_warps": H200.attention.alone_warps, "num_stages": H200.attention.alone_stages}
        yield f"prefill_attention local={local} fp8={fp8}", prefill_attention._prefill_kernel, {
            **_ATTN_COMMON, "out_ptr": "*bf16", "Q": _I32, "NBT": _I32, "CHUNK": _I32, "sm_scale": "fp32",
            **{s: _I32 for s in _STRIDES + ["stride_ot", "stride_oh"]},
        }, {"GROUP": 5, "HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KV": 64,
            "LOCAL": local, "FP8": fp8, "BF16_DOT": True}, 4


    moe = {"ids_ptr": "*i64", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "x_scale_ptr": "*fp32",
           "sw_ptr": "*fp8e4nv", "sw_scale_ptr": "*fp32", "sx_scale_ptr": "*fp32", "out_ptr": "*bf16",
           "K": _I32, "E_LOCAL": _I32, "expert_offset": _I32, "TOP_K": _I32, "P": _I32, "stride_we": _I32,
           "stride_wn": _I32, "stride_o": _I32, "scale_stride_e": _I32, "scale_stride_n": _I32}
    for dynamic, mode, block_n in ((False, 0, 2), (True, 0, 2), (False, 1, 16), (True, 2, 64), (False, 2, 64)):
        split = 4 if mode == 2 and not dynamic else 1
        yield f"moe fc13 dynamic={dynamic} mode={mode} split={split}", moe_gemv._fc13_swiglu_kernel, {
            "x_ptr": "*bf16", **{k: v for k, v in moe.items() if k != "out_ptr"}, "scores_ptr": "*bf16",
            "out_ptr": "*bf16", "partial_ptr": "*fp32", "counter_ptr": "*i32", "logits_ptr": "*bf16",
            "N_OUT": _I32, "N_SHARED": _I32, "K_PER_SPLIT": _I32, "E": _I32, "stride_x": _I32,
            "shared_scale_stride_n": _I32,
        }, {"DYNAMIC_X": dynamic, "BLOCK_N": block_n, "BLOCK_K": {0: 2048, 1: 256, 2: 128}[mode], "MODE": mode,
            "SPLIT_K": split, "FROM_LOGITS": split > 1, "E_POW2": 128, "PDL": dynamic}, 4
        for shared in (False, True):
            yield f"moe fc2 dynamic={dynamic} shared={shared} mode={mode}", moe_gemv._fc2_kernel, {
                "h_ptr": "*bf16", **moe, "logits_ptr": "*bf16", "N_OUT": _I32, "K_SHARED": _I32, "E": _I32,
                "stride_swn": _I32, "stride_h": _I32,
            }, {"HAS_SHARED": shared, "DYNAMIC_X": dynamic, "BLOCK_N": max(8, block_n),
                "BLOCK_K": {0: 1024, 1: 256, 2: 128}[mode], "MODE": mode, "FROM_LOGITS": shared, "E_POW2": 128,
                "PDL": shared}, 8
    for pick in (True, False):
        yield f"router pick={pick}", small_ops._router_kernel, {
            "x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*bf16", "counter_ptr": "*i32", "ids_ptr": "*i64",
            "scores_ptr": "*bf16", "T": _I32, "E": _I32, "K": _I32, "stride_x": _I32,
        }, {"TOP_K": 1, "BLOCK_E": 2, "BLOCK_K": 8192, "E_POW2": 128, "PRELOAD": True, "PICK": pick, "PDL": True}, 4
    for cache, fp8 in ((False, False), (True, False), (True, True)):
        yield f"qkv_post cache={cache} fp8={fp8}", small_ops._qkv_post_kernel, {
            "qkv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "q_ptr": "*bf16",
            "k_ptr": "*bf16", "kc_ptr": "*fp8e4nv" if fp8 else "*bf16", "vc_ptr": "*fp8e4nv" if fp8 else "*bf16",
            "slot_ptr": "*i64", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "stride_t": _I32, "HQ": _I32, "KVH": _I32,
            "eps": "fp32", "floor_scale": "fp32", "attn_scale": "fp32",
        }, {"HEAD_DIM": 128, "USE_ROPE": True, "QK_NORM": True, "TEMPERATURE": not cache, "CACHE": cache,
            "FP8": fp8, "PDL": False}, 1


def chain_kernels():
    from maverick_plugins.kernels import persistent_chain

    sig = {"w_ptr": "*fp8e4nv", "rw_ptr": "*bf16", "ws_ptr": "*fp32", "xs_ptr": "*fp32", "g_ptr": "*bf16",
           "act_ptr": "*bf16", "desc_ptr": "*i64", "stage_ptr": "*i32", "ctr_ptr": "*i32", "S": _I32, "TOTAL": _I32, "NPROG": _I32,
           "E": _I32, "eps": "fp32"}
    for rows, warps, dot in ((4, 4, False), (4, 8, False), (8, 8, False), (8, 8, True)):  # one TP8 rank: K up to
        # 5120 = 4096 + 1024, 128 experts
        yield f"persistent_chain rows={rows} warps={warps}{' dot' if dot else ''}", persistent_chain._chain_kernel, sig, {
            "ROWS": rows, "KA": 4096, "KB": 1024, "E_POW2": 128, "PREFETCH": True, "THREADS": 32 * warps, "DOT": dot,
            "PDL": True}, warps


def _resources(cubin: bytes) -> str:
    """'regs=R stack=S' of the kernel, from the cuobjdump that ships with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)}" if m else "regs=? stack=?"


def main(names: list[str]) -> int:
    for name, fn, sig, consts, warps in (*kernels(), *chain_kernels()):
        if names and not any(name.startswith(n) for n in names):
            continue
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)  # by the kernel's order
                 if arg in sig and (sig[arg].startswith("*") or arg in _DIV16_INTS)}
        sig = {**sig, **{k: "constexpr" for k in consts}}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=warps if isinstance(warps, dict) else {"num_warps": warps})
        ptx = k.asm["ptx"]
        print(f"{name}: {_resources(k.asm['cubin'])} prefetch={ptx.count('cp.async.bulk.prefetch.L2')} "
              f"acq_rel_add={ptx.count('atom.global.gpu.acq_rel.add')} "
              f"acquire_add={ptx.count('atom.global.gpu.acquire.add')} release_add={ptx.count('atom.global.gpu.release.add')} "
              f"release_sys_cas={ptx.count('atom.global.release.sys.cas')} "
              f"acquire_sys_cas={ptx.count('atom.global.acquire.sys.cas')} griddepcontrol={ptx.count('griddepcontrol')} mma={ptx.count('mma.sync') + ptx.count('wgmma')} "
              f"byte_loads={ptx.count('ld.global.b8') + ptx.count('ld.global.u8')} "
              f"approx_sin_cos={ptx.count('sin.approx') + ptx.count('cos.approx')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
