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
    # each option also under trtllm-serve's spelling
    p.add_argument("engine", help="engine directory, or a Hugging Face / ModelOpt checkpoint (built once into "
                                  "--engine-cache, then served)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--model-name", "--served_model_name", dest="model_name",
                   help="name clients use (default: the engine directory's name)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--tp-size", "--tp_size", dest="tp_size", type=int, help="must equal the engine's tp_size")
    p.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int,
                   help="at most the engine's")
    p.add_argument("--max-num-tokens", "--max_num_tokens", dest="max_num_tokens", type=int,
                   help="at most the engine's")
    p.add_argument("--extra-llm-api-options", "--extra_llm_api_options", dest="extra_llm_api_options",
                   help=f"YAML of LLM options ({', '.join(sorted(LLM_OPTIONS))})")
    p.add_argument("--config", help="engine config YAML used when a checkpoint is given (configs/*.yaml)")
    p.add_argument("--engine-cache", default=str(Path.home() / ".cache" / "maverick" / "engines"),
                   help="where engines built from checkpoints are kept")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (408 after)")
    p.add_argument("--stream-timeout", type=float, default=60.0,
                   help="seconds a stream's client may take to read a chunk (the request is ended after)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are ended")
    return p


# the LLM API options --extra_llm_api_options may set (TensorRT-LLM's names)
LLM_OPTIONS = {"max_batch_size", "max_num_tokens", "disable_overlap_scheduler", "cuda_graphs", "tp_size",
               "capacity_scheduler_policy", "kv_cache_config"}


def llm_options(a) -> dict:
    import yaml

    opts = {}
    if a.extra_llm_api_options:
        path = Path(a.extra_llm_api_options)
        try:
            opts = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--extra_llm_api_options {path}: {e}") from None
        if not isinstance(opts, dict):
            raise ValueError(f"--extra_llm_api_options {path}: expected a mapping of LLM options")
        unknown = sorted(set(opts) - LLM_OPTIONS)
        if unknown:
            raise ValueError(f"--extra_llm_api_options {path}: unknown option(s) {unknown}; expected some of "
                             f"{sorted(LLM_OPTIONS)}")
    for key in ("tp_size", "max_batch_size", "max_num_tokens"):  # flags win over the file
        if getattr(a, key) is not None:
            opts[key] = getattr(a, key)
    return opts


def engine_for(path: Path, config: str | None, cache: Path) -> Path:
    """`path` if it is an engine; a checkpoint is built (once per checkpoint and config) into the cache."""
    import hashlib
    import json

    from maverick.builder.engine_format import is_engine_dir

    if is_engine_dir(path):
        return path
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: neither an engine nor a Hugging Face checkpoint (no config.json)")
    from maverick.builder.builder import build_engine
    from maverick.builder.yaml_config import build_config_from

    build = build_config_from(config, {})
    stamp = {"checkpoint": str(path.resolve()), "mtime": (path / "config.json").stat().st_mtime,
             "build": build.to_dict()}
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    out = cache / f"{path.resolve().name}-{key}"
    if not is_engine_dir(out):
        print(f"building an engine from {path} into {out}", file=sys.stderr)
        build_engine(path, out, build, overwrite=True)
    return out


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
    err = _check(a)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import socket

    # bind before loading: a busy port is found in a second, not after the whole load
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))
    except OSError as e:
        print(f"error: cannot listen on {a.host}:{a.port}: {e.strerror}", file=sys.stderr)
        return 2
    from maverick import LLM
    from maverick.builder.engine_format import EngineError
    from maverick.checkpoint import CheckpointError
    from maverick.config import ConfigError

    from .app import ServeLimits, create_app
    from .async_engine import AsyncEngine

    try:
        opts = llm_options(a)
        engine_dir = engine_for(Path(a.engine), a.config, Path(a.engine_cache))
        llm = LLM(engine_dir, device=a.device, **opts)
    except (EngineError, ConfigError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:  # the engine cannot serve: end the process non-zero (a supervisor restarts it)
        print(f"error: {reason}; shutting down", file=sys.stderr)
        fatal.append(reason)
        server.should_exit = True

    engine = AsyncEngine(llm, a.max_queue, on_fatal=on_fatal)
    limits = ServeLimits(a.max_request_bytes, a.request_timeout, a.stream_timeout)
    name = a.model_name or Path(a.engine).resolve().name
    app = create_app(engine, name, a.api_key, limits)
    # uvicorn waits this long for connections to close; the engine ends what still runs a little before, so
    # every stream gets its error event and [DONE] instead of a cut connection
    config = uvicorn.Config(app, log_level="info", access_log=True, timeout_graceful_shutdown=a.shutdown_grace + 5,
                            lifespan="off")
    server = _Server(config)
    server.on_signal = lambda: engine.drain(a.shutdown_grace)
    print(f"serving {name} on http://{a.host}:{a.port}", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        llm.shutdown()
    return 1 if fatal else 0
