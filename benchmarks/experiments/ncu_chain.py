"""The persistent GEMV chain (8 layer pairs 5120->2048->5120, one TP8 rank's shapes) and one fp8_gemv launch,
each run three times: what `ncu` profiles for benchmarks/HISTORY.md part 19 (`gpu_checklist.sh ncu-chain`).
Usage: PYTHONPATH=. python3 benchmarks/experiments/ncu_chain.py [ROWS [NUM_WARPS]]"""
import sys

import torch

from maverick.bench.kernels import gemv_chain_stages, gemv_launches
from maverick_plugins.kernels.persistent_chain import GemvChain

rows, warps = (int(a) for a in (sys.argv[1:] + ["8", "8"])[:2])
h, i, layers = 5120, 2048, 8
stages = gemv_chain_stages(h, i, layers)
chain = GemvChain(stages, rows=rows, num_warps=warps)
x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    chain(x)
    gemv_launches(x, stages[:2])
torch.cuda.synchronize()
print("ok")
