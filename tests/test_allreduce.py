"""One-shot all-reduce + residual add + RMSNorm over peer buffers, against its reference.

CPU (Triton interpreter, CI): one kernel instance plays rank 0 of 2 with rank 1's buffer and signal
already in place, so the reduction, the norm and the signal protocol are checked without a peer.
GPU (`-m gpu`, 2 and 4 GPUs): real ranks over PyTorch symmetric memory, eager and in CUDA graphs,
against the reference and against NCCL + add_rms_norm, and the tiny model at TP2 on CUDA.
"""
import os
from pathlib import Path

import pytest
import torch

import maverick_plugins as ops

GPU = torch.cuda.is_available()


class _RankZeroOfTwo:
    """Rank 0's view of a 2-rank workspace in host memory: both ranks' buffers and signal pads, and the
    pointer tables the kernel takes. Rank 1 is played by writing into its buffer and our pad by hand;
    the kernel runs once in the interpreter as rank 0."""

    world = 2

    def __init__(self, sites, rows, hidden, dtype=torch.float32):
        from maverick_plugins.kernels.allreduce_norm import allreduce_add_rms_norm_triton

        self.sites, self.rows, self.hidden, self._kernel = sites, rows, hidden, allreduce_add_rms_norm_triton
        self.bufs = [torch.zeros(sites, rows, hidden, dtype=dtype) for _ in range(self.world)]
        self.pads = [torch.zeros((rows + 2) * self.world, dtype=torch.int32) for _ in range(self.world)]
        self.ptrs = [torch.tensor([t.data_ptr() for t in ts]) for ts in (self.bufs, self.pads)]

    def slots(self, rank, sender):
        """Rank `rank`'s signal slots written by `sender`, one per row."""
        return self.pads[rank][sender:self.rows * self.world:self.world]

    def run(self, x, delta, w, site, errors, **kw):
        return self._kernel(x, delta, w, 1e-5, *self.ptrs, 0, self.world, site, site * self.rows * self.hidden,
                            self.rows * self.world, errors, **kw)


# fp32 only: the interpreter reads bf16 through a pointer made from an integer as garbage (bf16 runs on
# the GPU tests below, with real peers)
@pytest.mark.parametrize("rows,hidden,dtype", [(1, 40, torch.float32), (3, 96, torch.float32),
                                               (16, 5120, torch.float32)])
def test_fused_allreduce_one_rank_view(rows, hidden, dtype):
    if GPU:
        pytest.skip("the one-process view spins forever on a GPU without a real peer; GPU tests use real ranks")
    site = 2
    view = _RankZeroOfTwo(3, rows, hidden, dtype)
    bufs, pads, world = view.bufs, view.pads, view.world
    g = torch.Generator().manual_seed(rows)
    parts = [torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(world)]
    bufs[1][site].copy_(parts[1])  # rank 1 already wrote its partial ...
    view.slots(0, 1).fill_(1)  # ... and signalled rank 0 on every row
    x, w = torch.randn(rows, hidden, generator=g).to(dtype), torch.randn(hidden, generator=g).to(dtype)
    errors = torch.zeros(3, dtype=torch.int32)
    h, y = view.run(x, parts[0], w, site, errors)
    assert errors.tolist() == [0, 0, 0]
    hr, yr = ops.allreduce_add_rms_norm_ref(x, parts, w, 1e-5)
    assert (h - hr).abs().max().item() <= 1e-6  # fp32: summation order of two partials only
    assert (y - yr).abs().max().item() <= 1e-5
    assert torch.equal(bufs[0][site], parts[0])  # our partial is where peers read it
    assert bufs[0][:site].abs().sum() == 0 and bufs[0][site + 1:].abs().sum() == 0  # no other site touched
    assert pads[0][:rows * world].tolist() == [0] * (rows * world)  # rank 1's signals consumed
    assert pads[1][:rows * world].tolist() == [1, 0] * rows  # rank 0 signalled rank 1 on every row, on its slot
    assert pads[1][rows * world:].abs().sum() == 0  # spare words are ours, never a peer's


@pytest.mark.parametrize("stuck", ["peer silent", "peer never consumed"])
def test_fused_allreduce_times_out_instead_of_hanging(stuck):
    """A peer that never signals (or never consumed our last signal): the barrier gives up after
    max_spin retries, records who and where, and check() raises a clear error (no hang)."""
    from maverick_plugins.allreduce import raise_on_barrier_timeouts

    if GPU:
        pytest.skip("one process plays rank 0 of 2 in the interpreter; GPU tests use real ranks")
    rows, hidden, site = 2, 32, 1
    view = _RankZeroOfTwo(2, rows, hidden)
    if stuck == "peer never consumed":
        view.slots(0, 1).fill_(1)  # rank 1 did signal us ...
        view.slots(1, 0).fill_(1)  # ... but still holds our previous signal on every row
    x, d, w = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.ones(hidden)
    errors = torch.zeros(3, dtype=torch.int32)
    view.run(x, d, w, site, errors, max_spin=3)
    count, last_site, peers = errors.tolist()
    assert count == rows and last_site == site
    assert peers == (1 << 1 if stuck == "peer silent" else 1 << (8 + 1))
    with pytest.raises(RuntimeError, match=r"rank 0: 2 barrier\(s\) timed out, the last at call site 1; "
                                           r"no signal from rank\(s\) \[" + ("1" if stuck == "peer silent" else "")):
        raise_on_barrier_timeouts(errors, 0)


