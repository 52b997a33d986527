# Experiment (not part of the package): the warp-specialized persistent GEMV chain (chain_ws.cu, compiled by
# NVRTC through cupy, which the GPU machines have) against the Triton persistent chain and the launches a step
# runs today, same stages, same run. `PYTHONPATH=. python3 benchmarks/experiments/chain_ws_bench.py` on a GPU.
from pathlib import Path
import numpy as np
import torch
import cupy as cp
from maverick.bench.kernels import gemv_chain_stages, gemv_launches, plain_read
from maverick.bench.timing import graph_us
from maverick_plugins.kernels.persistent_chain import GemvChain

h, i, layers = 5120, 2048, 48
torch.manual_seed(0)
# outputs of unit rms at every stage (x / (8/448) quantized, weights of rms 32, row scales of rms 1): decayed
# values would sit where e4m3 is coarsest and make the two kernels' last-bit differences grow
stages = gemv_chain_stages(h, i, layers, lambda n, k: (torch.rand(n, device="cuda") + 0.5) * 0.96 / (32 * k ** 0.5))
chain = GemvChain(stages, rows=8)  # the Triton chain: the reference, and its time
x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
src = (Path(__file__).parent / "chain_ws.cu").read_text()
sms = torch.cuda.get_device_properties(0).multi_processor_count
S = len(stages)
print(torch.cuda.get_device_name(), "tiles at rows 8:", chain.tiles, flush=True)
want = chain(x).clone()
ref_act = chain.act.clone()  # every stage's output, for the stage-by-stage check


def build(nbuf, nc, rows):
    """The kernel for a ring of nbuf slots, nc consumer warps and tiles of `rows` rows (at K=5120), on its own
    GemvChain (the same stages, packing, desc and tile table at that row count): (run(waits), that chain)."""
    ch = chain if rows == 8 else GemvChain(stages, rows=rows)
    slot = rows * 5120  # the largest tile: rows x K=5120 (narrow stages take more rows of fewer bytes)
    smem = nbuf * (slot + 16 + 112) + 4 * 5120  # slots, mbarriers, tile headers (112 bytes), the input
    k = None
    for arch in ((), ("-arch=sm_90a",), ("--gpu-architecture=compute_90a",)):
        try:
            k = cp.RawKernel(src, "chain_ws", options=("-std=c++17", "-I/usr/local/cuda/include", f"-DNBUF={nbuf}",
                                                       f"-DNC={nc}", f"-DSLOT={slot}", *arch))
            k.max_dynamic_shared_size_bytes = smem
            break
        except Exception as e:  # noqa: BLE001
            print("compile with", arch, "failed:", str(e)[-1500:], flush=True)
    ctr = torch.zeros(1 + S, dtype=torch.int32, device="cuda")
    w = ch.weights.view(torch.uint8)
    nprog = min(sms, ch.tiles)
    P = lambda t: np.uint64(t.data_ptr())  # noqa: E731

    def run(waits=1):
        with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            k((nprog,), (32 * (nc + 1),), (P(w), P(ch.row_scales), P(ch.input_scales), P(ch.act), P(ch.desc),
                                          P(ch.tile_stage), P(ctr), np.int32(S), np.int32(ch.tiles),
                                          np.int32(nprog), np.int32(rows), np.int32(waits)), shared_mem=smem)
    return run, ch, ctr


def stage_rel(ch, i):
    start, n = ch.spans[i]
    a, b = ch.act[start:start + n].float(), ref_act[start:start + n].float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


for nbuf, nc, rows in ((4, 8, 8), (2, 8, 8), (4, 4, 8), (2, 8, 16)):
    run, ch, ctr = build(nbuf, nc, rows)
    ch.act.zero_()
    ch.act[ch.input_offs[0]:ch.input_offs[0] + h].copy_(x.reshape(-1))
    run()
    torch.cuda.synchronize()
    rels = [stage_rel(ch, j) for j in range(S)]
    worst = max(range(S), key=rels.__getitem__)
    print(f"ring {nbuf}, {nc} consumer warps, rows {rows}: last stage {rels[-1]:.1e} from the Triton chain, "
          f"first four {[f'{r:.1e}' for r in rels[:4]]}, worst {rels[worst]:.1e} at stage {worst}; counters back "
          f"to 0: {int(ctr.abs().sum()) == 0}; rms out {float(want.float().pow(2).mean().sqrt()):.3g}", flush=True)
    t, t_free = graph_us([run], reps=2, iters=20), graph_us([lambda: run(0)], reps=2, iters=20)
    print(f"  {t:.1f} us; no waits {t_free:.1f} us", flush=True)


nbytes = 2 * layers * h * i
print(f"triton persistent chain: {graph_us([lambda: chain(x)], reps=2, iters=20):.1f} us", flush=True)
print(f"launches (fp8_gemv, PDL): {graph_us([lambda: gemv_launches(x, stages)], reps=2, iters=20):.1f} us", flush=True)
print(f"plain read of {nbytes / 1e6:.0f} MB: {graph_us(plain_read(nbytes), reps=2, iters=20):.1f} us", flush=True)
