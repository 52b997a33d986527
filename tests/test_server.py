"""maverick-serve against the official openai client, bad input, a bounded load test, API key, SIGTERM."""
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from maverick import SamplingParams
from maverick.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"


class Server:
    def __init__(self, engine, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "maverick.serve", str(engine), "--port", str(self.port),
                                      "--device", "cpu", "--model-name", MODEL, *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in 90 s")

    def metrics(self, headers=None) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=headers).text
        return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = Server(tiny_engine, "--max-queue", "100")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_stream_equals_non_stream_equals_llm(client, llm):
    prompt = "The harbor was quiet"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True))
    ref = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0)).outputs[0]
    assert full.choices[0].text == streamed == ref.text
    assert full.usage.completion_tokens == len(ref.token_ids)
    assert full.choices[0].finish_reason == ref.finish_reason


def test_chat_stream_equals_non_stream_equals_llm(client, llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    ids = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    ref = llm.generate(list(ids), SamplingParams(max_tokens=16, temperature=0)).outputs[0]
    assert full.choices[0].message.content == streamed == ref.text
    assert full.choices[0].message.role == "assistant"


def test_logprobs_and_seed(client):
    r = client.completions.create(model=MODEL, prompt="Light travels", max_tokens=4, temperature=0, logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == 4
    a = client.completions.create(model=MODEL, prompt="Light", max_tokens=8, temperature=1.0, seed=5).choices[0].text
    b = client.completions.create(model=MODEL, prompt="Light", max_tokens=8, temperature=1.0, seed=5).choices[0].text
    assert a == b


@pytest.mark.parametrize("body,status,param", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "word " * 400}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    # numbers past what the engine holds are refused before they reach a step (they once stopped the engine)
    ({"model": MODEL, "prompt": "x", "seed": 2 ** 64, "temperature": 1}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "seed": -1}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "temperature": 10 ** 400}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_k": -(2 ** 63) - 1}, 400, "top_k"),
    ({"model": MODEL, "prompt": [1, 2 ** 63]}, 400, "prompt"),
])
def test_bad_completion_requests(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_int64_edge_values_are_served_and_the_server_lives_on(server, stream):
    """seed 2**63 (a valid 64-bit seed) and top_k 2**63 (beyond the vocabulary: off) once overflowed int64
    inside the step and stopped the engine for every later request."""
    for extra in ({"seed": 2 ** 63}, {"seed": 2 ** 64 - 1}, {"top_k": 2 ** 63}):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "temperature": 1.0, "stream": stream, **extra}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert ("data: [DONE]" in r.text) if stream else r.json()["usage"]["completion_tokens"] == 3
    # max_tokens past any context: generation stops at max_seq_len or an end token
    r = httpx.post(server.url + "/v1/completions", timeout=30, json={"model": MODEL, "prompt": "x", "max_tokens": 2 ** 64})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    # seeds that differ only above bit 31 sample differently (the noise mixes all 64 bits)
    texts = {httpx.post(server.url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "x", "max_tokens": 8, "temperature": 1.0, "seed": s}).json()["choices"][0]["text"]
        for s in (5, 5 + 2 ** 40, 5 + 2 ** 63)}
    assert len(texts) == 3
    assert httpx.get(server.url + "/health").status_code == 200


def test_malformed_json_and_bad_messages(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/health").status_code == 200  # still alive


async def _stream(c: httpx.AsyncClient, url: str, prompt: str, cancel_after: int | None) -> str | None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True}
    text, n = "", 0
    async with c.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            n += 1
            if cancel_after is not None and n >= cancel_after:
                return None  # leaving the context manager closes the connection mid-stream
    return text


def test_load_64_streams_with_cancellations(server, llm):
    prompts = ["The harbor was quiet", "Memory bandwidth", "A cache stores", "The train left"]
    expected = {p: llm.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)).outputs[0].text
                for p in prompts}
    rss0 = server.metrics()["process_resident_memory_bytes"]

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            jobs = [_stream(c, server.url, prompts[i % 4], 3 if i % 5 == 0 else None) for i in range(64)]
            return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), timeout=240)

    t0 = time.time()
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    done = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
    cancelled = sum(r is None for r in results)
    assert not errors, errors[:3]
    assert cancelled == 13 and len(done) == 51
    assert all(r == expected[prompts[i % 4]] for i, r in done)
    deadline = time.time() + 10
    while time.time() < deadline:  # aborts reach the engine thread asynchronously
        m = server.metrics()
        if m["maverick_kv_blocks_in_use"] == 0 and m["maverick_requests_in_flight"] == 0:
            break
        time.sleep(0.1)
    assert m["maverick_kv_blocks_in_use"] == 0, "KV blocks leaked"
    assert m["maverick_requests_in_flight"] == 0
    assert m["maverick_requests_aborted_total"] >= 13
    assert m["process_resident_memory_bytes"] < rss0 + 300e6
    print(f"load: 64 streams ({len(done)} completed, {cancelled} cancelled, {len(errors)} errors) in "
          f"{time.time() - t0:.1f} s; KV blocks in use after: {m['maverick_kv_blocks_in_use']:.0f}; "
          f"RSS {rss0 / 1e6:.0f} -> {m['process_resident_memory_bytes'] / 1e6:.0f} MB")