def test_fused_allreduce_fails_fast_after_a_timeout():
    """Once a barrier has failed, later calls make one attempt instead of spinning (here max_spin is far
    beyond what the interpreter could run: the call only returns because it does not wait)."""
    if GPU:
        pytest.skip("one process plays rank 0 of 2 in the interpreter; GPU tests use real ranks")
    rows, hidden = 1, 32
    view = _RankZeroOfTwo(1, rows, hidden)
    errors = torch.tensor([1, 7, 2], dtype=torch.int32)  # an earlier call at site 7 timed out
    x, d, w = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.ones(hidden)
    view.run(x, d, w, 0, errors, max_spin=1 << 30)
    assert errors.tolist() == [2, 0, 2]  # one more failure recorded, at site 0; peer 1 still silent


def _rank_main(rank, world, init, out_dir):
    import traceback

    try:
        _rank_checks(rank, world, init, out_dir)
    except Exception:  # the parent reads it: a spawned rank's traceback is otherwise lost in pytest's output
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _rank_checks(rank, world, init, out_dir):
    import torch.distributed as dist

    from maverick import distributed

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    distributed.init(rank, world, "nccl", init)
    hidden, rows_max, sites, eps = 5120, 16, 6, 1e-5
    assert distributed.enable_peer_all_reduce(sites, rows_max, hidden, torch.bfloat16, dev, force=True)
    ws = distributed.peer_workspace()
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(7)).to(dev, torch.bfloat16)
    worst = {"ref": 0.0, "nccl": 0.0, "graph": 0.0}

    def case(seed, rows):
        g = torch.Generator().manual_seed(seed)
        parts = [torch.randn(rows, hidden, generator=g).to(dev, torch.bfloat16) for _ in range(world)]
        x = torch.randn(rows, hidden, generator=g).to(dev, torch.bfloat16)
        return x, parts

    def err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # eager, many back-to-back calls over every site with no host sync between them (races show here)
    results = []
    for i in range(300):
        rows = (1, 5, 16)[i % 3]
        x, parts = case(i, rows)
        results.append((ws.allreduce_add_rms_norm(x, parts[rank], w, eps, i % sites), x, parts))
    torch.cuda.synchronize()
    for (h, y), x, parts in results:
        hr, yr = ops.allreduce_add_rms_norm_ref(x, parts, w, eps)
        worst["ref"] = max(worst["ref"], err(h, hr), err(y, yr))
    x, parts = case(1000, 4)
    nccl = parts[rank].clone()
    dist.all_reduce(nccl)
    hn, yn = ops.add_rms_norm_ref(x, nccl, w, eps)
    h, y = ws.allreduce_add_rms_norm(x, parts[rank], w, eps, 0)
    worst["nccl"] = max(err(h, hn), err(y, yn))

    # CUDA graph: 2 layers' worth of sites, replayed with new inputs each time
    xs, ps = case(2000, 1)
    static_x, static_p = xs.clone(), ps[rank].clone()
    for _ in range(2):
        ws.allreduce_add_rms_norm(static_x, static_p, w, eps, 0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cur = static_x
        for site in range(4):
            cur, _ = ws.allreduce_add_rms_norm(cur, static_p, w, eps, site)
        out_h = cur
    for rep in range(5):
        x, parts = case(3000 + rep, 1)
        static_x.copy_(x)
        static_p.copy_(parts[rank])
        graph.replay()
        ref = x
        for _ in range(4):
            ref, _ = ops.allreduce_add_rms_norm_ref(ref, parts, w, eps)
        worst["graph"] = max(worst["graph"], err(out_h, ref))
    torch.cuda.synchronize()
    ws.check()  # no barrier timed out
    torch.save(worst, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_on_gpus(world, tmp_path):
    """Real ranks: fused == reference (fp32 sum of bf16 partials) within bf16 rounding, == NCCL +
    add_rms_norm within NCCL's own bf16 summation error, in eager bursts and CUDA-graph replays."""
    import torch.multiprocessing as mp

    from maverick.distributed import free_port

    if torch.cuda.device_count() < world:
        pytest.fail(f"needs {world} GPUs, this machine has {torch.cuda.device_count()}: run on a {world}-GPU kind")
    try:
        mp.start_processes(_rank_main, args=(world, f"tcp://127.0.0.1:{free_port()}", str(tmp_path)),
                           nprocs=world, start_method="spawn")
    except mp.ProcessExitedException:
        errs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.err")))
        pytest.fail(f"a rank failed:\n{errs}")
    for r in range(world):
        worst = torch.load(tmp_path / f"rank{r}.pt")
        print(f"world {world} rank {r}: relative error {worst}")
        assert worst["ref"] < 4e-3 and worst["graph"] < 8e-3, worst  # bf16 output rounding: 2^-9 = 2e-3
        assert worst["nccl"] < 1e-2, worst  # NCCL sums in bf16 with its own order


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs,fused", [(False, False), (True, False), (True, True)])
def test_tiny_model_tp2_on_gpus_equals_tp1(tiny_engine, tiny_engine_tp2, cuda_graphs, fused, monkeypatch):
    """The runtime at TP2 on two GPUs (NCCL all-reduces or the fused one-shot kernel; kernels; graphs or
    eager) gives TP1's greedy tokens on the fp32 tiny engine, and shuts down."""
    from helpers import prompt_ids

    from maverick import LLM, SamplingParams

    if torch.cuda.device_count() < 2:
        pytest.fail("needs 2 GPUs: run on a multi-GPU kind")
    monkeypatch.setenv("MAVERICK_FUSED_ALLREDUCE", "1" if fused else "0")  # the spawned ranks inherit it
    prompts = [prompt_ids(40, seed=5), prompt_ids(11, seed=6)]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(tiny_engine, device="cuda", cuda_graphs=cuda_graphs) as one:
        ref = [o.outputs[0].token_ids for o in one.generate(prompts, p)]
    with LLM(tiny_engine_tp2, device="cuda", cuda_graphs=cuda_graphs) as two:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, p)]
    assert got == ref



