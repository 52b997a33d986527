"""Kernels build for Hopper (sm_90 PTX), checked on any machine: tests/compile_sm90.py compiles them in
a subprocess without the Triton interpreter. This guards kernel code changed where no GPU was at hand;
their numerics are tested against the references in the interpreter (CI) and on GPUs."""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _compile(*names):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(HERE / "compile_sm90.py"), *names], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())


def test_fused_allreduce_builds_with_system_scope_signals():
    """The signalling CASes are system-scope release (send) and acquire (wait) atomics, as the protocol
    across GPUs needs."""
    info = _compile("allreduce_norm")["allreduce_norm"]
    assert "release_sys_cas=0" not in info and "acquire_sys_cas=0" not in info, info


def test_serial_split_k_gemm_builds_with_its_arrival_counter_and_no_spills():
    got = _compile("fp8_gemm")
    assert len(got) == 2, got
    for info in got.values():
        assert "acq_rel_add=0" not in info and "mma=0" not in info and "stack=0" in info, info
    # the swap-AB variant is built with PDL (wait and release), the other without
    assert "griddepcontrol=2" in got["fp8_gemm serial split-K swap=True"], got
    assert "griddepcontrol=0" in got["fp8_gemm serial split-K swap=False"], got


def test_attention_kernels_build_with_tensor_core_dots_and_no_spills():
    got = _compile("decode_attention", "prefill_attention")
    assert len(got) == 7, got
    assert all("mma=0" not in v for k, v in got.items() if "merge" not in k), got
    assert all("stack=0" in v for k, v in got.items() if k.startswith("decode")), got
    # programmatic dependent launch (pdl_enter) only where asked for
    assert "griddepcontrol=2" in got["decode_attention local=True fp8=True"], got
    assert "griddepcontrol=0" in got["decode_attention local=False fp8=False"], got
    assert "regs=" in got["decode_attention alone"] and "stack=0" in got["decode_attention alone"], got


def test_moe_router_and_qkv_post_kernels_build_in_every_variant():
    """Branches the interpreter never takes still have to compile (a qkv_post variant once did not)."""
    got = _compile("moe", "router", "qkv_post")
    assert len(got) == 20, got
    for name, info in got.items():  # MODE 0: CUDA cores; 1, 2: tensor cores; FP8 weights in 16-byte loads
        if name.startswith("moe"):
            assert ("mma=0" in info) == ("mode=0" in name) and "byte_loads=0" in info, (name, info)
            assert ("acq_rel_add=0" in info) == ("split=4" not in name), (name, info)  # split-K's arrival counter
    assert "acq_rel_add=0" not in got["router pick=True"], got  # the arrival counter that picks the last program
    assert "acq_rel_add=0" in got["router pick=False"], got  # logits only: MoE pass 1 picks
    for name, info in got.items():
        assert "stack=0" in info, (name, info)


def test_gemv_builds_with_pdl_and_vector_weight_loads():
    """Every tuned one-token GEMV: waits for its predecessor and releases its successor (griddepcontrol, after
    the weight loads), streams FP8 weights in 16-byte loads, and uses CUDA cores only."""
    from maverick_plugins.dispatch import H200

    got = _compile("fp8_gemv")
    assert len(got) == len(H200.gemv) + 1, got  # and the FP8 lm_head (dynamic activations)
    for name, info in got.items():
        assert "griddepcontrol=2" in info and "byte_loads=0" in info and "mma=0" in info, (name, info)


def test_step_start_kernels_build_with_precise_sin_cos():
    """RoPE's cos / sin are libdevice's full-range functions (angles reach 1M radians), not sin/cos.approx;
    their only local memory is the range reduction's 28-byte scratch (stack 32 at any tile size)."""
    got = _compile("step_start")
    assert len(got) == 2, got
    assert "stack=0" in got["step_start embedding_rows"], got
    assert "approx_sin_cos=0" in got["step_start rope_cos_sin"] and "stack=32" in got["step_start rope_cos_sin"], got


def test_persistent_chain_builds_with_16_byte_weight_loads_and_no_spills():
    """The chain's FP8 weight rows load 16 bytes at a time (the packing's alignment hints reach the loads:
    a hint on an if's result once did not, and every weight byte was its own load), without spills at
    8 warps; the tile counters are released and read with acquire; the next tile's weights are asked of L2
    (the first tile's and every next one's, gate and up blocks: 4 bulk prefetches); with dot, the products
    are tensor-core instructions, which the FMA variants have none of."""
    got = _compile("persistent_chain")
    assert len(got) == 4, got
    for name, info in got.items():
        assert "byte_loads=0" in info and "prefetch=4" in info, (name, info)
        assert ("mma=0" in info) != name.endswith(" dot"), (name, info)  # dot: the products on tensor cores
        assert "release_add=0" not in info, (name, info)
        if "warps=8" in name:
            assert "stack=0" in info, (name, info)
