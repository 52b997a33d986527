"""Which captured graph a step replays, and that padding a prompt chunk up to a graph's shape changes nothing
(CPU: the padded batch runs eagerly through the same model; the GPU tests replay the graphs themselves)."""
import pytest
import torch

from helpers import prompt_ids, runner_for
from maverick.config import BuildConfig
from maverick.runtime.batch import StepSeq
from maverick.runtime.cuda_graph import graph_shape

DECODE, PREFILL = [1, 2, 4, 8], [16, 32, 64, 128]


@pytest.mark.parametrize("tokens,logits,expect", [
    ([1], [1], (1, 1)), ([1, 1, 1], [1, 1, 1], (4, 1)), ([1] * 8, [1] * 8, (8, 1)),
    ([1] * 9, [1] * 9, None),  # more sequences than the largest decode graph
    ([2], [1], (1, 16)), ([16], [1], (1, 16)), ([17], [1], (1, 32)), ([128], [1], (1, 128)),
    ([129], [1], None),  # longer than the largest prefill graph
    ([5, 1], [1, 1], None),  # a prompt chunk beside decode rows: eager
    ([3], [3], None), ([1, 1], [1, 2], None),  # several logits of a sequence (draft verification): eager
])
def test_graph_shape(tokens, logits, expect):
    assert graph_shape(tokens, logits, DECODE, PREFILL) == expect


def test_prefill_graph_sizes_within_the_build_limits():
    b = BuildConfig(max_num_tokens=512, max_seq_len=300, cuda_graph_prefill_tokens=(64, 16, 512, 256, 1, 64))
    assert b.graph_prefill_tokens() == [16, 64, 256]
    assert BuildConfig(cuda_graph_prefill_tokens=()).graph_prefill_tokens() == []
    assert BuildConfig.from_dict(b.to_dict()) == b


def _state(runner):
    return [(k[:-1].clone(), v[:-1].clone()) for k, v in runner.kv_caches]  # the scratch block aside


def test_padded_prompt_chunks_equal_eager(tiny_ckpt):
    """A 40-token prompt in chunks of 24 and 16 (the second starts past a 32-token attention chunk boundary on
    the local layers, with 24 tokens of context): each chunk padded to a 64-token graph shape gives the eager
    step's logits and leaves the same KV cache (the padding writes only the scratch block)."""
    eager = runner_for(tiny_ckpt)
    padded = runner_for(tiny_ckpt)
    padded.model = eager.model
    ids = prompt_ids(40, seed=8)
    pos = 0
    for chunk in (ids[:24], ids[24:]):
        seqs = {r: [StepSeq(0, chunk, pos, r.kv.grow(0, pos + len(chunk)))] for r in (eager, padded)}
        ref = eager.forward(seqs[eager])
        batch = padded._padded(seqs[padded], (1, 64))
        assert batch.num_tokens == 64 and tuple(batch.q_index.shape) == (1, 64)
        with torch.inference_mode():
            out = padded.model(batch, padded.kv_caches)
        assert out.shape == ref.shape == (1, eager.model.cfg.vocab_size)
        assert (out - ref).abs().max().item() < 1e-5
        for (k0, v0), (k1, v1) in zip(_state(eager), _state(padded)):
            # fp32 GEMMs of 64 rows and of 24 block differently: 1e-7 apart, not bit-equal; a slot the padding
            # wrote instead of the scratch block would differ by O(1)
            assert (k0 - k1).abs().max() < 1e-5 and (v0 - v1).abs().max() < 1e-5
        pos += len(chunk)
