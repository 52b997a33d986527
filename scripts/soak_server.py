"""A bounded soak of maverick-serve on CPU: schemathesis over the OpenAPI schema, then a random mix of traffic.

    python scripts/soak_server.py                                   # short form (what CI runs): ~1 minute
    python scripts/soak_server.py --duration 600 --examples 1000    # the long form

Phase 1 runs schemathesis (valid and invalid bodies generated from /openapi.json, --examples per operation)
and counts 5xx responses and hangs. Phase 2 runs --concurrency clients for --duration seconds, each picking
at random: a stream read to the end, a stream cancelled mid-way, a plain completion, a chat completion,
a bad request (must get a 4xx), a long prompt (the engine's KV pool holds few of them: preemption), logprobs.
At the end: zero unexpected outcomes, every KV block free, nothing in flight, the server still serves, and
its resident memory's floor (sampled every 15 s) grew less than 5% after the warm-up. Prints a summary, writes --json, exits 1 on any miss.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "soak"


def build_default(out: Path) -> Path:
    """The bundled model's engine with a KV pool of 1,024 tokens (four 256-token prompts at most), for preemption."""
    from maverick.builder.builder import build_engine
    from maverick.config import BuildConfig

    build_engine(ROOT / "maverick" / "data" / "shakespeare", out,
                 BuildConfig(dtype="float32", max_seq_len=512, max_batch_size=8, max_num_tokens=256,
                             kv_cache_block_size=16, kv_cache_max_tokens=1024), progress=False, overwrite=True)
    return out


