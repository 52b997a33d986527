"""The overlap scheduler queues decode step n+1 (its tokens fed from step n's samples on the device)
before it reads step n's tokens. It must not change a single token, logprob or finish reason."""
import pytest
import torch

from helpers import make_ckpt, prompt_ids, runner_for
from maverick.runtime.engine import EngineCore
from maverick.runtime.sampling_params import SamplingParams


def _run(path, overlap: bool, late_arrival: bool = True):
    runner = runner_for(path, max_batch_size=4)
    engine = EngineCore(runner, None, max_batch_size=4, max_num_tokens=64, overlap=overlap)
    params = [SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=4, logprobs=2),
              SamplingParams(max_tokens=9, temperature=1.2, min_p=0.05, seed=5, ignore_eos=True)]
    reqs = [engine.add_request(prompt_ids(n, seed=i), p) for i, (n, p) in enumerate(zip((17, 5, 30), params))]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if late_arrival and steps == 6:  # admitted mid-generation: the overlap must step aside for its prefill
            reqs.append(engine.add_request(prompt_ids(11, seed=9), SamplingParams(max_tokens=8, temperature=0.0)))
    assert runner.kv.all_free
    return [(r.output_token_ids, r.output_logprobs, r.finish_reason) for r in reqs], engine


def test_overlap_changes_no_token(tmp_path):
    path = make_ckpt(tmp_path, "default")
    sync, e_sync = _run(path, overlap=False)
    over, e_over = _run(path, overlap=True)
    assert e_sync.overlapped == 0 and e_over.overlapped > 10
    assert [(t, f) for t, _, f in over] == [(t, f) for t, _, f in sync]
    # logprobs: the same entries; values to float rounding (the late arrival joins one step later with
    # overlap, so one step's batch has another shape: 1e-6 on CPU)
    for (_, lp_o, _), (_, lp_s, _) in zip(over, sync):
        assert [list(d) for d in lp_o] == [list(d) for d in lp_s]
        assert all(abs(d[k] - e[k]) < 1e-4 for d, e in zip(lp_o, lp_s) for k in d)


def test_overlap_drops_the_row_of_a_request_that_stopped(tmp_path):
    """A stop token ends a request while its next step is already queued: that step's row is computed
    and dropped, the output is the synchronous one, and no KV block leaks."""
    path = make_ckpt(tmp_path, "default")
    runner = runner_for(path)
    ids = prompt_ids(20, seed=8)
    full = EngineCore(runner, None, 4, 64, overlap=False)
    r = full.add_request(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    while full.has_unfinished():
        full.step()
    stop = r.output_token_ids[4]
    engine = EngineCore(runner, None, 4, 64, overlap=True)
    r2 = engine.add_request(ids, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop]))
    other = engine.add_request(prompt_ids(9, seed=1), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        touched = engine.step()
        assert len(set(map(id, touched))) == len(touched)
    assert r2.output_token_ids == r.output_token_ids[: r.output_token_ids.index(stop) + 1]
    assert r2.finish_reason == "stop" and len(other.output_token_ids) == 12
    assert engine.overlapped > 5 and runner.kv.all_free


def test_abort_while_a_step_is_queued(tmp_path):
    runner = runner_for(make_ckpt(tmp_path, "default"))
    engine = EngineCore(runner, None, 4, 64, overlap=True)
    r = engine.add_request(prompt_ids(10, seed=2), SamplingParams(max_tokens=30, temperature=0.0))
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None
    engine.abort(r.request_id)
    n = len(r.output_token_ids)
    while engine.has_unfinished():
        assert engine.step() == []  # the queued step's row belongs to an aborted request: dropped
    assert len(r.output_token_ids) == n and r.finish_reason == "abort" and runner.kv.all_free


def test_feed_takes_the_previous_tokens_on_the_device():
    from maverick.runtime.staging import take_fed_tokens

    ids = torch.tensor([5, 6, 7, 8])
    take_fed_tokens(ids, torch.tensor([-1, 2, -1, 0]), torch.tensor([40, 41, 42]))
    assert ids.tolist() == [5, 42, 7, 40]


def test_kv_can_grow_all_counts_the_sequences_together():
    """The overlap scheduler queues the next step only if every request's next token fits at once: one
    free block each is not enough when two sequences each need one and a single block is left."""
    from maverick.runtime.kv_cache import KVCacheManager, OutOfBlocks

    kv = KVCacheManager(num_global_blocks=3, num_local_blocks=3, block_size=4, chunk_size=8)
    kv.grow(0, 4)
    kv.grow(1, 4)  # one global and one local block each; one of each left
    assert kv.can_grow(0, 5) and kv.can_grow(1, 5)
    assert not kv.can_grow_all({0: 5, 1: 5}) and kv.can_grow_all({0: 5, 1: 4})
    kv.grow(0, 5)
    with pytest.raises(OutOfBlocks, match="sequence 1 needs 1 global"):
        kv.grow(1, 5)
