"""Runs the engine's step loop on one background thread and hands each request's deltas to asyncio.

HTTP handlers never touch the engine: they send commands (add, abort) through a queue and read
their request's outputs from an asyncio.Queue fed with call_soon_threadsafe. Tokenization runs on a
small thread pool, never on the step loop: a 20 MB prompt's tokenization took 28 s, and every other
request waited for it when it ran there.

Faults: a step that fails ends only the requests it held (each gets the error); the loop serves on. An
unrecoverable one (a rank died, a device error) or a crash of the loop itself ends every request with
the error, turns `failed` on (the server answers 503 from then on) and calls `on_fatal`.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from maverick.runtime.errors import EngineDead, StepError
from maverick.runtime.llm import LLM
from maverick.runtime.request import RequestOutput
from maverick.runtime.sampling_params import SamplingParams

from .metrics import ServerMetrics


SHUTTING_DOWN = "the server is shutting down"
ENDED_BY_SHUTDOWN = SHUTTING_DOWN + "; the request was ended before it finished"


class QueueFull(RuntimeError):
    pass


class Unavailable(RuntimeError):
    """The server takes no new requests (it is shutting down, or its engine failed)."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    start: float = field(default_factory=time.perf_counter)
    last: float | None = None
    queued: bool = True  # not yet in a step


