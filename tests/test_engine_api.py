"""Engine build -> LLM API: parity with transformers, in-flight batching, sampling, stops, errors."""
import json
import shutil

import pytest
import torch

from helpers import hf_model, prompt_ids
from maverick import LLM, SamplingParams
from maverick.builder.engine_format import EngineError
from maverick.runtime.sampling_params import InvalidRequest

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _hf_greedy(ckpt, ids, n):
    with torch.no_grad():
        return hf_model(ckpt).generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()


def test_engine_greedy_equals_transformers(llm, tiny_ckpt):
    ids = prompt_ids(40, seed=3)
    out = llm.generate(ids, SamplingParams(max_tokens=24, **GREEDY))
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == _hf_greedy(tiny_ckpt, ids, 24)
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.slow
def test_engine_tp2_greedy_equals_transformers(tiny_engine_tp2, tiny_ckpt):
    ids = prompt_ids(40, seed=3)
    with LLM(tiny_engine_tp2, device="cpu") as llm2:
        out = llm2.generate([ids, prompt_ids(9, seed=4)], SamplingParams(max_tokens=16, **GREEDY))
        assert llm2.kv_cache.all_free
    assert out[0].outputs[0].token_ids == _hf_greedy(tiny_ckpt, ids, 16)
    assert out[1].outputs[0].token_ids == _hf_greedy(tiny_ckpt, prompt_ids(9, seed=4), 16)


def test_inflight_batching_with_chunked_prefill_equals_alone(tiny_engine):
    prompts = [prompt_ids(n, seed=20 + n) for n in (3, 50, 17, 33, 8, 61)]
    params = SamplingParams(max_tokens=12, **GREEDY)
    with LLM(tiny_engine, device="cpu") as llm:
        alone = [llm.generate(p, params).outputs[0].token_ids for p in prompts]
        sched = llm.engine.scheduler
        sched.max_num_tokens, sched.max_batch_size = 7, 3  # forces chunked prefill and queueing
        together = llm.generate(prompts, params)
        assert llm.kv_cache.all_free
    assert [o.outputs[0].token_ids for o in together] == alone


def test_preemption_under_kv_pressure_keeps_results(tiny_ckpt, engine_root):
    """A pool too small for all requests at once: the newest are preempted and recomputed."""
    from conftest import _build

    eng = _build(tiny_ckpt, engine_root / "small")
    prompts = [prompt_ids(30, seed=40 + i) for i in range(4)]
    params = SamplingParams(max_tokens=40, **GREEDY)
    with LLM(eng, device="cpu") as llm:
        alone = [llm.generate(p, params).outputs[0].token_ids for p in prompts]
        from maverick.runtime.kv_cache import BlockAllocator

        kv = llm.kv_cache
        kv.global_pool = BlockAllocator(20)  # 160 tokens of global KV for 4 x 70 tokens
        together = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions > 0
        assert kv.all_free
    assert [o.outputs[0].token_ids for o in together] == alone


def test_guaranteed_no_evict_never_preempts(tiny_ckpt, engine_root):
    """GUARANTEED_NO_EVICT (TensorRT-LLM's policy): in the pool that forces preemptions above, requests are
    admitted only while all can run to max_tokens, so none is preempted and the results are the same."""
    from conftest import _build

    from maverick.runtime.kv_cache import BlockAllocator

    eng = _build(tiny_ckpt, engine_root / "small")
    prompts = [prompt_ids(30, seed=40 + i) for i in range(4)]
    params = SamplingParams(max_tokens=40, **GREEDY)
    with LLM(eng, device="cpu", capacity_scheduler_policy="GUARANTEED_NO_EVICT") as llm:
        alone = [llm.generate(p, params).outputs[0].token_ids for p in prompts]
        llm.kv_cache.global_pool = BlockAllocator(20)  # 160 tokens: two requests' worst case (70 tokens) at once
        most = 0

        def step():
            nonlocal most
            out = real()
            most = max(most, len(llm.engine.scheduler.running))
            return out

        real, llm.engine.step = llm.engine.step, step
        together = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions == 0 and most == 2
        assert llm.kv_cache.all_free
    assert [o.outputs[0].token_ids for o in together] == alone
    with pytest.raises(ValueError, match="capacity_scheduler_policy='SOMETIMES': expected one of"):
        LLM(eng, device="cpu", capacity_scheduler_policy="SOMETIMES")


