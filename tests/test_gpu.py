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
