"""The server under faults inside the engine: a failing step ends only its own requests, a fatal one turns
the server unavailable (503 everywhere, /health included) instead of hanging anyone."""
import asyncio
import json
import os
import time
from pathlib import Path

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
        assert engine.failed is None and engine.in_flight == 0 and fresh_llm.kv_cache.all_free
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
        assert engine.failed is None and engine.in_flight == 0
    finally:
        engine.stop()


def test_submit_after_stop_is_refused_not_hung(fresh_llm):
    engine = AsyncEngine(fresh_llm, max_queue=8)
    engine.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        asyncio.run(asyncio.wait_for(engine.submit([1, 2, 3], SamplingParams(max_tokens=2)), 10))


@pytest.mark.slow
def test_rank_killed_while_serving_ends_streams_and_exits_nonzero(tiny_engine_tp2):
    """TP2 server, a rank killed mid-stream: the stream ends with an error event and [DONE], the process exits 1
    (a supervisor restarts it) with no rank left behind."""
    import signal as sig

    from test_server import Server

    s = Server(tiny_engine_tp2)
    try:
        rank_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                     and _parent(p) == s.proc.pid and b"rank_main" in _cmd(p)]
        assert len(rank_pids) == 1
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(rank_pids[0], sig.SIGKILL)
            t0 = time.monotonic()
            rest = [ln for ln in lines if ln]
        assert time.monotonic() - t0 < 10
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["code"] in (500, 503) and "rank 1 exited with signal SIGKILL" in err["message"]
        assert s.proc.wait(timeout=30) == 1
    finally:
        s.stop()


def _parent(p) -> int:
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return -1


def _cmd(p) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""
