# Experiment (not part of the package): the warp-specialized persistent GEMV chain (chain_ws.cu, compiled by
# NVRTC through cupy, which the GPU machines have) against the Triton persistent chain and the launches a step
# runs today, same stages, same run. `PYTHONPATH=. python3 benchmarks/experiments/chain_ws_bench.py` on a GPU.
from pathlib import Path
import numpy as np
import torch
import cupy as cp
from maverick.bench.kernels import fp8_weight, plain_read
from maverick.bench.timing import graph_us
from maverick_plugins.kernels.persistent_chain import GemvChain
from maverick_plugins.kernels.fp8_gemv import fp8_gemv

h, i, layers = 5120, 2048, 48
torch.manual_seed(0)
stages = []
for j in range(2 * layers):
    n, k = (i, h) if j % 2 == 0 else (h, i)
    # outputs of unit rms at every stage (x / (8/448) quantized, weights of rms 32, row scales of rms 1):
    # decayed values would sit where e4m3 is coarsest and make the two kernels' last-bit differences grow
    stages.append((fp8_weight(n, k), (torch.rand(n, device="cuda") + 0.5) * 0.96 / (32 * k ** 0.5),
                   torch.tensor(8 / 448, device="cuda")))
chain = GemvChain(stages, rows=8)
x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
src = (Path(__file__).parent / "chain_ws.cu").read_text()
sms = torch.cuda.get_device_properties(0).multi_processor_count
nprog = min(sms, chain.tiles)
S = len(stages)
print(torch.cuda.get_device_name(), "tiles", chain.tiles, "programs", nprog, flush=True)


def build(nbuf, nc=8):
    smem = nbuf * (40960 + 16 + 112) + 4 * 5120  # slots, mbarriers, tile headers (112 bytes), the input
    for arch in ((), ("-arch=sm_90a",), ("--gpu-architecture=compute_90a",)):
        try:
            k = cp.RawKernel(src, "chain_ws", options=("-std=c++17", "-I/usr/local/cuda/include", f"-DNBUF={nbuf}",
                                                       f"-DNC={nc}", *arch))
            k.max_dynamic_shared_size_bytes = smem
            break
        except Exception as e:  # noqa: BLE001
            print("compile with", arch, "failed:", str(e)[-1500:], flush=True)
    ctr = torch.zeros(1 + S, dtype=torch.int32, device="cuda")
    w = chain.weights.view(torch.uint8)
    P = lambda t: np.uint64(t.data_ptr())  # noqa: E731

    def run(waits=1):
        with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            k((nprog,), (32 * (nc + 1),), (P(w), P(chain.row_scales), P(chain.input_scales), P(chain.act),
                                          P(chain.desc), P(chain.tile_stage), P(ctr), np.int32(S),
                                          np.int32(chain.tiles), np.int32(nprog), np.int32(chain.rows),
                                          np.int32(waits)), shared_mem=smem)
    return run, ctr


want = chain(x).clone()
ref_act = chain.act.clone()  # every stage's output, for the stage-by-stage check


def stage_rel(i):
    start, n = chain.spans[i]
    a, b = chain.act[start:start + n].float(), ref_act[start:start + n].float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
for nbuf in (4, 2):
    run, ctr = build(nbuf)
    chain.act.zero_()
    chain.act[chain.input_offs[0]:chain.input_offs[0] + h].copy_(x.reshape(-1))
    run()
    torch.cuda.synchronize()
    got = chain.output(-1).clone()
    rel = float((got.float() - want.float()).norm() / want.float().norm())
    print(f"NBUF={nbuf}: rel to the Triton chain {rel:.2e}, counters back to 0: {int(ctr.abs().sum()) == 0}",
          f"max |out| {float(want.float().abs().max()):.3g}", flush=True)
    rels = [stage_rel(j) for j in range(S)]
    worst = max(range(S), key=rels.__getitem__)
    print(f"  stage by stage: first four {[f'{r:.1e}' for r in rels[:4]]}, worst {rels[worst]:.1e} at stage {worst}",
          flush=True)
    run()
    torch.cuda.synchronize()
    rel2 = float((chain.output(-1).float() - want.float()).norm() / want.float().norm())
    print(f"  second call rel {rel2:.2e}", flush=True)
    print(f"  ws NBUF={nbuf}: {graph_us([run], reps=2, iters=20):.1f} us; no waits: "
          f"{graph_us([lambda: run(0)], reps=2, iters=20):.1f} us", flush=True)


def separate():
    y = x
    for w8, ws, xs in stages:
        y = fp8_gemv(y, w8, ws, xs, torch.bfloat16)
    return y


nbytes = 2 * layers * h * i
print(f"triton persistent chain: {graph_us([lambda: chain(x)], reps=2, iters=20):.1f} us", flush=True)
print(f"launches (fp8_gemv, PDL): {graph_us([separate], reps=2, iters=20):.1f} us", flush=True)
print(f"plain read of {nbytes / 1e6:.0f} MB: {graph_us(plain_read(nbytes), reps=2, iters=20):.1f} us", flush=True)
