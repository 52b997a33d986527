"""The bundled default: a small Llama 4 trained on Shakespeare (scripts/train_small.py).

It must load with transformers as a valid Llama 4 text config, its engine must match transformers (logits,
greedy tokens, perplexity), its FP8 engine must stay within the measured bound of BF16, and the training
script must learn (a short CPU run on a corpus made here)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maverick import LLM, SamplingParams
from maverick.builder.builder import build_engine
from maverick.config import BuildConfig
from maverick.evaluate import SPLITS, evaluate

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "maverick" / "data" / "shakespeare"
# FP8 (ModelOpt, static per-tensor scales, FP8 KV cache, 32 calibration passages) against the bf16 engine on the
# 2,500-token slice below: measured -0.33% perplexity on CPU (the whole test split: -0.06%, scripts/eval_small.py).
# Asserted at the goal: within 1% of BF16.
FP8_PPL_BOUND = 0.01


@pytest.fixture(scope="module")
def hf():
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "engine"
    build_engine(MODEL, out, BuildConfig(dtype="float32", max_seq_len=512, max_batch_size=4, max_num_tokens=512,
                                         kv_cache_block_size=16), progress=False)
    return out


@pytest.fixture(scope="module")
def test_ids(tokenizer):
    return tokenizer.encode(SPLITS["test"].read_text(), add_special_tokens=False)[:2500]


def test_checkpoint_is_a_maverick_shaped_llama4_text_model(hf):
    c = hf.config
    assert c.model_type == "llama4_text" and hf.__class__.__name__ == "Llama4ForCausalLM"
    assert c.moe_layers == [1, 3] and c.num_experts_per_tok == 1 and c.num_local_experts == 4  # dense/MoE interleaved
    assert c.no_rope_layers == [1, 1, 1, 0] and c.attn_temperature_tuning and not c.use_qk_norm
    assert c.attention_chunk_size == 256 and c.head_dim == 64
    size = sum(p.numel() for p in hf.parameters()) * 2
    assert size <= 25e6, f"{size / 1e6:.1f} MB of bf16: over the repository's budget"
    assert (MODEL / "model.safetensors").stat().st_size <= 25e6


def test_engine_matches_transformers_logits_and_greedy_tokens(engine, hf, tokenizer):
    ids = tokenizer.encode("ROMEO.\nO, she doth teach the torches to burn bright!\n", add_special_tokens=False)
    with LLM(engine, device="cpu") as llm:
        from maverick.evaluate import engine_logits

        ours = engine_logits(llm, [ids])[0]
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids])).logits[0].float()
        assert (ours - ref).abs().max().item() <= 1e-4
        out = llm.generate(ids, SamplingParams(max_tokens=24, temperature=0)).outputs[0].token_ids
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert out == want[: len(out)] and len(out) >= 8


def test_engine_perplexity_equals_transformers(engine, test_ids):
    res = evaluate(engine, test_ids, window=511, batch=4, device="cpu", hf=MODEL, progress=False)
    e, h = res["engine"], res["hf"]
    assert e.tokens == h.tokens > 2000
    assert abs(e.ppl / h.ppl - 1) <= 1e-3
    assert e.top1_agreement >= 0.999
    assert 10 < e.ppl < 150  # it learned: uniform over the vocabulary would be 4096


@pytest.fixture(scope="module")
def fp8_engine(tmp_path_factory):
    from maverick.quantization.modelopt_fp8 import quantize_checkpoint

    d = tmp_path_factory.mktemp("small-fp8")
    quantize_checkpoint(MODEL, d / "ckpt", True, MODEL / "calib.jsonl", 32, 512, "cpu", progress=False)
    build_engine(d / "ckpt", d / "engine", BuildConfig(dtype="bfloat16", max_seq_len=512, max_batch_size=4,
                                                       max_num_tokens=512, kv_cache_block_size=16), progress=False)
    return d / "engine"


def test_fp8_engine_within_bound_of_bf16(fp8_engine, tmp_path_factory, test_ids):
    bf16 = tmp_path_factory.mktemp("small-bf16") / "engine"
    build_engine(MODEL, bf16, BuildConfig(dtype="bfloat16", max_seq_len=512, max_batch_size=4, max_num_tokens=512,
                                          kv_cache_block_size=16), progress=False)
    ppl = {name: evaluate(e, test_ids, window=511, batch=4, device="cpu", progress=False)["engine"].ppl
           for name, e in (("bf16", bf16), ("fp8", fp8_engine))}
    assert abs(ppl["fp8"] / ppl["bf16"] - 1) <= FP8_PPL_BOUND, ppl


def test_eval_cli(engine, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "maverick.evaluate", str(engine), "--split", "test", "--max-tokens",
                        "1200", "--device", "cpu", "--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "perplexity" in r.stderr  # the result, and the progress bar
    res = json.loads(out.read_text())["engine"]
    assert res["tokens"] > 1000 and math.isclose(math.exp(res["nll"]), res["ppl"], rel_tol=1e-9)
    r = subprocess.run([sys.executable, "-m", "maverick.evaluate", str(engine), "--text", str(tmp_path / "none.txt")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_training_script_learns(tmp_path):
    """prepare + train end to end on a corpus made of the shipped test plays (offline), a tiny width, CPU."""
    corpus = tmp_path / "texts"
    corpus.mkdir()
    text = SPLITS["test"].read_text()
    names = ["alpha", "beta", "gamma", "julius_caesar", "twelfth_night", "macbeth", "much_ado_about_nothing"]
    for i, name in enumerate(names):
        (corpus / f"{name}_gut.txt").write_text(text[i * 30000:(i + 1) * 30000])
        (corpus / f"{name}_gut_f.txt").write_text("a First Folio duplicate that prepare must skip\n")
    script = str(ROOT / "scripts" / "train_small.py")
    r = subprocess.run([sys.executable, script, "prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["plays"] == ["alpha", "beta", "gamma"]
    r = subprocess.run([sys.executable, script, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"),
                        "--sizes", "smoke", "--steps", "60", "--batch", "4", "--seq", "64", "--lr", "3e-3",
                        "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    log = json.loads((tmp_path / "m" / "size-smoke" / "training.json").read_text())
    first, last = log["train_loss"][0][1], log["train_loss"][-1][1]
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "m" / "loss_curve.png").stat().st_size > 1000
    from transformers import Llama4ForCausalLM

    Llama4ForCausalLM.from_pretrained(tmp_path / "m" / "size-smoke")  # a valid Hugging Face checkpoint


def test_chat_through_the_server(engine):
    """A chat prompt through maverick-serve and the openai client gets an answer in the plays' manner."""
    from openai import OpenAI
    from test_server import Server

    s = Server(engine)
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What news from Rome?"}],
                                           max_tokens=24, temperature=0)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length") and len(text.split()) >= 3, text
        assert "<|" not in text  # the turn ends at <|eot|>, which is not text
    finally:
        s.stop()
