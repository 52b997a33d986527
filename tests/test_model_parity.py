"""The network against transformers' Llama4ForCausalLM (eager attention, fp32): the numerical truth."""
import pytest
import torch

from helpers import CONFIGS, full_logits, greedy, hf_model, make_ckpt, prompt_ids, runner_for
from maverick.builder.from_checkpoint import load_model_from_checkpoint
from maverick.checkpoint import open_checkpoint
from maverick.models import ModelSpec
from maverick.runtime.step import StepSeq
from maverick.runtime.model_runner import ModelRunner

ATOL = 1e-4  # fp32 everywhere; measured max |diff| is about 2e-6


def test_configs_cover_the_features(any_ckpt):
    cfg = open_checkpoint(any_ckpt).config
    assert cfg.attn_temperature_tuning and cfg.floor_scale < 40  # scale != 1 inside an 80-token prompt
    assert cfg.attention_chunk_size < 80  # an 80-token prompt crosses a chunk boundary


def test_feature_union():
    feats = set()
    from maverick.config import ModelConfig
    from maverick.tiny_checkpoint import TINY_TEXT_CONFIG
    for name, over in CONFIGS.items():
        cfg = ModelConfig.from_hf(dict(TINY_TEXT_CONFIG, model_type="llama4_text", **over))
        feats |= {"moe"} if cfg.moe_layers else set()
        feats |= {"dense"} if cfg.dense_layer_ids else set()
        feats |= {"rope"} if cfg.rope_layer_ids else set()
        feats |= {"nope"} if cfg.nope_layer_ids else set()
        feats |= {f"qk_norm={cfg.use_qk_norm}", f"top{cfg.num_experts_per_tok}"}
    assert {"moe", "dense", "rope", "nope", "qk_norm=True", "qk_norm=False", "top1", "top2"} <= feats


def test_logits_match_transformers(any_ckpt):
    hf = hf_model(any_ckpt)
    runner = runner_for(any_ckpt)
    for seed, n in ((0, 80), (1, 5), (2, 33)):
        ids = prompt_ids(n, seed)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        out = full_logits(runner, ids)
        diff = (out - ref).abs().max().item()
        assert diff < ATOL, f"{any_ckpt.name} n={n}: max |logit diff| {diff:.3g} >= {ATOL}"
    assert runner.kv.all_free


def test_greedy_matches_transformers_generate(any_ckpt):
    hf = hf_model(any_ckpt)
    runner = runner_for(any_ckpt)
    ids = prompt_ids(40, seed=3)  # longer than one attention chunk (32 / 16)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=32)[0, len(ids):].tolist()
    assert greedy(runner, ids, 32) == ref


@pytest.mark.parametrize("step", [1, 3, 7])
def test_incremental_equals_full_forward(tiny_ckpt, step):
    """Prefill in pieces of `step` tokens (1 = token by token) gives the full forward's logits."""
    runner = runner_for(tiny_ckpt, block_size=4)
    ids = prompt_ids(70, seed=4)
    ref = full_logits(runner, ids)
    blocks, outs, pos = None, [], 0
    for i in range(0, len(ids), step):
        chunk = ids[i:i + step]
        blocks = runner.kv.grow(0, pos + len(chunk))
        outs.append(runner.forward([StepSeq(0, chunk, pos, blocks, num_logits=len(chunk))]))
        pos += len(chunk)
    runner.kv.free(0)
    diff = (torch.cat(outs) - ref).abs().max().item()
    assert diff < ATOL, f"step={step}: {diff:.3g}"
    assert runner.kv.all_free


def test_batched_sequences_equal_alone(tiny_ckpt):
    runner = runner_for(tiny_ckpt)
    prompts = [prompt_ids(n, seed=10 + n) for n in (5, 40, 17)]
    alone = [full_logits(runner, p)[-1] for p in prompts]
    seqs = [StepSeq(i, p, 0, runner.kv.grow(i, len(p))) for i, p in enumerate(prompts)]
    together = runner.forward(seqs)
    for i in range(len(prompts)):
        runner.kv.free(i)
    assert (together - torch.stack(alone)).abs().max().item() < ATOL


def test_multimodal_layout_matches(ckpt_root):
    """A Llama4ForConditionalGeneration checkpoint (language_model. prefix, vision tower) loads and matches."""
    mm = make_ckpt(ckpt_root, "default", multimodal=True)
    from transformers import Llama4ForConditionalGeneration

    hf = Llama4ForConditionalGeneration.from_pretrained(mm, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model_from_checkpoint(open_checkpoint(mm), ModelSpec(dtype=torch.float32))
    runner = ModelRunner(model, max_seq_len=128, max_batch_size=1, block_size=8)
    ids = prompt_ids(50, seed=5)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    assert (full_logits(runner, ids) - ref).abs().max().item() < ATOL
