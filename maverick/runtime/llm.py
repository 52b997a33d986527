"""The Python API: `LLM(engine_dir).generate(prompts, SamplingParams(...))` (TensorRT-LLM / vLLM style)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import torch

from maverick import distributed as dist
from maverick import envs

from .engine import EngineCore
from .engine_loader import open_engine
from .errors import RankFailure, StepError
from .kv_budget import KvCacheConfig
from .request import RequestOutput
from .sampling_params import SamplingParams
from .ranks import RankProcesses, run_in_thread_watching
from .scheduler import POLICIES
from .worker import STOP, build_runner, join_group, serve_steps


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                        and all(isinstance(t, int) for t in prompts))


class GenerationResult:
    """One request of LLM.generate_async: future-like (`result()`, `done()`) and iterable, sync or async."""

    def __init__(self, llm: "LLM", request, streaming: bool):
        self._llm, self._req, self.streaming = llm, request, streaming
        self.request_id = request.request_id

    def done(self) -> bool:
        return self._req.finished

    def result(self) -> RequestOutput:
        """Run the engine until this request finishes; its complete RequestOutput."""
        try:
            while not self._req.finished:
                with self._llm._lock:
                    if not self._req.finished:
                        self._llm._step()
        except BaseException:
            self.close()
            raise
        return self._req.output()

    def _next(self) -> RequestOutput | None:
        """Step until there is something new to show (never an empty text delta), or None once delivered."""
        req = self._req
        text = self._llm.tokenizer is not None
        with self._llm._lock:
            while not req.finished and not (self.streaming and req.has_delta(text)):
                self._llm._step()
            if req.delivered:
                return None
            req.delivered = req.finished
            return req.output(delta=self.streaming)  # not streaming: only the finished whole

    def __iter__(self):
        try:
            while (out := self._next()) is not None:
                yield out
        finally:
            self.close()

    async def __aiter__(self):
        import asyncio

        try:
            while (out := await asyncio.to_thread(self._next)) is not None:
                yield out
        finally:
            self.close()

    async def aresult(self) -> RequestOutput:
        import asyncio

        return await asyncio.to_thread(self.result)

    def close(self) -> None:
        """Abort the request if it is still running (frees its KV blocks)."""
        if not self._req.finished:
            with self._llm._lock:
                self._llm.engine.abort(self._req.request_id)


class LLM:
    """Load an engine and generate.

    Parameters
    ----------
    engine_dir : str or Path
        A directory written by build_engine.py.
    device : {"cuda", "cpu"}, optional
        Default: cuda when available.
    tp_size : int, optional
        Must equal the engine's tp_size when given. With tp_size > 1 the ranks are started here
        (local processes), or taken from mpirun when launched under it.
    verify : bool
        Check every engine file's sha256 before loading (default True).
    cuda_graphs : bool
        Capture decode steps as CUDA graphs on GPU (default True).
    disable_overlap_scheduler : bool
        Read each step's tokens before queuing the next (TensorRT-LLM's option of that name). By
        default the next decode step is queued first, so host work hides behind the GPU; the tokens
        are the same.
    max_batch_size, max_num_tokens : int, optional
        Run with smaller limits than the engine was built for (requests in a step; tokens in a step).
    capacity_scheduler_policy : {"MAX_UTILIZATION", "GUARANTEED_NO_EVICT"}
        KV admission (TensorRT-LLM's names): admit whatever prompt fits and preempt the newest request
        when the pool runs dry (default), or admit only what can run to max_tokens without preemption.
    kv_cache_config : KvCacheConfig or dict, optional
        TensorRT-LLM's: `free_gpu_memory_fraction` (default 0.9) of the GPU memory free after loading, less
        the step's activations and CUDA graphs, bounds the KV pool; `max_tokens` caps it. The pool never
        exceeds the engine's plan (max_batch_size sequences of max_seq_len).
    """

    def __init__(self, engine_dir: str | Path, device: str | None = None, tp_size: int | None = None,
                 verify: bool = True, cuda_graphs: bool = True, disable_overlap_scheduler: bool = False,
                 max_batch_size: int | None = None, max_num_tokens: int | None = None,
                 capacity_scheduler_policy: str = "MAX_UTILIZATION",
                 kv_cache_config: KvCacheConfig | dict | None = None):
        self.engine_dir = Path(engine_dir)
        self.kv_cache_config = KvCacheConfig.of(kv_cache_config)  # before any rank is started
        self.cfg = open_engine(self.engine_dir, tp_size, verify)
        for name, value in (("max_batch_size", max_batch_size), ("max_num_tokens", max_num_tokens)):
            built = getattr(self.cfg.build, name)
            if value is not None and not (isinstance(value, int) and 1 <= value <= built):
                raise ValueError(f"{name}={value!r}: expected an integer in [1, {built}] (the engine was built "
                                 f"for {built}; rebuild it for more)")
        self._caps = (max_batch_size or self.cfg.build.max_batch_size, max_num_tokens or self.cfg.build.max_num_tokens)
        if capacity_scheduler_policy not in POLICIES:  # before any rank is started
            raise ValueError(f"capacity_scheduler_policy={capacity_scheduler_policy!r}: expected one of {list(POLICIES)}")
        kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"device={device!r}: expected 'cuda' or 'cpu'")
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' asked for, but no CUDA GPU is visible")
        self.device_kind = kind
        self.cuda_graphs = cuda_graphs
        self._ranks: RankProcesses | None = None
        self._closed = False
        self._lock = threading.RLock()
        world = self.cfg.build.tp_size
        mpi = envs.mpi_world()
        if world > 1:
            if mpi is not None and mpi[1] == world:
                self._join_mpi(mpi[0], world)  # ranks > 0 never return from here
            else:
                self._spawn_ranks(world)
        device = torch.device("cuda:0") if kind == "cuda" else torch.device("cpu")
        if kind == "cuda":
            torch.cuda.set_device(device)
        self.tokenizer = self._load_tokenizer()
        try:
            runner = build_runner(self.engine_dir, self.cfg, 0, device, cuda_graphs, self.kv_cache_config)
        except Exception:
            # loading meets the other ranks in a collective (the KV pool size): one that died while loading
            # breaks it here, and its own error is the one to report
            failure = self.rank_failure(wait_s=2.0)
            if failure is None:
                raise
            self._ranks.stop()
            self._ranks = None
            dist.shutdown()
            raise RankFailure(f"loading the engine: {failure}") from None
        self.engine = EngineCore(runner, self.tokenizer, *self._caps,
                                 before_step=self._broadcast if world > 1 else None,
                                 overlap=not disable_overlap_scheduler,
                                 capacity_scheduler_policy=capacity_scheduler_policy)

    # ---- ranks -------------------------------------------------------------------------------
    def _backend(self) -> str:
        return "nccl" if self.device_kind == "cuda" else "gloo"

    def _spawn_ranks(self, world: int) -> None:
        init = f"tcp://127.0.0.1:{dist.free_port()}"
        timeout = envs.rank_timeout_s()
        self._ranks = RankProcesses(world, str(self.engine_dir), self.device_kind, self._backend(), init, timeout,
                                    self.cuda_graphs, self.kv_cache_config.to_dict())
        try:  # a rank that dies at bootstrap is reported now, not after the group's timeout
            run_in_thread_watching(lambda: join_group(0, world, self._backend(), init, timeout), self._ranks,
                                   "tensor-parallel group did not form")
        except Exception as e:
            failure = self._ranks.failure(wait_s=2.0)
            self._ranks.stop()
            self._ranks = None
            dist.shutdown()  # this rank's view of the group (rank, world) back to one process
            raise RankFailure(str(e) if isinstance(e, RankFailure) or failure is None else
                              f"tensor-parallel group did not form: {failure}") from None

    def _join_mpi(self, rank: int, world: int) -> None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        init = comm.bcast(f"tcp://127.0.0.1:{dist.free_port()}" if rank == 0 else None, root=0)
        join_group(rank, world, self._backend(), init, envs.rank_timeout_s())
        if rank == 0:
            return
        device = torch.device(f"cuda:{rank % max(1, torch.cuda.device_count())}") \
            if self.device_kind == "cuda" else torch.device("cpu")
        runner = build_runner(self.engine_dir, self.cfg, rank, device, self.cuda_graphs, self.kv_cache_config)
        serve_steps(runner)
        runner.release_graphs()
        dist.shutdown()
        raise SystemExit(0)

    def rank_failure(self, wait_s: float = 0.0) -> RankFailure | None:
        """A RankFailure if a rank this LLM started has died (exit status and last error line), else None."""
        return None if self._ranks is None else self._ranks.failure(wait_s)

    def _broadcast(self, plan, rows) -> None:
        failure = self.rank_failure()
        if failure is not None:
            raise failure
        dist.broadcast_object((plan, rows))

    def _load_tokenizer(self):
        if not (self.engine_dir / "tokenizer_config.json").exists() and not (self.engine_dir / "tokenizer.json").exists():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.engine_dir))

    # ---- generation -----------------------------------------------------------------------------
    def _params(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params: {len(sampling_params)} given for {n} prompts")
        return list(sampling_params)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> RequestOutput | list[RequestOutput]:
        """Generate under in-flight batching. One prompt (a string or a list of token ids) gives one
        RequestOutput; a list of prompts gives a list, in prompt order (TensorRT-LLM's LLM.generate)."""
        single = _is_single_prompt(prompts)
        batch = [prompts] if single else list(prompts)
        params = self._params(sampling_params, len(batch))
        with self._lock:
            self._ensure_open()
            reqs = []
            try:
                for p, sp in zip(batch, params):
                    reqs.append(self.engine.add_request(p, sp))
                while any(not r.finished for r in reqs):
                    self._step()
            except BaseException:
                for r in reqs:
                    self.engine.abort(r.request_id)
                raise
            outs = [r.output() for r in reqs]
        return outs[0] if single else outs

    def generate_async(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> GenerationResult:
        """Submit one prompt; returns a GenerationResult: `.result()` waits for the final RequestOutput, and
        iterating it (for, or async for) yields RequestOutput deltas as text arrives (text_diff /
        token_ids_diff hold the new part; with streaming=False only the final output). Closing it, or
        leaving a loop early, aborts the request and frees its KV blocks."""
        with self._lock:
            self._ensure_open()
            req = self.engine.add_request(prompt, sampling_params or SamplingParams())
        return GenerationResult(self, req, streaming)

    def step(self) -> list:
        """One engine step (what generate runs until its requests finish; the server's loop runs it too).
        A step that broke because a rank died raises StepError naming the rank, its exit status and last
        error line (a broken collective is seen before the rank's exit)."""
        try:
            return self.engine.step()
        except StepError as e:
            failure = self.rank_failure(wait_s=2.0) if e.fatal else None
            if failure is None:
                raise
            self._ranks.stop()  # the others cannot go on without it: end them now, none is left behind
            raise StepError(f"a tensor-parallel rank failed: {failure}", e.requests, True) from failure

    def _step(self) -> None:
        """step() for the API's own loops: a dead rank surfaces as the RankFailure that names it."""
        try:
            self.step()
        except StepError as e:
            if isinstance(e.__cause__, RankFailure):
                raise e.__cause__ from None
            raise

    def abort(self, request_id: int) -> None:
        with self._lock:
            self.engine.abort(request_id)

    @property
    def kv_cache(self):
        return self.engine.runner.kv

    # ---- lifetime -----------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("LLM has been shut down")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        ranks = self._ranks
        stopped = ranks is not None and not ranks.dead()
        if stopped:
            try:
                dist.broadcast_object(STOP)
            except Exception:
                stopped = False
        if ranks is not None and not stopped:  # a rank is gone: no collective teardown, this rank's state only
            ranks.stop()
            dist.shutdown()
            return
        # with the ranks, not before waiting for them: their shutdown (a barrier, the group's teardown) waits
        # for this one; waiting first left every rank waiting on the other until the wait timed out
        if getattr(self, "engine", None) is not None:
            self.engine.runner.release_graphs()
        dist.shutdown()
        if ranks is not None:
            ranks.wait(30)
            ranks.stop()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
