"""maverick-serve ENGINE_DIR: an OpenAI-compatible server (python -m maverick.serve).

Faults: a failed step ends only its own requests; when the engine cannot go on (a rank died, a device
error) /health and every request answer 503 and the process exits with status 1, for a supervisor to
restart it. SIGTERM/SIGINT: new requests get 503, running ones get --shutdown-grace seconds to finish,
then end with an error event (streams: then [DONE]); the process exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would end by
    the signal; this one ends with status 0 once in-flight requests are finished or ended, and tells the
    engine to drain first."""

    on_signal = None

    @contextlib.contextmanager
    def capture_signals(self):
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.on_signal is not None:
            self.on_signal()
        super().handle_exit(sig, frame)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maverick-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="engine directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--model-name", help="name clients use (default: the engine directory's name)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (408 after)")
    p.add_argument("--stream-timeout", type=float, default=60.0,
                   help="seconds a stream's client may take to read a chunk (the request is ended after)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are ended")
    return p


def _check(a) -> str | None:
    if a.api_key is not None and not a.api_key.strip():
        return "--api-key is empty: give a key, or leave the option out to serve without one"
    for name in ("max_queue", "max_request_bytes"):
        if getattr(a, name) < 1:
            return f"--{name.replace('_', '-')}={getattr(a, name)}: expected >= 1"
    for name in ("request_timeout", "stream_timeout", "shutdown_grace"):
        if not getattr(a, name) > 0:
            return f"--{name.replace('_', '-')}={getattr(a, name)}: expected seconds > 0"
    return None


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from maverick import LLM
    from maverick.build.engine_format import EngineError

    from .app import ServeLimits, create_app
    from .async_engine import AsyncEngine

    err = _check(a)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        llm = LLM(a.engine, device=a.device)
    except (EngineError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:  # the engine cannot serve: end the process non-zero (a supervisor restarts it)
        print(f"error: {reason}; shutting down", file=sys.stderr)
        fatal.append(reason)
        server.should_exit = True

    engine = AsyncEngine(llm, a.max_queue, on_fatal=on_fatal)
    limits = ServeLimits(a.max_request_bytes, a.request_timeout, a.stream_timeout)
    app = create_app(engine, a.model_name or Path(a.engine).resolve().name, a.api_key, limits)
    # uvicorn waits this long for connections to close; the engine ends what still runs a little before, so
    # every stream gets its error event and [DONE] instead of a cut connection
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                            timeout_graceful_shutdown=a.shutdown_grace + 5, lifespan="off")
    server = _Server(config)
    server.on_signal = lambda: engine.drain(a.shutdown_grace)
    try:
        server.run()
    finally:
        engine.stop()
        llm.shutdown()
    return 1 if fatal else 0