def test_full_queue_gets_429(tiny_engine):
    s = Server(tiny_engine, "--max-queue", "2")
    try:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                body = {"model": MODEL, "prompt": "The harbor", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(*[c.post(s.url + "/v1/completions", json=body) for _ in range(8)])

        replies = asyncio.run(main())
        codes = [r.status_code for r in replies]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert all(r.headers.get("retry-after") == "1" for r in replies if r.status_code == 429)
    finally:
        s.stop()


def test_api_key_and_sigterm(tiny_engine):
    s = Server(tiny_engine, "--api-key", "sekret")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        # SIGTERM with a request in flight: the server finishes or aborts it and exits cleanly
        body = {"model": MODEL, "prompt": "The harbor", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer sekret"}) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert s.proc.wait(timeout=60) == 0
        assert rest[-2:] == ["data: [DONE]", ""] or rest[-1:] == ["data: [DONE]"]
    finally:
        s.stop()


def test_hostile_bodies_get_4xx_and_the_server_lives_on(server):
    url = server.url + "/v1/completions"
    # a lone surrogate: valid JSON, no UTF-8 form, so it cannot be tokenized
    for raw in (b'{"model": "tiny", "prompt": "abc \\ud800 def"}',
                b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'):
        path = "/v1/completions" if b"prompt" in raw else "/v1/chat/completions"
        r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"], r.text
    r = httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(6):
            yield b"a" * (1 << 20)

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "unknown role 'wizard'" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "x"})
    assert r.status_code == 404 and "None" not in r.json()["error"]["message"]
    assert httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_slow_body_times_out(tiny_engine):
    import socket

    s = Server(tiny_engine, "--request-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\"")
            t0 = time.time()
            reply = c.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and time.time() - t0 < 5, reply
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_api_key_edge_cases(tiny_engine):
    r = subprocess.run([sys.executable, "-m", "maverick.serve", str(tiny_engine), "--api-key", ""], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key is empty" in r.stderr
    s = Server(tiny_engine, "--api-key", "clé-secrète")
    try:
        for value in ("Bearer clé-secrète".encode("latin-1"), b"Bearer \xff\xfe", "Bearer ключ".encode()):
            r = httpx.get(s.url + "/v1/models", headers=[(b"authorization", value)])
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", value
        ok = httpx.get(s.url + "/v1/models", headers=[(b"authorization", "Bearer clé-secrète".encode())])
        assert ok.status_code == 200
    finally:
        s.stop()


def test_sigterm_ends_long_streams_with_an_error_event_and_done(tiny_engine):
    # a grace far shorter than the 240 tokens take on a CPU (0.5 s once let a fast run finish them all)
    s = Server(tiny_engine, "--shutdown-grace", "0.1")
    try:
        body = {"model": MODEL, "prompt": "The harbor", "max_tokens": 240, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)  # uvicorn stops listening at once; open streams drain
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert "shutting down" in err["message"] and err["code"] == 503
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_stalled_stream_reader_is_ended():
    """A client that stops reading: the stream's send waits at most send_timeout_s, then the generator is
    closed (its `finally` aborts the request)."""
    from maverick.serve.guard import TimedStreamingResponse

    closed = []

    async def gen():
        try:
            while True:
                yield "data: x\n\n"
        finally:
            closed.append(True)

    async def main():
        sent = []

        async def send(msg):
            sent.append(msg)
            if len(sent) > 3:
                await asyncio.sleep(3600)  # the client's window is full

        t0 = time.monotonic()
        await TimedStreamingResponse(gen(), 0.2, media_type="text/event-stream").stream_response(send)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 5 and closed == [True]


def test_metrics_are_valid_prometheus(server):
    from prometheus_client.parser import text_string_to_metric_families

    httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "The harbor", "max_tokens": 4})
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("maverick_time_to_first_token_seconds", "maverick_inter_token_latency_seconds",
                 "maverick_queue_time_seconds"):
        assert families[name].type == "histogram", name
        count = next(s.value for s in families[name].samples if s.name == name + "_count")
        assert count >= 1, name
    for name in ("maverick_requests", "maverick_prompt_tokens", "maverick_generation_tokens",
                 "maverick_requests_aborted", "maverick_requests_rejected", "maverick_requests_failed"):
        assert families[name].type == "counter", name
    for name in ("maverick_kv_blocks_in_use", "maverick_kv_blocks_free", "maverick_requests_running",
                 "maverick_requests_waiting", "maverick_requests_in_flight", "process_resident_memory_bytes"):
        assert families[name].type == "gauge", name
    for name in families:  # every family is documented
        assert f"# HELP {name}" in text and f"# TYPE {name}" in text, name
