# throwaway: one chain launch and one fp8_gemv launch under ncu
import sys, torch
from maverick.bench.kernels import fp8_weight
from maverick_plugins.kernels.persistent_chain import GemvChain
from maverick_plugins.kernels.fp8_gemv import fp8_gemv
rows, warps = int(sys.argv[1]), int(sys.argv[2])
h, i, layers = 5120, 2048, 8
stages = []
for j in range(2 * layers):
    n, k = (i, h) if j % 2 == 0 else (h, i)
    stages.append((fp8_weight(n, k), torch.full((n,), 1e-3, device="cuda"), torch.tensor(8 / 448, device="cuda")))
chain = GemvChain(stages, rows=rows, num_warps=warps)
x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    chain(x)
    y = x
    for w, ws, xs in stages[:2]:
        y = fp8_gemv(y, w, ws, xs, torch.bfloat16)
torch.cuda.synchronize()
print("ok")
