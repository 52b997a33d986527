"""A deterministic tiny random Llama 4 checkpoint in the real Hugging Face format, with an offline
tokenizer: the bundled default for the README's main job and for tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maverick.config import PRESETS

DATA = Path(__file__).parent / "data" / "calib.txt"

SPECIAL_TOKENS = ["<|finetune_right_pad|>", "<|begin_of_text|>", "<|eot|>", "<|end_of_text|>",
                  "<|header_start|>", "<|header_end|>"]
# The Llama 4 chat format: header-delimited roles, each turn closed by <|eot|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)

# The `tiny` preset of maverick.config, plus a larger init so greedy decoding has clear winners.
TINY_TEXT_CONFIG: dict[str, Any] = dict(PRESETS["tiny"], initializer_range=0.1)


def make_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the bundled text (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DATA.read_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                   pad_token="<|finetune_right_pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_checkpoint(output: str | Path, seed: int = 0, multimodal: bool = False,
                         dtype: str = "float32", **overrides: Any) -> Path:
    """Write a tiny random Llama 4 checkpoint to `output` and return its path.

    `overrides` change the text config (e.g. use_qk_norm=True, num_experts_per_tok=2).
    multimodal=True writes the Llama4ForConditionalGeneration layout with a tiny vision tower.
    """
    import torch
    from transformers import (Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration,
                              Llama4TextConfig)

    output = Path(output)
    text = dict(TINY_TEXT_CONFIG, **overrides)
    torch.manual_seed(seed)
    if multimodal:
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      image_size=56, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                      projector_output_dim=64, pixel_shuffle_ratio=0.5)
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision))
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**text))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(output)
    tokenizer = make_tokenizer(text["vocab_size"])
    tokenizer.save_pretrained(output)
    assert len(tokenizer) <= text["vocab_size"], "tokenizer larger than the model vocabulary"
    (output / "maverick_tiny.json").write_text(json.dumps({"seed": seed, "overrides": overrides}, indent=1))
    return output


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m maverick.tiny_checkpoint",
                                description="Write a tiny random Llama 4 checkpoint (HF format, offline tokenizer).")
    p.add_argument("--output", default="tiny/checkpoint", help="directory to write (default: tiny/checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multimodal", action="store_true", help="Llama4ForConditionalGeneration layout")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--override", default="{}", help='JSON text-config overrides, e.g. \'{"use_qk_norm": true}\'')
    a = p.parse_args(argv)
    out = make_tiny_checkpoint(a.output, seed=a.seed, multimodal=a.multimodal, dtype=a.dtype,
                               **json.loads(a.override))
    print(f"tiny Llama 4 checkpoint written to {out}")


if __name__ == "__main__":
    main()