@pytest.mark.gpu
def test_tiny_model_tp2_overlap_equals_synchronous(tiny_engine_tp2):
    """At TP2 every rank samples and feeds its own samples to the next queued step: the ranks must draw
    the same tokens (same gathered logits, same counter-based noise), so sampled outputs with the
    overlap scheduler equal the synchronous engine's."""
    from helpers import prompt_ids

    from maverick import LLM, SamplingParams

    if torch.cuda.device_count() < 2:
        pytest.fail("needs 2 GPUs: run on a multi-GPU kind")
    prompts = [prompt_ids(40, seed=5), prompt_ids(11, seed=6), prompt_ids(23, seed=7)]
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_k=50, seed=s, ignore_eos=True) for s in (1, 2)]
    params.append(SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    outs = {}
    for off in (False, True):
        with LLM(tiny_engine_tp2, device="cuda", disable_overlap_scheduler=off) as two:
            outs[off] = [o.outputs[0].token_ids for o in two.generate(prompts, params)]
            assert (two.engine.overlapped > 10) == (not off)
    assert outs[False] == outs[True]


def test_lagged_error_read_raises_without_waiting():
    """The step loop's barrier-timeout check reads the record copied at the previous poll: the first poll
    after a timeout only queues the copy, the next one raises the clear error."""
    from maverick_plugins.allreduce import LaggedErrors

    errors = torch.zeros(3, dtype=torch.int32)
    lagged = LaggedErrors(errors, rank=1)
    lagged.poll()
    lagged.poll()  # nothing timed out: silent
    errors.copy_(torch.tensor([1, 5, 1], dtype=torch.int32))  # a barrier at site 5 heard nothing from rank 0
    lagged.poll()  # reads the copy queued before the timeout
    with pytest.raises(RuntimeError, match=r"rank 1: 1 barrier\(s\) timed out, the last at call site 5"):
        lagged.poll()


def _count_rank(rank, world, init, bump, out_dir):
    from maverick import distributed

    distributed.init(rank, world, "gloo", init)
    if rank == 0:
        ops.PeerWorkspace.rendezvous_done += bump  # as if this process had built an earlier LLM
    (Path(out_dir) / f"rank{rank}").write_text(str(distributed.peer_rendezvous_can_meet()))
    distributed.shutdown()


@pytest.mark.parametrize("bump", [0, 1])
def test_peer_rendezvous_needs_equal_counts_on_every_rank(bump, tmp_path):
    """torch numbers symmetric-memory rendezvous per process; a rank 0 that made one before (an earlier LLM)
    and fresh workers would wait on each other forever (2xH100): every rank must agree to fall back."""
    import torch.multiprocessing as mp

    from maverick.distributed import free_port

    mp.start_processes(_count_rank, args=(2, f"tcp://127.0.0.1:{free_port()}", bump, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [str(bump == 0)] * 2


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False)])
def test_fused_all_reduce_is_the_default_and_env_turns_it_off(value, on, monkeypatch):
    from maverick import envs

    if value is None:
        monkeypatch.delenv("MAVERICK_FUSED_ALLREDUCE", raising=False)
    else:
        monkeypatch.setenv("MAVERICK_FUSED_ALLREDUCE", value)
    assert envs.fused_all_reduce() is on