def test_seeded_sampling(llm):
    ids = prompt_ids(12, seed=5)

    def run(seed, **kw):
        return llm.generate(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True, **kw)).outputs[0].token_ids

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    greedy = llm.generate(ids, SamplingParams(max_tokens=16, **GREEDY)).outputs[0].token_ids
    assert run(7, top_k=1) == greedy
    assert run(3, top_p=1e-6) == greedy  # only the most likely token survives
    assert run(3, min_p=1.0) == greedy
    # batch composition does not change a seeded request's tokens
    outs = llm.generate([ids, prompt_ids(5, seed=6)],
                        [SamplingParams(max_tokens=16, temperature=1.0, seed=1, ignore_eos=True),
                         SamplingParams(max_tokens=3, temperature=0.5, seed=9)])
    assert outs[0].outputs[0].token_ids == a


def test_top_k_restricts_support():
    from maverick.layers.sampler import SamplingTensors, sample

    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(400, 1)
    n = 400
    t = SamplingTensors(torch.ones(n), torch.full((n,), 3), torch.ones(n), torch.zeros(n),
                        torch.arange(n), torch.zeros(n, dtype=torch.long))
    toks = sample(logits, t)
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(toks.tolist()) == top3  # all three appear over 400 seeds, nothing else
    # frequencies follow the renormalised softmax
    p = torch.softmax(logits[0], -1)[list(top3)]
    p = p / p.sum()
    freq = torch.tensor([(toks == i).float().mean().item() for i in top3])
    assert (freq - p).abs().max() < 0.08


def test_stop_token_and_stop_string(llm):
    ids = prompt_ids(20, seed=8)
    full = llm.generate(ids, SamplingParams(max_tokens=20, **GREEDY)).outputs[0]
    stop_tok = full.token_ids[5]
    out = llm.generate(ids, SamplingParams(max_tokens=20, stop_token_ids=[stop_tok], **GREEDY)).outputs[0]
    first = full.token_ids.index(stop_tok)
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = llm.generate(ids, SamplingParams(max_tokens=20, stop=[stop], **GREEDY)).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]


def test_eos_ends_generation(llm):
    ids = prompt_ids(20, seed=8)
    full = llm.generate(ids, SamplingParams(max_tokens=20, **GREEDY)).outputs[0].token_ids
    saved = llm.engine.eos_ids
    llm.engine.eos_ids = frozenset({full[3]})  # pretend the 4th greedy token is the model's EOS
    try:
        out = llm.generate(ids, SamplingParams(max_tokens=20, temperature=0.0)).outputs[0]
        ignored = llm.generate(ids, SamplingParams(max_tokens=20, **GREEDY)).outputs[0]
    finally:
        llm.engine.eos_ids = saved
    assert out.token_ids == full[: full.index(full[3]) + 1] and out.finish_reason == "stop"
    assert ignored.token_ids == full and ignored.finish_reason == "length"


def test_streaming_and_abort(llm):
    ids = prompt_ids(15, seed=9)
    params = SamplingParams(max_tokens=20, **GREEDY)
    full = llm.generate(ids, params).outputs[0]
    pieces, texts = [], []
    for out in llm.generate_async(ids, params, streaming=True):
        pieces += out.outputs[0].token_ids_diff
        texts.append(out.outputs[0].text_diff)
    assert pieces == full.token_ids and "".join(texts) == full.text
    stream = llm.generate_async(ids, params, streaming=True)
    it = iter(stream)
    next(it)
    next(it)
    assert not llm.kv_cache.all_free
    stream.close()  # client went away: abort frees every block
    assert llm.kv_cache.all_free and stream.done()


def test_generate_single_and_list_and_future(llm, tiny_engine, tmp_path):
    """TensorRT-LLM's semantics: one prompt -> one RequestOutput, a list -> a list; generate_async is
    future-like (result(), done()) and iterable, sync and async; streams carry no empty text deltas."""
    import asyncio

    from maverick.runtime.request import RequestOutput

    params = SamplingParams(max_tokens=12, **GREEDY)
    one = llm.generate("The harbor was", params)
    assert isinstance(one, RequestOutput)
    assert isinstance(llm.generate([1, 2, 3], params), RequestOutput)  # token ids are one prompt
    many = llm.generate(["The harbor was", [1, 2, 3]], params)
    assert isinstance(many, list) and len(many) == 2 and many[0].outputs[0].token_ids == one.outputs[0].token_ids
    fut = llm.generate_async("The harbor was", params)
    assert not fut.done()
    res = fut.result()
    assert fut.done() and res.finished and res.outputs[0].token_ids == one.outputs[0].token_ids
    assert [o.finished for o in llm.generate_async("The harbor was", params)] == [True]  # not streaming: the end
    deltas = list(llm.generate_async("The harbor was", SamplingParams(max_tokens=40, **GREEDY), streaming=True))
    assert all(d.outputs[0].text_diff for d in deltas[:-1]) and deltas[-1].finished

    async def collect():
        return [d async for d in llm.generate_async("The harbor was", params, streaming=True)]

    got = asyncio.run(collect())
    assert "".join(d.outputs[0].text_diff for d in got) == one.outputs[0].text
    assert asyncio.run(llm.generate_async([4, 5], params).aresult()).finished
    (tmp_path / "f").write_text("x")
    with pytest.raises(EngineError, match="is a file, not an engine directory"):
        LLM(tmp_path / "f", device="cpu")


