"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/health, /metrics."""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from maverick.runtime.sampling_params import InvalidRequest

from .async_engine import AsyncEngine, QueueFull, Unavailable
from .protocol import CHAT_FIELDS, COMPLETION_FIELDS, APIError, sampling_params

FINISH = {"stop": "stop", "length": "length", "abort": "abort", None: None}


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="maverick-serve")
    llm = engine.llm
    max_seq_len = llm.cfg.build.max_seq_len

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got, f"Bearer {api_key}"):
                return JSONResponse(APIError(401, "missing or invalid API key", None, "authentication_error",
                                             "invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

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

    @app.get("/metrics")
    async def metrics():
        m, kv = engine.metrics, llm.kv_cache
        rows = [("maverick_requests_total", "counter", m.requests_total),
                ("maverick_requests_rejected_total", "counter", m.requests_rejected),
                ("maverick_requests_aborted_total", "counter", m.requests_aborted),
                ("maverick_prompt_tokens_total", "counter", m.prompt_tokens_total),
                ("maverick_generation_tokens_total", "counter", m.generation_tokens_total),
                ("maverick_time_to_first_token_seconds_sum", "counter", m.ttft_sum_s),
                ("maverick_time_to_first_token_seconds_count", "counter", m.ttft_count),
                ("maverick_inter_token_latency_seconds_sum", "counter", m.itl_sum_s),
                ("maverick_inter_token_latency_seconds_count", "counter", m.itl_count),
                ("maverick_requests_in_flight", "gauge", m.in_flight),
                ("maverick_queue_depth", "gauge", len(llm.engine.scheduler.waiting)),
                ("maverick_kv_blocks_in_use", "gauge", kv.blocks_in_use),
                ("maverick_kv_blocks_total", "gauge", kv.global_pool.num_blocks + kv.local_pool.num_blocks),
                ("process_resident_memory_bytes", "gauge", _rss_bytes())]
        text = "".join(f"# TYPE {n} {t}\n{n} {v}\n" for n, t, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def parse(request: Request, fields: set[str]) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise APIError(400, f"unknown field(s) {unknown}", unknown[0])
        if body.get("model") != model_name:
            raise APIError(404, f"model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                           "model", code="model_not_found")
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

    def failure(err: Exception) -> APIError:
        """The error that ended a request: the engine is gone or going (503), or its step failed (500)."""
        if isinstance(err, Unavailable):
            return APIError(503, str(err), None, "service_unavailable")
        return APIError(500, f"engine failed: {err}", None, "server_error")

    def usage(prompt_len: int, n: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    async def run(body: dict, prompt, chat: bool):
        params = sampling_params(body, chat, max_new_default=16 if not chat else max_seq_len)
        req_id, q = await start(prompt, params)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{req_id}-{secrets.token_hex(4)}"
        created = int(time.time())
        if not body.get("stream"):
            try:
                while True:
                    out = await q.get()
                    if isinstance(out, Exception):
                        raise failure(out)
                    if out.finished:
                        break
            except BaseException:
                engine.abort(req_id)
                raise
            c = out.outputs[0]
            lp = _logprobs(llm, c, chat, params.logprobs)
            choice = ({"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                       "finish_reason": FINISH[c.finish_reason]} if chat else
                      {"index": 0, "text": c.text, "logprobs": lp, "finish_reason": FINISH[c.finish_reason]})
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice],
                    "usage": usage(len(out.prompt_token_ids), len(c.token_ids))}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            first, n_tokens, prompt_len = True, 0, 0
            try:
                while True:
                    out = await q.get()
                    if isinstance(out, Exception):
                        e = failure(out)
                        yield _sse({"error": {**e.body()["error"], "code": e.status}})
                        break
                    c = out.outputs[0]
                    n_tokens, prompt_len = len(c.token_ids), len(out.prompt_token_ids)
                    fr = FINISH[c.finish_reason] if out.finished else None
                    if chat:
                        delta = {"content": c.text_diff}
                        if first:
                            delta["role"] = "assistant"
                        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fr}
                    else:
                        choice = {"index": 0, "text": c.text_diff, "logprobs": None, "finish_reason": fr}
                    first = False
                    yield _sse({"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                                "model": model_name, "choices": [choice]})
                    if out.finished:
                        break
                if include_usage:
                    yield _sse({"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                                "model": model_name, "choices": [], "usage": usage(prompt_len, n_tokens)})
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the request's KV blocks
                engine.abort(req_id)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            raise APIError(400, "'prompt' must be a string or a list of token ids", "prompt")
        if body.get("echo") or body.get("suffix") or body.get("best_of", 1) != 1:
            raise APIError(400, "echo, suffix and best_of are not supported", "echo")
        return await run(body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, CHAT_FIELDS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects with string content",
                           "messages")
        if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
            raise APIError(400, "this engine's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            ids = await engine.offload(_chat_ids, llm.tokenizer, messages)
        except UnicodeEncodeError as e:
            raise APIError(400, f"'messages': not valid Unicode text ({e.reason}); expected UTF-8-encodable text",
                           "messages") from None
        return await run(body, ids, chat=True)

    return app


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _logprobs(llm, c, chat: bool, n: int | None):
    if n is None or c.logprobs is None:
        return None
    tok = llm.tokenizer
    name = (lambda t: tok.decode([t])) if tok is not None else str
    if chat:
        return {"content": [{"token": name(t), "logprob": lp[t],
                             "top_logprobs": [{"token": name(k), "logprob": v} for k, v in list(lp.items())[:n]]}
                            for t, lp in zip(c.token_ids, c.logprobs)]}
    return {"tokens": [name(t) for t in c.token_ids], "token_logprobs": [lp[t] for t, lp in zip(c.token_ids, c.logprobs)],
            "top_logprobs": [{name(k): v for k, v in list(lp.items())[:max(n, 1)]} for lp in c.logprobs],
            "text_offset": None}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
