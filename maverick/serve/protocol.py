"""OpenAI request fields -> SamplingParams, and OpenAI-style error bodies."""
from __future__ import annotations

from typing import Any

from maverick.runtime.sampling_params import InvalidRequest, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_COMMON = {"model", "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed", "n", "stream",
           "stream_options", "logprobs", "user", "frequency_penalty", "presence_penalty", "ignore_eos"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "top_logprobs", "max_completion_tokens", "response_format"}


def _num(body: dict, key: str, kind, default):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise APIError(400, f"'{key}' must be an integer, got {v!r}", key)
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise APIError(400, f"'{key}' must be a number, got {v!r}", key)
    return v


def sampling_params(body: dict, chat: bool, max_new_default: int) -> SamplingParams:
    if _num(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    for k in ("frequency_penalty", "presence_penalty"):
        if _num(body, k, float, 0.0) != 0:
            raise APIError(400, f"'{k}' is not supported (only 0)", k)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise APIError(400, "'logprobs' must be a boolean for chat completions", "logprobs")
        top = _num(body, "top_logprobs", int, 0)
        logprobs = top if lp else None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        logprobs = _num(body, "logprobs", int, None)
        max_tokens, max_key = body.get("max_tokens"), "max_tokens"
    max_tokens = _num({max_key: max_tokens}, max_key, int, max_new_default)
    fields = dict(max_tokens=max_tokens, temperature=_num(body, "temperature", float, 1.0),
                  top_p=_num(body, "top_p", float, 1.0), top_k=_num(body, "top_k", int, 0),
                  min_p=_num(body, "min_p", float, 0.0), seed=_num(body, "seed", int, None), stop=stop,
                  logprobs=logprobs, ignore_eos=bool(body.get("ignore_eos", False)))
    try:
        return SamplingParams(**fields)
    except InvalidRequest as e:
        param = str(e).split("=", 1)[0]
        raise APIError(400, str(e), "max_tokens" if param == "max_tokens" and max_key == "max_tokens" else
                       (max_key if param == "max_tokens" else param)) from None
