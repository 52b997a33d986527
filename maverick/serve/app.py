"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/health, /metrics."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from maverick.runtime.sampling_params import InvalidRequest

from .async_engine import AsyncEngine, QueueFull, Unavailable
from .guard import Guard, TimedStreamingResponse
from .openai_format import (CHAT_SCHEMA, COMPLETION_SCHEMA, chat_messages, choice, completion_prompts,
                            logprobs_body, parse_json, request_body, sse, usage)
from .protocol import CHAT_FIELDS, COMPLETION_FIELDS, APIError, sampling_params


@dataclass(frozen=True)
class ServeLimits:
    max_request_bytes: int = 4 << 20  # a 4 MB prompt is some million tokens: past any max_seq_len
    body_timeout_s: float = 30.0  # a request body must arrive within this
    send_timeout_s: float = 60.0  # a stream's client must take each chunk within this


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
               limits: ServeLimits = ServeLimits()) -> Guard:
    """The ASGI app: the API behind the guard (API key, request size, body and send deadlines)."""
    app = FastAPI(title="maverick-serve")
    llm = engine.llm
    max_seq_len = llm.cfg.build.max_seq_len

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.get("/health")
    async def health():
        why = engine.failed or engine.draining
        if why is not None:
            return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "maverick", "max_model_len": max_seq_len}]}

    engine.metrics.gauges(_gauges(engine))

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def parse(request: Request, fields: set[str]) -> dict:
        body = parse_json(await request.body())
        unknown = sorted(set(body) - fields)
        if unknown:
            raise APIError(400, f"unknown field(s) {unknown}", unknown[0])
        if body.get("model") != model_name:
            got = "no model" if body.get("model") is None else f"model {body.get('model')!r}"
            raise APIError(404, f"{got} given; this server serves {model_name!r}", "model", code="model_not_found")
        return body

    async def start(prompt, params):
        try:
            return await engine.submit(prompt, params)
        except InvalidRequest as e:
            raise APIError(400, str(e), "prompt") from None
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_error") from None
        except Unavailable as e:
            raise APIError(503, str(e), None, "service_unavailable") from None

    async def run(body: dict, prompts: list, chat: bool):
        """One request of the API: every prompt submitted (one choice each, by index); a JSON body, or SSE."""
        params = sampling_params(body, chat, max_new_default=16 if not chat else max_seq_len)
        started = []
        try:
            for p in prompts:
                started.append(await start(p, params))
        except BaseException:
            for req_id, _ in started:
                engine.abort(req_id)
            raise
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{started[0][0]}-{secrets.token_hex(4)}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
            return TimedStreamingResponse(_events(engine, started, chat, chunk, include_usage),
                                          limits.send_timeout_s, media_type="text/event-stream")
        outs = []
        try:
            for req_id, q in started:
                while True:
                    out = await q.get()
                    if isinstance(out, Exception) or out.finished:
                        break
                if isinstance(out, Exception):
                    raise _failure(out)
                outs.append(out)
        finally:  # the client went away, or one prompt failed: free every request's KV blocks
            for req_id, _ in started:
                engine.abort(req_id)
        choices = [choice(chat, o.outputs[0].text, o.outputs[0].finish_reason,
                          logprobs_body(llm.tokenizer, o.outputs[0], chat, params.logprobs), index=i)
                   for i, o in enumerate(outs)]
        return {**head, "choices": choices, "usage": usage(sum(len(o.prompt_token_ids) for o in outs),
                                                           sum(len(o.outputs[0].token_ids) for o in outs))}

    @app.post("/v1/completions", openapi_extra=request_body(COMPLETION_SCHEMA))
    async def completions(request: Request):
        body = await parse(request, COMPLETION_FIELDS)
        return await run(body, completion_prompts(body), chat=False)

    @app.post("/v1/chat/completions", openapi_extra=request_body(CHAT_SCHEMA))
    async def chat_completions(request: Request):
        body = await parse(request, CHAT_FIELDS)
        messages = chat_messages(body)
        if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
            raise APIError(400, "this engine's tokenizer has no chat template; use /v1/completions", "messages")
        ids = await engine.offload(_chat_ids, llm.tokenizer, messages)
        return await run(body, [ids], chat=True)

    return Guard(app, api_key, limits.max_request_bytes, limits.body_timeout_s)


async def _events(engine: AsyncEngine, started: list, chat: bool, chunk: dict, include_usage: bool):
    """SSE chunks of a request's prompts, interleaved as they come (each choice by its index): deltas, then
    usage (if asked), then [DONE]; an error that ends a prompt is one error event before [DONE]. Closing the
    generator (client gone, stalled) aborts every prompt."""
    import asyncio

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, q):
        while True:
            out = await q.get()
            await merged.put((i, out))
            if isinstance(out, Exception) or out.finished:
                return

    pumps = [asyncio.ensure_future(pump(i, q)) for i, (_, q) in enumerate(started)]
    first = [True] * len(started)
    tokens = [(0, 0)] * len(started)  # (prompt, completion) tokens per choice
    try:
        done = 0
        while done < len(started):
            i, out = await merged.get()
            if isinstance(out, Exception):
                e = _failure(out)
                yield sse({"error": {**e.body()["error"], "code": e.status}})
                break
            c = out.outputs[0]
            tokens[i] = (len(out.prompt_token_ids), len(c.token_ids))
            if c.text_diff or out.finished:
                yield sse({**chunk, "choices": [choice(chat, c.text_diff, c.finish_reason if out.finished else None,
                                                       None, delta=True, first=first[i], index=i)]})
                first[i] = False
            done += out.finished
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(sum(p for p, _ in tokens), sum(n for _, n in tokens))})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): free the requests' KV blocks
        for p in pumps:
            p.cancel()
        for req_id, _ in started:
            engine.abort(req_id)


def _failure(err: Exception) -> APIError:
    """The error that ended a request: the engine is gone or going (503), or its step failed (500)."""
    if isinstance(err, Unavailable):
        return APIError(503, str(err), None, "service_unavailable")
    return APIError(500, f"engine failed: {err}", None, "server_error")


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _gauges(engine: AsyncEngine) -> dict:
    llm = engine.llm
    kv, sched = llm.kv_cache, llm.engine.scheduler
    total = kv.global_pool.num_blocks + kv.local_pool.num_blocks
    spec = llm.engine.spec_stats
    speculative = {  # with a draft (vLLM's spec_decode counters): acceptance length = 1 + accepted / rounds
        "maverick_spec_decode_rounds": ("Speculative verify rounds", lambda: spec.rounds),
        "maverick_spec_decode_draft_tokens": ("Draft tokens proposed", lambda: spec.proposed),
        "maverick_spec_decode_accepted_tokens": ("Draft tokens accepted", lambda: spec.accepted),
    } if llm.engine.spec_k else {}
    return speculative | {"maverick_requests_in_flight": ("Requests submitted and not yet ended", lambda: engine.in_flight),
            "maverick_requests_running": ("Requests the scheduler is running", lambda: len(sched.running)),
            "maverick_requests_waiting": ("Requests waiting to be scheduled", lambda: len(sched.waiting)),
            "maverick_kv_blocks_in_use": ("KV cache blocks in use", lambda: kv.blocks_in_use),
            "maverick_kv_blocks_free": ("KV cache blocks free", lambda: total - kv.blocks_in_use),
            "maverick_engine_healthy": ("1 while the engine serves, 0 once it failed",
                                        lambda: int(engine.failed is None))}
