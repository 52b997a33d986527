"""The local processes of ranks 1..N-1, as LLM starts them (mpirun starts its own).

Each rank is a fresh interpreter running `python -m maverick.runtime.rank_main`: nothing of the caller's
`__main__` is re-imported (multiprocessing's spawn did, so scripts on stdin, `python -c`, notebooks and
unguarded scripts lost their ranks at bootstrap). A rank's output goes to a log file whose last line
names its error; a rank dies with its parent (PR_SET_PDEATHSIG), so none is ever left behind.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import RankFailure


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class RankProcesses:
    def __init__(self, world: int, engine_dir: str, device_kind: str, backend: str, init_method: str,
                 timeout_s: float, cuda_graphs: bool, kv_cache_config: dict | None = None):
        self.logs = [Path(tempfile.mkstemp(prefix=f"maverick-rank{r}-", suffix=".log")[1]) for r in range(1, world)]
        self.procs: list[subprocess.Popen] = []
        for r, log in zip(range(1, world), self.logs):
            cmd = [sys.executable, "-m", "maverick.runtime.rank_main", "--rank", str(r), "--world", str(world),
                   "--engine", engine_dir, "--device", device_kind, "--backend", backend, "--init", init_method,
                   "--timeout", str(timeout_s), "--kv-cache-config", json.dumps(kv_cache_config or {})]
            cmd += [] if cuda_graphs else ["--no-cuda-graphs"]
            with open(log, "wb") as f:
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                                   preexec_fn=_die_with_parent))

    def dead(self) -> list[int]:
        """Ranks (1..N-1) whose process has exited."""
        return [r for r, p in enumerate(self.procs, 1) if p.poll() is not None]

    def failure(self, wait_s: float = 0.0) -> RankFailure | None:
        """A RankFailure naming every dead rank, its exit status and last error line; None while all live.
        wait_s: how long to wait for a rank that is on its way out (a broken collective is seen first)."""
        deadline = time.monotonic() + wait_s
        while not self.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = self.dead()
        if not dead:
            return None
        return RankFailure("; ".join(f"rank {r} exited with {_status(self.procs[r - 1].returncode)}"
                                     f"{_last_line(self.logs[r - 1])}" for r in dead))

    def stop(self, timeout_s: float = 10.0) -> None:
        """End every rank (TERM, then KILL) and wait for each; remove the logs."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.unlink(missing_ok=True)

    def wait(self, timeout_s: float) -> bool:
        """Wait for every rank to exit on its own; True if they all did."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    lines = [ln for ln in lines if "%|" not in ln]  # progress bars are not errors
    return f": {lines[-1].strip()}" if lines else ""


def run_in_thread_watching(fn, ranks: RankProcesses, what: str, poll_s: float = 0.1):
    """fn() on a helper thread while the ranks are watched: a rank that dies meanwhile raises its RankFailure
    at once instead of leaving this rank in fn (a group that never forms waits for its timeout)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"maverick-{what}", daemon=True)
    t.start()
    while t.is_alive():
        t.join(poll_s)
        failure = ranks.failure() if t.is_alive() else None
        if failure is not None:
            raise RankFailure(f"{what}: {failure}")
    if "error" in box:
        raise box["error"]
    return box.get("value")

