"""The persistent GEMV chain (8 layer pairs 5120->2048->5120, one TP8 rank's shapes) and one fp8_gemv launch,
each run three times: what `ncu` profiles for benchmarks/HISTORY.md part 19 (`gpu_checklist.sh ncu-chain`).
Usage: PYTHONPATH=. python3 benchmarks/experiments/ncu_chain.py [ROWS [NUM_WARPS]]"""
import sys

import torch

from maverick.bench.kernels import fp8_weight
from maverick_plugins.kernels.fp8_gemv import fp8_gemv
from maverick_plugins.kernels.persistent_chain import GemvChain

rows, warps = (int(a) for a in (sys.argv[1:] + ["8", "8"])[:2])
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
