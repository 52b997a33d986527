"""GPU checks (run on a GPU machine: `pytest -m gpu -o addopts=''`)."""
import pytest
import torch

from helpers import prompt_ids
from maverick import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("GPU test collected on a machine without CUDA: run it with -m gpu on a GPU machine")


def test_cuda_greedy_equals_cpu(tiny_engine):
    """The whole runtime on CUDA (reference ops) gives the CPU path's greedy tokens (fp32 engine)."""
    prompts = [prompt_ids(40, seed=3), prompt_ids(9, seed=4)]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(tiny_engine, device="cpu") as cpu:
        ref = [o.outputs[0].token_ids for o in cpu.generate(prompts, p)]
    with LLM(tiny_engine, device="cuda") as gpu:
        got = [o.outputs[0].token_ids for o in gpu.generate(prompts, p)]
        assert gpu.kv_cache.all_free
    assert got == ref


@pytest.mark.parametrize("kv", [None, "FP8"])
def test_kernels_and_cuda_graphs_equal_reference(kv):
    """Tiny preset, random FP8 weights in engine layout: decode with Triton kernels inside CUDA graphs
    gives the reference path's logits (eager, kernels off) step after step."""
    import maverick_plugins as ops
    from maverick.build.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig
    from maverick.runtime.batch import StepSeq
    from maverick.runtime.model_runner import ModelRunner

    cfg = ModelConfig.preset("tiny")
    build = BuildConfig(max_seq_len=256, max_batch_size=4, kv_cache_block_size=16, quant=QuantConfig("FP8", kv))
    model = synthetic_model(cfg, build, 0, "cuda", seed=1)
    fast = ModelRunner(model, 256, 4, 16, device="cuda")
    slow = ModelRunner(model, 256, 4, 16, device="cuda")
    fast.capture_cuda_graphs([1, 2, 4])
    prompts = [prompt_ids(40, seed=1, vocab=500), prompt_ids(7, seed=2, vocab=500), prompt_ids(70, seed=3, vocab=500)]
    toks, pos, worst = {}, {}, 0.0
    for runner, kernels in ((fast, True), (slow, False)):
        ops.set_kernels_enabled(kernels)
        seqs = [StepSeq(i, p, 0, runner.kv.grow(i, len(p))) for i, p in enumerate(prompts)]
        logits = runner.forward(seqs)
        out = [logits.argmax(-1).tolist()]
        steps = [logits]
        for step in range(12):
            cur = [len(p) + step for p in prompts]
            seqs = [StepSeq(i, [out[-1][i]], cur[i], runner.kv.grow(i, cur[i] + 1)) for i in range(3)]
            logits = runner.forward(seqs)
            steps.append(logits)
            out.append(logits.argmax(-1).tolist())
        toks[kernels], pos[kernels] = out, steps
        for i in range(3):
            runner.kv.free(i)
    ops.set_kernels_enabled(True)
    assert fast.graphs.graphs, "decode steps must have replayed captured graphs"
    for a, b in zip(pos[True], pos[False]):
        worst = max(worst, ((a - b).norm() / b.norm()).item())
    assert worst < 0.05, worst  # bf16 activations, FP8 GEMMs: summation order and SwiGLU rounding differ
    same = sum(x == y for a, b in zip(toks[True], toks[False]) for x, y in zip(a, b)) / (13 * 3)
    assert same > 0.9, same
