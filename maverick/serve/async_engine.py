"""Runs the engine's step loop on one background thread and hands each request's deltas to asyncio.

HTTP handlers never touch the engine: they send commands (add, abort) through a queue and read
their request's outputs from an asyncio.Queue fed with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from maverick.runtime.llm import LLM
from maverick.runtime.request import RequestOutput
from maverick.runtime.sampling_params import SamplingParams


class QueueFull(RuntimeError):
    pass


@dataclass
class Metrics:
    requests_total: int = 0
    requests_rejected: int = 0
    requests_aborted: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    itl_sum_s: float = 0.0
    itl_count: int = 0
    in_flight: int = 0


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    start: float = field(default_factory=time.perf_counter)
    last: float | None = None


class AsyncEngine:
    def __init__(self, llm: LLM, max_queue: int):
        self.llm, self.engine, self.max_queue = llm, llm.engine, max_queue
        self.metrics = Metrics()
        self._cmds: queue.Queue = queue.Queue()
        self._sinks: dict[int, _Sink] = {}
        self._stop = threading.Event()
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="maverick-engine", daemon=True)
        self._thread.start()

    # ---- called from asyncio ------------------------------------------------------------------
    async def submit(self, prompt, params: SamplingParams) -> tuple[int, asyncio.Queue]:
        with self._count_lock:  # reserve a slot now, so a burst cannot overshoot the limit
            if self.metrics.in_flight >= self.max_queue:
                self.metrics.requests_rejected += 1
                raise QueueFull(f"server is at its limit of {self.max_queue} requests in flight; retry later")
            self.metrics.in_flight += 1
        loop = asyncio.get_running_loop()
        fut: Future = Future()
        sink = _Sink(loop, asyncio.Queue())
        self._cmds.put(("add", prompt, params, sink, fut))
        try:
            req_id = await asyncio.wrap_future(fut)  # raises InvalidRequest for a bad prompt
        except BaseException:
            self._release()
            raise
        return req_id, sink.queue

    def _release(self) -> None:
        with self._count_lock:
            self.metrics.in_flight -= 1

    def abort(self, request_id: int) -> None:
        self._cmds.put(("abort", request_id))

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------------------
    def _emit(self, req_id: int, out: RequestOutput) -> None:
        sink = self._sinks.get(req_id)
        if sink is None:
            return
        now = time.perf_counter()
        n = len(out.outputs[0].token_ids_diff)
        if n:
            if sink.last is None:
                self.metrics.ttft_sum_s += now - sink.start
                self.metrics.ttft_count += 1
            else:
                self.metrics.itl_sum_s += now - sink.last
                self.metrics.itl_count += n
            sink.last = now
            self.metrics.generation_tokens_total += n
        sink.loop.call_soon_threadsafe(sink.queue.put_nowait, out)
        if out.finished:
            self._sinks.pop(req_id, None)
            self._release()

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, prompt, params, sink, fut = cmd
            try:
                with self.llm._lock:
                    req = self.engine.add_request(prompt, params)
            except Exception as e:
                fut.set_exception(e)
                return
            self._sinks[req.request_id] = sink
            self.metrics.requests_total += 1
            self.metrics.prompt_tokens_total += len(req.prompt_token_ids)
            fut.set_result(req.request_id)
        elif cmd[0] == "abort":
            req = self.engine.requests.get(cmd[1])
            if req is not None and not req.finished:
                with self.llm._lock:
                    self.engine.abort(cmd[1])
                self.metrics.requests_aborted += 1
                self._emit(cmd[1], req.output(delta=True))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # commands first; wait for one only while there is nothing to step
                idle = not self.engine.has_unfinished()
                self._handle(self._cmds.get(timeout=0.05) if idle else self._cmds.get_nowait())
                continue
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                with self.llm._lock:
                    touched = self.engine.step()
            except Exception as e:  # the engine is broken: fail every waiting client, then stop
                for rid in list(self._sinks):
                    self._emit_error(rid, e)
                self._stop.set()
                return
            for req in touched:
                out = req.output(delta=True)
                if out.outputs[0].token_ids_diff or out.finished:
                    self._emit(req.request_id, out)
        # shutting down: abort whatever is still in flight
        for rid in list(self._sinks):
            req = self.engine.requests.get(rid)
            if req is not None:
                with self.llm._lock:
                    self.engine.abort(rid)
                self._emit(rid, req.output(delta=True))

    def _emit_error(self, rid: int, err: Exception) -> None:
        sink = self._sinks.pop(rid, None)
        if sink is not None:
            self._release()
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, err)
