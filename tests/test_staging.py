"""One-copy transfer of a step's inputs and the host-side sampling rows (CPU)."""
import pytest
import torch

from helpers import make_ckpt, prompt_ids, runner_for
from maverick.layers.sampler import sample
from maverick.runtime.step import StepSeq
from maverick.layers.sampler import SamplingRows
from maverick.runtime.staging import Staged, to_device


def test_staged_views_round_trip():
    s = Staged({"a": (2, 3), "b": (4,)}, torch.int64, "cpu")
    s.write("a", torch.arange(6).view(2, 3))
    s.write("b", [9, 8, 7, 6])
    s.upload()
    assert torch.equal(s.views["a"], torch.arange(6).view(2, 3))
    assert s.views["b"].tolist() == [9, 8, 7, 6]
    with pytest.raises(ValueError, match=r"b: got shape \(3,\), expected \(4,\)"):
        s.write("b", [1, 2, 3])


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_staged_views_start_on_16_byte_boundaries(dtype):
    """Triton compiles a kernel again for each new combination of 16-byte-aligned pointer arguments: views of
    odd sizes packed end to end would make the alignment depend on the batch's shape."""
    s = Staged({"a": (3,), "b": (1, 5), "c": (7,), "d": (0,), "e": (2,)}, dtype, "cpu")
    for name, v in s.views.items():
        assert v.data_ptr() % 16 == 0, name
        assert s._host_views[name].data_ptr() % 16 == 0, name
    s.write("c", torch.arange(7).to(dtype))
    s.write("e", [4, 5])
    s.upload()
    assert s.views["c"].tolist() == list(range(7)) and s.views["e"].tolist() == [4, 5]


@pytest.mark.gpu
def test_to_device_views_start_on_16_byte_boundaries():
    out = to_device({"x": torch.arange(3), "y": torch.arange(5).view(1, 5), "z": torch.arange(2)}, "cuda")
    assert all(t.data_ptr() % 16 == 0 for t in out.values())
    assert out["y"].tolist() == [[0, 1, 2, 3, 4]] and out["z"].tolist() == [0, 1]


def test_to_device_keeps_names_and_shapes():
    out = to_device({"x": torch.ones(2, 2, dtype=torch.long), "y": torch.zeros(3, dtype=torch.long)}, "cpu")
    assert out["x"].shape == (2, 2) and out["y"].shape == (3,)


def test_rows_padding_and_greedy():
    rows = SamplingRows([0.7, 0.0], [0, 0], [0.9, 1.0], [0.0, 0.0], [5, 6], [1, 2])
    assert not rows.greedy and SamplingRows([0.7], [1], [1.0], [0.0], [5], [0]).greedy  # top_k 1 is greedy
    p = rows.padded(4)
    assert len(p) == 4 and p.temperature[2:] == [0.0, 0.0] and p.top_p[2:] == [1.0, 1.0]
    t = rows.to_tensors("cpu")
    assert t.top_k.dtype == torch.int64 and t.temperature.dtype == torch.float32
    assert t.seeds.tolist() == [5, 6]


def test_runner_step_samples_like_sample(tmp_path):
    """runner.step gives the logits of forward and the tokens sample() draws from them; a count of
    rows that does not match the logits is a clear error."""
    runner = runner_for(make_ckpt(tmp_path, "default"))
    ids = [prompt_ids(12, seed=1), prompt_ids(5, seed=2)]
    seqs = [StepSeq(i, p, 0, runner.kv.grow(i, len(p))) for i, p in enumerate(ids)]
    rows = SamplingRows([0.8, 0.0], [20, 0], [0.95, 1.0], [0.0, 0.0], [3, 4], [0, 0])
    logits, tokens, _ = runner.step(seqs, rows)
    assert torch.equal(tokens, sample(logits, rows.to_tensors("cpu")))
    assert tokens[1] == logits[1].argmax()
    seqs = [StepSeq(i, [9], len(p), runner.kv.grow(i, len(p) + 1)) for i, p in enumerate(ids)]
    with pytest.raises(ValueError, match="sampling rows: got 1, expected one per logits row"):
        runner.step(seqs, SamplingRows([0.0], [0], [1.0], [0.0], [0], [0]))


def test_request_token_slices():
    from maverick.runtime.request import Request
    from maverick.runtime.sampling_params import SamplingParams

    r = Request(0, None, [1, 2, 3], SamplingParams(), 0, output_token_ids=[4, 5])
    for a in range(6):
        for b in range(a, 7):
            assert r.token_ids(a, b) == r.all_token_ids[a:b], (a, b)


def test_warmup_leaves_the_cache_as_it_was(tmp_path):
    """The startup warm-up (two throwaway prefills) returns every KV block and changes no later result."""
    runner = runner_for(make_ckpt(tmp_path, "default"), max_seq_len=64)
    ids = prompt_ids(9, seed=3)
    before = runner.forward([StepSeq(0, ids, 0, runner.kv.grow(0, len(ids)))])
    runner.kv.free(0)
    runner.warmup(max_num_tokens=8192)  # clipped to max_seq_len - 1
    assert runner.kv.all_free
    after = runner.forward([StepSeq(0, ids, 0, runner.kv.grow(0, len(ids)))])
    runner.kv.free(0)
    assert torch.equal(before, after)


def test_batch_built_in_place_in_the_staging_buffer_equals_the_copied_one():
    """build_forward_batch filling a graph's staging arrays (host_arrays) gives the batch it builds alone,
    padding included (logits rows padded with zeros); the later write copies nothing; a buffer of another
    shape is refused with the field's name."""
    from maverick.layers.forward_batch import ForwardBatch
    from maverick.runtime.batch import build_forward_batch
    from maverick.runtime.kv_cache import SeqBlocks

    seqs = [StepSeq(0, [7, 8, 9], 21, SeqBlocks([3, 1, 4, 0], [2, 5]), num_logits=3),
            StepSeq(1, [6], 5, SeqBlocks([6], [7]))]
    pad = dict(pad_batch=4, pad_q=3, pad_tokens=12, pad_global_blocks=6, pad_local_blocks=2)
    want = build_forward_batch(seqs, 8, 16, 999, 888, **pad).pad_logits(12)
    staged = Staged({k: tuple(t.shape) for k, t in want.tensors().items()}, torch.int64, "cpu")
    for _ in range(2):  # the second build overwrites the first in place
        got = build_forward_batch(seqs, 8, 16, 999, 888, out=staged.host_arrays(), **pad)
    for k, t in want.tensors().items():
        assert torch.equal(getattr(got, k), t), k
        staged.write(k, getattr(got, k))  # the same memory: nothing to copy
    staged.upload()
    assert all(torch.equal(staged.views[k], t) for k, t in want.tensors().items())
    small = Staged({**{k: tuple(t.shape) for k, t in want.tensors().items()}, "q_index": (4, 2)}, torch.int64, "cpu")
    with pytest.raises(ValueError, match=r"q_index: the step needs shape \(4, 3\), the buffer has \(4, 2\)"):
        build_forward_batch(seqs, 8, 16, 999, 888, out=small.host_arrays(), **pad)
    assert set(ForwardBatch.__dataclass_fields__) == set(want.tensors())
