"""Tensor-parallel ranks under faults (TP2, gloo on CPU): ranks start from the package, never from the caller's
__main__; a rank that dies is reported within seconds with its exit status and last error line; no rank
process outlives the error."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maverick import LLM, SamplingParams
from maverick.runtime.errors import RankFailure

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def rank_children() -> list[int]:
    """Live child processes of this one that run a rank."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == os.getpid() and b"maverick.runtime.rank_main" in cmd and state != "Z":
            out.append(int(d.name))
    return out


SCRIPT = """
from maverick import LLM, SamplingParams
llm = LLM({engine!r}, device="cpu")
out = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
print("TOKENS", out.outputs[0].token_ids)
llm.shutdown()
"""


@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_unguarded_script_at_tp2(tiny_engine_tp2, how):
    """The README's snippet with no __main__ guard, as `python -c` and on standard input."""
    code = SCRIPT.format(engine=str(tiny_engine_tp2))
    cmd = [sys.executable, "-c", code] if how == "-c" else [sys.executable, "-"]
    t0 = time.time()
    r = subprocess.run(cmd, input=None if how == "-c" else code, capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TOKENS [" in r.stdout and time.time() - t0 < 60


def _kill_rank_and_expect_failure(llm, run):
    pid = llm._ranks.procs[0].pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(RankFailure, match="rank 1 exited with signal SIGKILL") as e:
        run()
    assert time.time() - t0 < 10
    deadline = time.time() + 10
    while rank_children() and time.time() < deadline:
        time.sleep(0.1)
    assert rank_children() == []
    return e.value


def test_rank_killed_while_idle(tiny_engine_tp2):
    llm = LLM(tiny_engine_tp2, device="cpu")
    try:
        assert len(rank_children()) == 1
        _kill_rank_and_expect_failure(llm, lambda: llm.generate([1, 2, 3], SamplingParams(max_tokens=3)))
    finally:
        llm.shutdown()
    assert rank_children() == []


def test_rank_killed_mid_generate(tiny_engine_tp2):
    llm = LLM(tiny_engine_tp2, device="cpu")
    try:
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        started = threading.Event()

        def run():
            for i, _ in enumerate(llm.generate_async([1, 2, 3], params, streaming=True)):
                if i == 2:
                    started.set()

        killer = threading.Thread(target=lambda: started.wait(30) and os.kill(llm._ranks.procs[0].pid, signal.SIGKILL))
        killer.start()
        t0 = time.time()
        with pytest.raises(RankFailure, match="rank 1 exited with signal SIGKILL"):
            run()
        killer.join()
        assert time.time() - t0 < 20
        deadline = time.time() + 10
        while rank_children() and time.time() < deadline:
            time.sleep(0.1)
        assert rank_children() == []
    finally:
        llm.shutdown()


def test_rank_that_fails_to_load_names_its_error(tiny_engine_tp2, tmp_path):
    bad = tmp_path / "e"
    shutil.copytree(tiny_engine_tp2, bad)
    data = (bad / "rank1.safetensors").read_bytes()
    (bad / "rank1.safetensors").write_bytes(data[: len(data) // 2])
    t0 = time.time()
    try:
        llm = LLM(bad, device="cpu", verify=False)  # rank 0 does not hash: rank 1 finds the damage itself
    except RankFailure as e:  # seen while the group formed
        err = e
    else:
        with pytest.raises(RankFailure) as info:
            llm.generate([1, 2], SamplingParams(max_tokens=2))
        err = info.value
        llm.shutdown()
    assert "rank 1 exited with code 1" in str(err) and "rank1.safetensors" in str(err), str(err)
    assert time.time() - t0 < 30
    assert rank_children() == []


def test_group_that_cannot_form_is_reported_at_once(tiny_engine_tp2, monkeypatch, tmp_path):
    """A rank that dies before joining (here: an interpreter that cannot start it, as the old re-import of an
    unguarded __main__ did): the driver's join is watched, not left to its 300 s timeout."""
    import maverick.runtime.ranks as ranks

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: cannot start the rank' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(ranks.sys, "executable", str(fake))
    t0 = time.time()
    with pytest.raises(RankFailure, match="group did not form: rank 1 exited with code 3: ImportError: cannot start"):
        LLM(tiny_engine_tp2, device="cpu")
    assert time.time() - t0 < 10
    assert rank_children() == []
