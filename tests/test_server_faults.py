"""The server under faults inside the engine: a failing step ends only its own requests, a fatal one turns
the server unavailable (503 everywhere, /health included) instead of hanging anyone."""
import asyncio
import json
import time

import httpx
import pytest

from maverick import LLM, SamplingParams
from maverick.runtime.errors import RankFailure, StepError
from maverick.serve.app import create_app
from maverick.serve.async_engine import AsyncEngine, Unavailable

MODEL = "tiny"


class FaultyStep:
    """Wraps a ModelRunner's step: raises `error` once the step holds a sequence of `prompt_len` tokens."""

    def __init__(self, runner, prompt_len: int, error: Exception):
        self.step, self.prompt_len, self.error = runner.step, prompt_len, error
        runner.step = self

    def __call__(self, plan, rows, feed=None):
        if any(s.start == 0 and len(s.tokens) == self.prompt_len for s in plan):
            raise self.error
        return self.step(plan, rows, feed)


@pytest.fixture
def fresh_llm(tiny_engine):
    with LLM(tiny_engine, device="cpu") as m:
        yield m


def test_failing_step_ends_only_its_requests_and_the_engine_serves_on(fresh_llm):
    FaultyStep(fresh_llm.engine.runner, 7, ValueError("injected"))
    with pytest.raises(StepError, match="injected") as e:
        fresh_llm.generate([list(range(10, 17))], SamplingParams(max_tokens=4))
    assert not e.value.fatal and [r.finish_reason for r in e.value.requests] == ["error"]
    assert fresh_llm.kv_cache.all_free and not fresh_llm.engine.requests
    out = fresh_llm.generate([list(range(10, 15))], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


async def _collect(engine: AsyncEngine, prompt, params) -> list:
    rid, q = await engine.submit(prompt, params)
    outs = []
    while True:
        out = await asyncio.wait_for(q.get(), 30)
        outs.append(out)
        if isinstance(out, Exception) or out.finished:
            return outs


def test_async_engine_survives_a_failing_step(fresh_llm):
    FaultyStep(fresh_llm.engine.runner, 7, ValueError("injected"))
    engine = AsyncEngine(fresh_llm, max_queue=8)
    try:
        async def main():
            ok = [_collect(engine, list(range(20, 25 + i)), SamplingParams(max_tokens=6, temperature=0)) for i in range(3)]
            bad = _collect(engine, list(range(10, 17)), SamplingParams(max_tokens=6))
            return await asyncio.gather(bad, *ok)

        bad, *ok = asyncio.run(main())
        assert isinstance(bad[-1], StepError) and "injected" in str(bad[-1])
        # the requests that shared a step with the failing one end with the error too; none hangs, none is lost
        assert all(isinstance(o[-1], StepError) or o[-1].finished for o in ok)
        again = asyncio.run(_collect(engine, list(range(30, 36)), SamplingParams(max_tokens=5, temperature=0)))
        assert again[-1].finished and len(again[-1].outputs[0].token_ids) == 5
        assert engine.failed is None and engine.metrics.in_flight == 0 and fresh_llm.kv_cache.all_free
    finally:
        engine.stop()


def _app_client(llm, on_fatal=None):
    engine = AsyncEngine(llm, max_queue=8, on_fatal=on_fatal)
    app = create_app(engine, MODEL)
    return engine, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def test_fatal_step_error_makes_the_server_unavailable_not_hung(fresh_llm):
    FaultyStep(fresh_llm.engine.runner, 7, RankFailure("rank 1 exited with code -9"))
    fatal = []
    engine, client = _app_client(fresh_llm, fatal.append)
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    try:
        async def main():
            async with client:
                assert (await client.get("/health")).status_code == 200
                t0 = time.monotonic()
                r = await client.post("/v1/completions", json={**body, "prompt": list(range(10, 17))})
                assert r.status_code == 500 and "rank 1 exited" in r.json()["error"]["message"]
                assert time.monotonic() - t0 < 10
                h = await client.get("/health")
                assert h.status_code == 503 and "rank 1 exited" in h.json()["reason"]
                r = await client.post("/v1/completions", json={**body, "prompt": [1, 2, 3]})
                assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
                async with client.stream("POST", "/v1/completions",
                                         json={**body, "prompt": [1, 2], "stream": True}) as s:
                    assert s.status_code == 503

        asyncio.run(main())
        assert fatal and "rank 1 exited" in fatal[0]
        assert fresh_llm.kv_cache.all_free
    finally:
        engine.stop()


def test_stream_gets_error_event_then_done_when_its_step_fails(fresh_llm):
    FaultyStep(fresh_llm.engine.runner, 7, ValueError("injected"))
    engine, client = _app_client(fresh_llm)
    try:
        async def main():
            async with client, client.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": list(range(10, 17)), "max_tokens": 4, "stream": True}) as s:
                return [ln async for ln in s.aiter_lines() if ln]

        lines = asyncio.run(main())
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert "injected" in err["message"] and err["type"] == "server_error"
        assert engine.failed is None and engine.metrics.in_flight == 0
    finally:
        engine.stop()


def test_submit_after_stop_is_refused_not_hung(fresh_llm):
    engine = AsyncEngine(fresh_llm, max_queue=8)
    engine.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        asyncio.run(asyncio.wait_for(engine.submit([1, 2, 3], SamplingParams(max_tokens=2)), 10))