@pytest.mark.parametrize("sampling", [GREEDY, dict(temperature=1.0, seed=3)])
def test_logprobs(llm, sampling):
    """Values, not just lengths: each entry equals log_softmax of the model's logits at that position (the
    model's distribution, whatever the sampling), the sampled token first, then the top 3 in order."""
    from maverick.evaluate import engine_logits

    ids = prompt_ids(10, seed=10)
    out = llm.generate(ids, SamplingParams(max_tokens=5, logprobs=3, **sampling)).outputs[0]
    assert len(out.logprobs) == 5
    ref = engine_logits(llm, [ids + out.token_ids])[0].log_softmax(-1)[len(ids) - 1:-1]
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        entries = list(lp.items())
        assert entries[0][0] == tok and abs(entries[0][1] - ref[i, tok].item()) < 1e-4
        top_v, top_i = ref[i].topk(3)
        want = {int(t): v for t, v in zip(top_i.tolist(), top_v.tolist())}
        assert set(want) <= set(lp) and all(abs(lp[t] - v) < 1e-4 for t, v in want.items())
        assert len(lp) == 3 + (tok not in want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(min_p=2.0), "min_p=2.0"),
    (dict(logprobs=100), "logprobs=100"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        SamplingParams(**kwargs)


def test_invalid_prompts(llm):
    with pytest.raises(InvalidRequest, match="max_seq_len is 256"):
        llm.generate(prompt_ids(300), SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequest, match="empty"):
        llm.generate([""], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequest, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequest, match=r"token id 9999 out of range; expected ids in \[0, 512\)"):
        llm.generate([[1, 9999]], SamplingParams(max_tokens=1))


def test_length_limit_at_max_seq_len(llm):
    out = llm.generate(prompt_ids(250), SamplingParams(max_tokens=100, **GREEDY)).outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_corrupted_engine_file(tiny_engine, tmp_path):
    bad = tmp_path / "e"
    shutil.copytree(tiny_engine, bad)
    data = bytearray((bad / "rank0.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "rank0.safetensors").write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"rank0\.safetensors: hash .* corrupted or truncated"):
        LLM(bad, device="cpu")


def test_truncated_and_foreign_engines(tiny_engine, tiny_ckpt, tmp_path):
    bad = tmp_path / "e"
    shutil.copytree(tiny_engine, bad)
    p = bad / "rank0.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(EngineError, match="corrupted or truncated"):
        LLM(bad, device="cpu")
    with pytest.raises(EngineError, match="not a maverick engine"):
        LLM(tiny_ckpt, device="cpu")  # a checkpoint is not an engine
    with pytest.raises(EngineError, match="does not exist"):
        LLM(tmp_path / "nowhere", device="cpu")


def test_mismatched_tensor_is_named(tiny_engine, tmp_path):
    """A rank file whose tensors do not match the config fails before loading, naming the tensor."""
    from safetensors.torch import load_file, save_file

    from maverick.builder.engine_format import config_checksum, sha256_file

    bad = tmp_path / "e"
    shutil.copytree(tiny_engine, bad)
    t = load_file(bad / "rank0.safetensors")
    t["layers.0.self_attn.o_proj.weight"] = t["layers.0.self_attn.o_proj.weight"][:, :32].contiguous()
    save_file(t, bad / "rank0.safetensors")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["files"]["rank0.safetensors"] = sha256_file(bad / "rank0.safetensors")
    cfg["config_sha256"] = config_checksum({k: v for k, v in cfg.items() if k != "config_sha256"})
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match=r"'layers\.0\.self_attn\.o_proj\.weight' is F32\[64, 32\], expected F32\[64, 64\]"):
        LLM(bad, device="cpu")


def test_engine_for_other_tp_size(tiny_engine):
    with pytest.raises(EngineError, match="built for tp_size=1, but tp_size=2 was requested"):
        LLM(tiny_engine, device="cpu", tp_size=2)