def start_server(engine: Path, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "maverick.serve", str(engine), "--port", str(port), "--device", "cpu",
                             "--model-name", MODEL, "--max-queue", "64", "--stream-timeout", "30"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def schemathesis_phase(url: str, examples: int, seed: int, report: Path) -> dict:
    """schemathesis against the live server: 5xx responses and timeouts are the failures counted."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe) if exe.exists() else "schemathesis", "run", url + "/openapi.json", "--checks",
           "not_a_server_error", "--max-examples", str(examples), "--request-timeout", "30", "--seed", str(seed),
           "--phases", "examples,coverage,fuzzing", "--continue-on-failure", "--report", "ndjson",
           "--report-ndjson-path", str(report), "--no-color"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    responses = errors5xx = timeouts = 0
    for line in report.read_text().splitlines() if report.exists() else []:
        ev = json.loads(line)
        for rec in _find(ev, "response"):
            if isinstance(rec, dict) and "status_code" in rec:
                responses += 1
                errors5xx += rec["status_code"] >= 500
        timeouts += line.count("RequestTimeout") + line.count("Timeout")
    tail = (r.stdout + r.stderr).strip().splitlines()[-6:]
    return {"exit_code": r.returncode, "responses": responses, "responses_5xx": errors5xx, "timeouts": timeouts,
            "seconds": round(time.time() - t0, 1), "summary": tail}


def _find(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)


async def client(url: str, rng: random.Random, until: float, stats: dict, long_prompt: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < until:
            kind = rng.choice(["stream", "cancel", "plain", "chat", "bad", "long", "logprobs"])
            body = {"model": MODEL, "prompt": rng.choice(["ROMEO.\nO", "To be, or not", "What news?", "KING.\n"]),
                    "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.8]),
                    "seed": rng.randrange(1 << 64)}
            try:
                if kind in ("stream", "cancel"):
                    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: ")
                            if kind == "cancel" and n >= 2:
                                break
                        ok = r.status_code == 200 and (kind == "cancel" or line == "data: [DONE]" or n > 0)
                elif kind == "chat":
                    r = await c.post("/v1/chat/completions", json={
                        "model": MODEL, "messages": [{"role": "user", "content": "Speak, friend."}], "max_tokens": 16})
                    ok = r.status_code == 200
                elif kind == "bad":
                    bad = rng.choice([{**body, "temperature": -1}, {**body, "top_p": 0}, {**body, "seed": 1 << 64},
                                      {**body, "prompt": "x" * 100_000}, {"model": MODEL}, {**body, "n": 3}])
                    r = await c.post("/v1/completions", json=bad)
                    ok = 400 <= r.status_code < 500
                elif kind == "long":
                    r = await c.post("/v1/completions", json={**body, "prompt": long_prompt, "max_tokens": 32})
                    ok = r.status_code == 200
                else:
                    r = await c.post("/v1/completions", json={**body, "logprobs": rng.randint(0, 5)})
                    ok = r.status_code == 200 and (r.json()["choices"][0]["logprobs"] is not None)
            except httpx.HTTPError as e:
                ok, kind = False, f"{kind} ({type(e).__name__})"
            stats["requests"] += 1
            stats["by_kind"][kind.split()[0]] = stats["by_kind"].get(kind.split()[0], 0) + 1
            if not ok:
                stats["unexpected"].append(kind)


def mix_phase(url: str, duration: float, concurrency: int, seed: int) -> dict:
    text = (ROOT / "maverick" / "data" / "shakespeare" / "test.txt").read_text()
    long_prompt = text[:1200]  # about 400 tokens of a 512-token max_seq_len: few fit the 1,024-token pool at once
    stats = {"requests": 0, "by_kind": {}, "unexpected": []}
    warm = time.monotonic() + min(10.0, duration / 5)

    until = time.monotonic() + duration

    async def main():
        rng = random.Random(seed)
        tasks = [client(url, random.Random(rng.random()), until, stats, long_prompt) for _ in range(concurrency)]
        rss = []

        async def sample_rss():  # after the warm-up, then every 15 s: the trend says leak or plateau
            await asyncio.sleep(max(0.0, warm - time.monotonic()))
            while time.monotonic() < until:
                rss.append(metrics(url)["process_resident_memory_bytes"])
                await asyncio.sleep(15)

        await asyncio.gather(sample_rss(), *tasks)
        return rss

    t0 = time.time()
    rss = asyncio.run(main())
    rss_warm = rss[0]
    deadline = time.time() + 30
    while time.time() < deadline:  # aborts reach the engine asynchronously
        m = metrics(url)
        if m["maverick_kv_blocks_in_use"] == 0 and m["maverick_requests_in_flight"] == 0:
            break
        time.sleep(0.2)
    return {**stats, "seconds": round(time.time() - t0, 1), "rss_after_warmup": rss_warm, "rss_every_15s": rss,
            "rss_end": m["process_resident_memory_bytes"], "kv_blocks_in_use": m["maverick_kv_blocks_in_use"],
            "in_flight": m["maverick_requests_in_flight"], "aborted": m["maverick_requests_aborted_total"],
            "failed": m["maverick_requests_failed_total"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, help="an engine to serve (default: the bundled model, small KV pool)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of mixed traffic")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--examples", type=int, default=30, help="schemathesis examples per API operation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    from maverick.distributed import free_port

    work = Path(tempfile.mkdtemp(prefix="maverick-soak-"))
    engine = a.engine or build_default(work / "engine")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(engine, port)
    try:
        fuzz = schemathesis_phase(url, a.examples, a.seed, work / "schemathesis.ndjson")
        mix = mix_phase(url, a.duration, a.concurrency, a.seed)
        import httpx

        alive = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO.", "max_tokens": 4},
                           timeout=30).status_code == 200
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        shutil.rmtree(work, ignore_errors=True)
    # a leak raises the floor: the lowest sample of the last third against the first third's. Samples swing by
    # up to 15% above it while long prompts are in flight (10-minute run: floor 669-672 MB, peaks 780 MB)
    series = mix["rss_every_15s"] or [mix["rss_after_warmup"], mix["rss_end"]]
    third = max(1, len(series) // 3)
    growth = min(series[-third:]) / min(series[:third]) - 1
    median_growth = statistics.median(series[-third:]) / statistics.median(series[:third]) - 1
    checks = {"schemathesis: no failure": fuzz["exit_code"] == 0,
              "schemathesis: no 5xx": fuzz["responses_5xx"] == 0 and fuzz["responses"] > 0,
              "schemathesis: no timeout": fuzz["timeouts"] == 0,
              "mix: no unexpected outcome": not mix["unexpected"],
              "KV blocks all free": mix["kv_blocks_in_use"] == 0, "nothing in flight": mix["in_flight"] == 0,
              "serves a normal request after": alive, "RSS floor growth after warm-up < 5%": growth < 0.05,
              "clean exit on SIGTERM": code == 0}
    report = {"duration_s": a.duration, "concurrency": a.concurrency, "examples": a.examples, "schemathesis": fuzz,
              "mix": {**mix, "unexpected": mix["unexpected"][:20], "rss_floor_growth": round(growth, 4),
                      "rss_median_growth": round(median_growth, 4)},
              "checks": checks}
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    print(f"schemathesis: {fuzz['responses']} responses, {fuzz['responses_5xx']} 5xx, {fuzz['timeouts']} timeouts "
          f"({fuzz['seconds']} s)")
    print(f"mix: {mix['requests']} requests in {mix['seconds']} s {mix['by_kind']}, {len(mix['unexpected'])} "
          f"unexpected, {mix['aborted']:.0f} aborted; RSS after warm-up {mix['rss_after_warmup'] / 1e6:.0f} MB, "
          f"end {mix['rss_end'] / 1e6:.0f} MB; floor {100 * growth:+.1f}%, median {100 * median_growth:+.1f}% "
          f"(last third vs first third of the 15 s samples)")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'MISS'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
