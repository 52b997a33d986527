import sys; sys.path.insert(0,'.'); sys.path.insert(0,'tests')
import torch, maverick, maverick_plugins as ops
from maverick.build.synthetic import synthetic_model
from maverick.config import BuildConfig, ModelConfig, QuantConfig
from maverick.runtime.batch import StepSeq
from maverick.runtime.model_runner import ModelRunner
from helpers import prompt_ids
cfg = ModelConfig.preset("tiny")
build = BuildConfig(max_seq_len=256, max_batch_size=4, kv_cache_block_size=16, quant=QuantConfig("FP8", None))
model = synthetic_model(cfg, build, 0, "cuda", seed=1)
prompts = [prompt_ids(40, seed=1), prompt_ids(7, seed=2)]
def run(kern, graphs, which=None):
    import maverick_plugins.dispatch as D
    r = ModelRunner(model, 256, 4, 16, device="cuda")
    if graphs: r.capture_cuda_graphs([2])
    ops.set_kernels_enabled(False)
    seqs = [StepSeq(i, p, 0, r.kv.grow(i, len(p))) for i, p in enumerate(prompts)]
    l0 = r.forward(seqs)
    ops.set_kernels_enabled(kern)
    old = dict(D.THRESHOLDS["default"])
    if which: 
        for k in D.THRESHOLDS["default"]:
            if k != which: D.THRESHOLDS["default"][k] = -1
    t = l0.argmax(-1).tolist()
    seqs = [StepSeq(i, [t[i]], len(p), r.kv.grow(i, len(p)+1)) for i, p in enumerate(prompts)]
    out = r.forward(seqs)
    D.THRESHOLDS["default"].update(old)
    ops.set_kernels_enabled(True)
    return out
ref = run(False, False)
for name, args in [("eager kernels", (True, False)), ("graph kernels", (True, True)), ("graph ref", (False, True)),
                   ("eager gemm", (True, False, "gemm_max_tokens")), ("eager moe", (True, False, "moe_max_tokens")),
                   ("eager attn", (True, False, "attention_max_new_tokens"))]:
    o = run(*args)
    print(name, ((o-ref).norm()/ref.norm()).item(), flush=True)
