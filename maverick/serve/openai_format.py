"""OpenAI request bodies in, OpenAI response bodies and stream chunks out (no engine, no HTTP)."""
from __future__ import annotations

import json
from typing import Any

from .protocol import APIError

FINISH = {"stop": "stop", "length": "length", "abort": "abort", None: None}
ROLES = {"system", "user", "assistant", "developer", "tool"}


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object; 400 for anything else: invalid JSON, nesting deeper than the parser
    can follow, text that is not valid Unicode (a lone surrogate cannot be tokenized)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"request body holds text that is not valid Unicode ({e.reason}: "
                            f"{e.object[e.start:e.end]!r}); expected UTF-8-encodable strings") from None
    return body


def _is_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def completion_prompts(body: dict) -> list:
    """The prompts of a completion request: a string or token ids, or a list of either (a batch: one choice
    each, in order)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either",
                       "prompt")
    if body.get("echo") or body.get("suffix") or body.get("best_of", 1) != 1:
        raise APIError(400, "echo, suffix and best_of are not supported", "echo")
    return prompts


def chat_messages(body: dict) -> list[dict]:
    """messages with string content (OpenAI's list of text parts joined); 400 for anything else."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    bad = sorted({m["role"] for m in messages} - ROLES)
    if bad:
        raise APIError(400, f"'messages': unknown role {bad[0]!r}; expected one of {sorted(ROLES)}", "messages")
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, "'messages': content parts must be {\"type\": \"text\", \"text\": ...} "
                                    "(this model reads text only)", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, "'messages': content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "'response_format': only {\"type\": \"text\"} is supported", "response_format")
    return out


def usage(prompt_len: int, n: int) -> dict:
    return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}


def choice(chat: bool, text: str, finish_reason: str | None, logprobs, delta: bool = False, first: bool = False,
           index: int = 0) -> dict:
    fr = FINISH[finish_reason]
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": fr}
    if delta:
        d = {"content": text, **({"role": "assistant"} if first else {})}
        return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": fr}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": fr}


def logprobs_body(tokenizer, c, chat: bool, n: int | None):
    if n is None or c.logprobs is None:
        return None
    name = (lambda t: tokenizer.decode([t])) if tokenizer is not None else str
    if chat:
        return {"content": [{"token": name(t), "logprob": lp[t],
                             "top_logprobs": [{"token": name(k), "logprob": v} for k, v in list(lp.items())[:n]]}
                            for t, lp in zip(c.token_ids, c.logprobs)]}
    return {"tokens": [name(t) for t in c.token_ids], "token_logprobs": [lp[t] for t, lp in zip(c.token_ids, c.logprobs)],
            "top_logprobs": [{name(k): v for k, v in list(lp.items())[:max(n, 1)]} for lp in c.logprobs],
            "text_offset": None}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# The request bodies as JSON schemas, for the OpenAPI document (/openapi.json) that clients and fuzzers read;
# the handlers validate every field themselves (parse_json, sampling_params) with messages naming it.
_SAMPLING = {
    "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0}, "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0}, "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0}, "n": {"type": "integer", "enum": [1]},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "stream": {"type": "boolean"}, "ignore_eos": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
COMPLETION_SCHEMA = {"type": "object", "required": ["model", "prompt"], "properties": {
    **_SAMPLING, "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0}},
                         {"type": "array", "minItems": 1, "items": {"anyOf": [
                             {"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0}}]}}]}}}
CHAT_SCHEMA = {"type": "object", "required": ["model", "messages"], "properties": {
    **_SAMPLING, "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "response_format": {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}}},
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
                 "properties": {"role": {"type": "string", "enum": sorted(ROLES)}, "content": {"anyOf": [
                     {"type": "string"}, {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                      "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]}}}}}}


def request_body(schema: dict) -> dict:
    """FastAPI's openapi_extra for a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
