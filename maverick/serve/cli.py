"""maverick-serve ENGINE_DIR: an OpenAI-compatible server (python -m maverick.serve)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would end by
    the signal; this one ends with status 0 once in-flight requests are finished or aborted."""

    @contextlib.contextmanager
    def capture_signals(self):
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maverick-serve", description=__doc__)
    p.add_argument("engine", help="engine directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--model-name", help="name clients use (default: the engine directory's name)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from maverick import LLM
    from maverick.build.engine_format import EngineError

    from .app import create_app
    from .async_engine import AsyncEngine

    if a.max_queue < 1:
        print(f"error: --max-queue={a.max_queue}: expected >= 1", file=sys.stderr)
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
    app = create_app(engine, a.model_name or Path(a.engine).resolve().name, a.api_key)

    @app.on_event("shutdown")
    def _shutdown() -> None:  # uvicorn stops accepting on SIGTERM, drains, then calls this
        engine.stop()
        llm.shutdown()

    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=30)
    server = _Server(config)
    server.run()
    return 1 if fatal else 0

