"""Shared test helpers: tiny checkpoints of several configs, HF references, greedy loops."""
from __future__ import annotations

from pathlib import Path

import torch

from maverick.builder.from_checkpoint import load_model_from_checkpoint
from maverick.checkpoint import open_checkpoint
from maverick.models import ModelSpec
from maverick.runtime.step import StepSeq
from maverick.runtime.model_runner import ModelRunner
from maverick.tiny_checkpoint import make_tiny_checkpoint

# Together these cover: dense and MoE layers, RoPE and NoPE layers, prompts crossing a chunk boundary
# (chunk 32 / 16 and 80-token prompts), temperature tuning active (floor_scale 8 / 4: the scale moves
# off 1.0 from position 7 / 3), QK-norm on and off, top-1 and top-2 routing, llama3 RoPE scaling.
CONFIGS = {
    # Maverick-like: dense/MoE alternate, no QK-norm, top-1, NoPE every 4th layer.
    "default": {},
    # Scout-like: every layer MoE, QK-norm, top-2, llama3 RoPE scaling, more experts.
    "scout_like": dict(interleave_moe_layer_step=1, use_qk_norm=True, num_experts_per_tok=2, num_local_experts=8,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16}),
    # Odd layout: NoPE on alternate layers, chunk 16, GQA 4:1, QK-norm, MoE only on layer 2.
    "mixed": dict(num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0], attention_chunk_size=16, floor_scale=4,
                  num_key_value_heads=1, use_qk_norm=True, moe_layers=[2], num_local_experts=2),
}


def make_ckpt(root: Path, name: str, multimodal: bool = False) -> Path:
    out = Path(root) / (name + ("_mm" if multimodal else ""))
    if not (out / "config.json").exists():
        make_tiny_checkpoint(out, multimodal=multimodal,
                             dtype="float32", **CONFIGS[name])
    return out


def hf_model(path: Path):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def runner_for(path: Path, tp_size: int = 1, tp_rank: int = 0, block_size: int = 8, max_seq_len: int = 256,
               max_batch_size: int = 4, dtype=torch.float32, ep_size: int = 1) -> ModelRunner:
    model = load_model_from_checkpoint(open_checkpoint(path), ModelSpec(tp_size, tp_rank, ep_size, dtype=dtype))
    return ModelRunner(model, max_seq_len=max_seq_len, max_batch_size=max_batch_size, block_size=block_size)


def prompt_ids(n: int, seed: int = 0, vocab: int = 500) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


def full_logits(runner: ModelRunner, ids: list[int], seq_id: int = 0) -> torch.Tensor:
    blocks = runner.kv.grow(seq_id, len(ids))
    out = runner.forward([StepSeq(seq_id, ids, 0, blocks, num_logits=len(ids))])
    runner.kv.free(seq_id)
    return out


def greedy(runner: ModelRunner, ids: list[int], new_tokens: int, step: int = 0, seq_id: int = 0) -> list[int]:
    """Prefill (whole prompt, or `step` tokens at a time), then decode one token per step."""
    out: list[int] = []
    pos = 0
    chunks = [ids] if step == 0 else [ids[i:i + step] for i in range(0, len(ids), step)]
    for chunk in chunks:
        blocks = runner.kv.grow(seq_id, pos + len(chunk))
        logits = runner.forward([StepSeq(seq_id, chunk, pos, blocks)])
        pos += len(chunk)
    tok = int(logits[-1].argmax())
    out.append(tok)
    while len(out) < new_tokens:
        blocks = runner.kv.grow(seq_id, pos + 1)
        logits = runner.forward([StepSeq(seq_id, [tok], pos, blocks)])
        pos += 1
        tok = int(logits[-1].argmax())
        out.append(tok)
    runner.kv.free(seq_id)
    return out


def one_token_step_logits(runner: ModelRunner, ids: list[int], seq_id: int = 0) -> torch.Tensor:
    """Prefill all but the last token, then the last one as a one-token step: that step's logits."""
    blocks = runner.kv.grow(seq_id, len(ids))
    runner.forward([StepSeq(seq_id, ids[:-1], 0, blocks)])
    out = runner.forward([StepSeq(seq_id, ids[-1:], len(ids) - 1, blocks)])
    runner.kv.free(seq_id)
    return out
