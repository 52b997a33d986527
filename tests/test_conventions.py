"""What a TensorRT-LLM user meets first: its CLI spellings, its API semantics, errors without tracebacks."""
import json
import socket
import subprocess
import sys
import time
from pathlib import Path


from maverick.config import BuildConfig, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(*args, timeout=120):
    return subprocess.run([PY, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_build_spellings_make_identical_engines(tiny_ckpt, tmp_path):
    ours = run("build_engine.py", "--checkpoint", tiny_ckpt, "--output", tmp_path / "a", "--tp-size", "2",
               "--max-batch-size", "2", "--max-seq-len", "64", "--max-num-tokens", "32", "--kv-cache-block-size", "8",
               "--dtype", "float32", "--no-progress")
    trt = run("build_engine.py", "--checkpoint_dir", tiny_ckpt, "--output_dir", tmp_path / "b", "--tp_size", "2",
              "--max_batch_size", "2", "--max_seq_len", "64", "--max_num_tokens", "32", "--tokens_per_block", "8",
              "--kv_cache_type", "paged", "--dtype", "float32", "--no-progress")
    assert ours.returncode == 0 and trt.returncode == 0, ours.stderr + trt.stderr
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b  # same options, same files and hashes
    help_text = run("build_engine.py", "--help").stdout
    assert help_text.count("--tp_size") == 1 and help_text.count("--checkpoint_dir") == 1


def test_kv_block_size_is_chosen_for_the_model():
    cfg = ModelConfig.preset("tiny")
    odd = ModelConfig.from_dict({**cfg.to_dict(), "attention_chunk_size": 11})
    assert BuildConfig(max_seq_len=64).for_model(odd).kv_cache_block_size == 1
    assert BuildConfig(max_seq_len=64).for_model(ModelConfig.preset("maverick")).kv_cache_block_size == 64
    assert BuildConfig(max_seq_len=64, kv_cache_block_size=16).for_model(odd).kv_cache_block_size == 16


def test_quantize_and_generate_user_errors_are_one_line(tiny_engine, tmp_path):
    for args, want in ((("quantize.py", "--model", "/no/such/dir", "--output", tmp_path / "q"), "no such checkpoint directory"),
                       (("quantize.py", "--model_dir", tiny_engine, "--output_dir", tmp_path / "q"), "is a maverick engine"),
                       (("-m", "maverick.generate", tiny_engine, "hi", "--device", "cuda"), "no CUDA GPU"),
                       (("-m", "maverick.generate", tmp_path / "none", "hi"), "does not exist"),
                       (("build_engine.py", "--checkpoint", "/no/such", "--output", tmp_path / "e"), "error:")):
        t0 = time.time()
        r = run(*args)
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
        assert time.time() - t0 < 60


def test_serve_busy_port_fails_before_loading(tiny_engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.time()
        r = run("-m", "maverick.serve", tiny_engine, "--port", port, "--device", "cpu")
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert "load engine" not in r.stderr and time.time() - t0 < 30


def test_openai_batch_prompts_content_parts_and_trtllm_serve_options(tiny_ckpt, tmp_path):
    """maverick-serve given a checkpoint (built into its cache) with trtllm-serve's spellings; the openai client
    sends a batch of prompts and chat content as text parts."""
    from openai import OpenAI
    from test_server import Server

    opts = tmp_path / "llm.yaml"
    opts.write_text("max_batch_size: 2\ndisable_overlap_scheduler: true\n")
    cfg = tmp_path / "build.yaml"
    cfg.write_text("dtype: float32\nmax_seq_len: 128\nmax_batch_size: 4\nmax_num_tokens: 64\n")
    s = Server(tiny_ckpt, "--served_model_name", "tiny", "--config", cfg, "--engine-cache", tmp_path / "cache",
               "--extra_llm_api_options", opts)
    try:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny", prompt=["The harbor", "A cache", [5, 6, 7]], max_tokens=5, temperature=0)
        assert [ch.index for ch in r.choices] == [0, 1, 2] and all(ch.text for ch in r.choices)
        alone = c.completions.create(model="tiny", prompt="A cache", max_tokens=5, temperature=0).choices[0].text
        assert r.choices[1].text == alone and r.usage.completion_tokens == 15
        streamed = {}
        for ch in c.completions.create(model="tiny", prompt=["The harbor", "A cache"], max_tokens=5, temperature=0,
                                       stream=True):
            streamed[ch.choices[0].index] = streamed.get(ch.choices[0].index, "") + ch.choices[0].text
        assert streamed == {0: r.choices[0].text, 1: r.choices[1].text}
        parts = c.chat.completions.create(model="tiny", max_tokens=6, temperature=0, response_format={"type": "text"},
                                          messages=[{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                                                   {"type": "text", "text": "there"}]}])
        plain = c.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Hello there"}])
        assert parts.choices[0].message.content == plain.choices[0].message.content
        assert len(list((tmp_path / "cache").iterdir())) == 1
    finally:
        s.stop()
