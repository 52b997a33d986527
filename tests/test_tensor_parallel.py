"""tp_size=2 on CPU (two processes, gloo) computes the same logits as tp_size=1."""
import pytest
import torch
import torch.multiprocessing as mp

from helpers import full_logits, greedy, make_ckpt, prompt_ids, runner_for
from maverick import distributed as dist


def _rank_main(rank, world, port, path, ep_size, out_file):
    dist.init(rank, world, "gloo", f"tcp://127.0.0.1:{port}")
    try:
        runner = runner_for(path, tp_size=world, tp_rank=rank, ep_size=ep_size)
        logits = full_logits(runner, prompt_ids(60, seed=7))
        tokens = greedy(runner, prompt_ids(40, seed=8), 16)
        if rank == 0:
            torch.save({"logits": logits, "tokens": tokens}, out_file)
    finally:
        dist.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("name,ep_size", [("default", 1), ("scout_like", 2)])
def test_tp2_equals_tp1(ckpt_root, tmp_path, name, ep_size):
    path = make_ckpt(ckpt_root, name)
    out = tmp_path / "tp2.pt"
    mp.start_processes(_rank_main, args=(2, dist.free_port(), path, ep_size, out), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out)
    runner = runner_for(path)
    ref = full_logits(runner, prompt_ids(60, seed=7))
    assert (got["logits"] - ref).abs().max().item() < 1e-4
    assert got["tokens"] == greedy(runner, prompt_ids(40, seed=8), 16)