class AsyncEngine:
    def __init__(self, llm: LLM, max_queue: int, on_fatal: Callable[[str], None] | None = None,
                 tokenizer_threads: int = 2):
        self.llm, self.engine, self.max_queue = llm, llm.engine, max_queue
        self.metrics = ServerMetrics()
        self.in_flight = 0  # requests submitted and not yet ended (the --max-queue limit)
        self.on_fatal = on_fatal
        self.failed: str | None = None  # why the engine can serve no more; None while healthy
        self.draining: str | None = None  # why new requests are refused (shutting down)
        self._cmds: queue.Queue = queue.Queue()
        self._sinks: dict[int, _Sink] = {}
        self._stop = threading.Event()
        self._count_lock = threading.Lock()
        self._tokenizer = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="maverick-tokenize")
        self._thread = threading.Thread(target=self._run, name="maverick-engine", daemon=True)
        self._thread.start()

    # ---- called from asyncio ------------------------------------------------------------------
    async def offload(self, fn, *args):
        """Run fn(*args) on the tokenizer threads (tokenization, chat templates: CPU work of any length)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer, fn, *args)

    async def submit(self, prompt, params: SamplingParams) -> tuple[int, asyncio.Queue]:
        """Queue a request; its outputs (RequestOutput deltas, or an Exception that ends it) arrive on the
        returned queue. Raises InvalidRequest, QueueFull or Unavailable."""
        self._check_available()
        with self._count_lock:  # reserve a slot now, so a burst cannot overshoot the limit
            if self.in_flight >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"server is at its limit of {self.max_queue} requests in flight; retry later")
            self.in_flight += 1
        try:
            encoded = await self.offload(self.engine.encode, prompt)  # raises InvalidRequest
            fut: Future = Future()
            sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
            with self._count_lock:  # the loop drains the queue after it stops (_run): no add is left unanswered
                self._check_available()
                self._cmds.put(("add", encoded, params, sink, fut))
            req_id = await asyncio.wrap_future(fut)  # raises InvalidRequest for a prompt the engine cannot hold
        except BaseException:
            self._release()
            raise
        return req_id, sink.queue

    def _check_available(self) -> None:
        if self.failed is not None:
            raise Unavailable(f"the engine failed and serves no more requests: {self.failed}")
        if self.draining is not None:
            raise Unavailable(self.draining)

    def _release(self) -> None:
        with self._count_lock:
            self.in_flight -= 1

    def abort(self, request_id: int) -> None:
        self._cmds.put(("abort", request_id))

    def drain(self, grace_s: float) -> None:
        """Refuse new requests now; end those still running after grace_s with a 'shutting down' error."""
        if self.draining is None:
            self.draining = SHUTTING_DOWN
            timer = threading.Timer(grace_s, lambda: self._cmds.put(("shutdown",)))
            timer.daemon = True
            timer.start()

    def stop(self) -> None:
        with self._count_lock:
            self.draining = self.draining or SHUTTING_DOWN
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout=30)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # ---- the engine thread ---------------------------------------------------------------------
    def _emit(self, req_id: int, out: RequestOutput) -> None:
        sink = self._sinks.get(req_id)
        if sink is None:
            return
        now = time.perf_counter()
        n = len(out.outputs[0].token_ids_diff)
        if n:
            if sink.last is None:
                self.metrics.ttft.observe(now - sink.start)
            else:
                self.metrics.itl.observe((now - sink.last) / n)
            sink.last = now
            self.metrics.generation_tokens.inc(n)
        if out.finished:  # counted out before the client hears the end, so a finished client sees its slot free
            self._sinks.pop(req_id, None)
            self._release()
        sink.loop.call_soon_threadsafe(sink.queue.put_nowait, out)

    def _emit_error(self, rid: int, err: Exception) -> None:
        sink = self._sinks.pop(rid, None)
        if sink is not None:
            self.metrics.failed.inc()
            self._release()
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, err)

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
            self.metrics.requests.inc()
            self.metrics.prompt_tokens.inc(len(req.prompt_token_ids))
            fut.set_result(req.request_id)
        elif cmd[0] == "abort":
            req = self.engine.requests.get(cmd[1])
            if req is not None and not req.finished:
                with self.llm._lock:
                    self.engine.abort(cmd[1])
                self.metrics.aborted.inc()
                self._emit(cmd[1], req.output(delta=True))
        elif cmd[0] == "shutdown":  # the drain's grace is over
            self._abort_all(Unavailable(ENDED_BY_SHUTDOWN))

    def _abort_all(self, err: Exception) -> None:
        for rid in list(self._sinks):
            req = self.engine.requests.get(rid)
            if req is not None and not req.finished:
                with self.llm._lock:
                    self.engine.abort(rid)
                self.metrics.aborted.inc()
            self._emit_error(rid, err)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug in the loop itself: fail loudly, never leave clients hanging
            self._die(f"the engine loop crashed: {type(e).__name__}: {e}")
        err = Unavailable(ENDED_BY_SHUTDOWN if self.failed is None else f"the engine failed: {self.failed}")
        if self.failed is None:  # shutting down: end whatever is still in flight
            self._abort_all(err)
        with self._count_lock:  # submit() puts only while available; both flags are set by now
            self.draining = self.draining or SHUTTING_DOWN
        while True:  # requests queued behind the end get the same answer, not a hang
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                cmd[4].set_exception(err)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:  # commands first; wait for one only while there is nothing to step
                idle = not self.engine.has_unfinished()
                self._handle(self._cmds.get(timeout=0.05) if idle else self._cmds.get_nowait())
                continue
            except queue.Empty:
                pass
            failure = self.llm.rank_failure()  # a rank that dies while idle is seen now, not at the next request
            if failure is not None:
                self._die(str(failure))
                return
            if not self.engine.has_unfinished():
                continue
            try:
                with self.llm._lock:
                    touched = self.llm.step()
            except StepError as e:  # only the step's own requests end; the rest are served on
                if e.fatal:  # unavailable before anyone hears of the failure
                    self._mark_failed(str(e))
                for req in e.requests:
                    self._emit_error(req.request_id, e)
                if e.fatal:
                    self._die(str(e))
                    return
                continue
            except EngineDead as e:
                self._die(str(e))
                return
            now = time.perf_counter()
            for req in touched:
                sink = self._sinks.get(req.request_id)
                if sink is not None and sink.queued:
                    sink.queued = False
                    self.metrics.queue_time.observe(now - sink.start)
                out = req.output(delta=True)
                if out.outputs[0].token_ids_diff or out.finished:
                    self._emit(req.request_id, out)

    def _mark_failed(self, reason: str) -> None:
        with self._count_lock:
            if self.failed is not None:
                return
            self.failed = reason
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _die(self, reason: str) -> None:
        """End every request with the failure (the engine can serve no more)."""
        self._mark_failed(reason)
        err = Unavailable(f"the engine failed: {self.failed}")
        for rid in list(self._sinks):
            self._emit_error(rid, err)
