"""Train an EAGLE-3 draft head for the bundled small model, and measure its acceptance through the engine.

    python scripts/train_eagle3.py train --out out/eagle3 --steps 3000     # one GPU, a few minutes
    python scripts/train_eagle3.py eval --draft maverick/data/shakespeare_eagle3 --device cpu

`train` distils from the model itself: prompts are windows of its calibration passages (no held-out text),
the model samples continuations of them (temperature 1), and the head learns, from the model's features
at three layers, to predict the model's next-token distribution (soft cross-entropy against its logits).
lm_head and the final norm start from the model's own. The training-time test of EAGLE-3 is unrolled: steps 2..S of a chain feed the head its own output feature,
with the attention a chain sees at inference (the positions fed with the model's features up to the
chain's start, then the chain's own earlier steps). Saved in NVIDIA's format (LlamaForCausalLMEagle3,
`midlayer.*`, `fc`, `d2t`), loadable by build_engine.py --speculative-model.

`eval` runs maverick's engine loop with the draft (runtime/speculative.py) on held-out prompts (windows of the test
plays) and prints the acceptance length (tokens a verify step yields) at K = 1..5, greedy and sampled.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "maverick" / "data" / "shakespeare"


def draft_hf_config(target_cfg: dict, aux: tuple[int, ...]) -> dict:
    t = target_cfg.get("text_config", target_cfg)
    return {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": t["hidden_size"],
            "intermediate_size": t["intermediate_size_mlp"], "num_attention_heads": t["num_attention_heads"],
            "num_key_value_heads": t["num_key_value_heads"], "head_dim": t["head_dim"], "num_hidden_layers": 1,
            "vocab_size": t["vocab_size"], "draft_vocab_size": t["vocab_size"], "rms_norm_eps": t["rms_norm_eps"],
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux)}}


class TrainDraft:
    """The draft's math (as maverick.layers.eagle3_layer computes it) over whole sequences, trainable, with
    the training-time test's attention."""

    def __init__(self, cfg: dict, target_hidden: int, device):
        import torch

        from maverick.config import Eagle3Config
        from maverick.layers.rotary import rope_inv_freq

        H, I = cfg["hidden_size"], cfg["intermediate_size"]
        self.nq, self.nkv, self.D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.eps = cfg["rms_norm_eps"]
        g = torch.Generator().manual_seed(0)

        def w(*shape, scale=None):
            t = torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)
            return t.to(device).requires_grad_()

        m = "midlayer."
        self.p = {"fc.weight": w(H, 3 * target_hidden), m + "input_layernorm.weight": w(H, scale=0) + 1,
                  m + "hidden_norm.weight": w(H, scale=0) + 1, m + "post_attention_layernorm.weight": w(H, scale=0) + 1,
                  m + "self_attn.q_proj.weight": w(self.nq * self.D, 2 * H),
                  m + "self_attn.k_proj.weight": w(self.nkv * self.D, 2 * H),
                  m + "self_attn.v_proj.weight": w(self.nkv * self.D, 2 * H),
                  m + "self_attn.o_proj.weight": w(H, self.nq * self.D, scale=0.02),
                  m + "mlp.gate_proj.weight": w(I, H), m + "mlp.up_proj.weight": w(I, H),
                  m + "mlp.down_proj.weight": w(H, I, scale=0.02), "norm.weight": w(H, scale=0) + 1,
                  "lm_head.weight": w(cfg["vocab_size"], H)}
        for k in [k for k in self.p if k.endswith("norm.weight")]:
            self.p[k] = self.p[k].detach().requires_grad_()
        ecfg = Eagle3Config(H, target_hidden, I, self.nq, self.nkv, self.D, cfg["vocab_size"], cfg["vocab_size"],
                            tuple(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]), rope_theta=cfg["rope_theta"])
        self.inv_freq = rope_inv_freq(ecfg).to(device)

    def params(self):
        return list(self.p.values())

    def _norm(self, x, name):
        import torch

        v = x.float().pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(v + self.eps) * self.p[name]

    def _rope(self, x, pos):
        from maverick.layers.eagle3_layer import rotate_half_rope

        ang = pos.float()[:, None] * self.inv_freq[None, :]
        B, T = x.shape[:2]
        return rotate_half_rope(x.flatten(0, 1), ang.cos().repeat(B, 1), ang.sin().repeat(B, 1)).view(x.shape)

    def unroll(self, emb, feats, steps: int):
        """emb [B, T+steps, H] embeddings of tokens 1.., feats [B, T, 3H]: the head's outputs [steps, B, T, H],
        step j at chain start p being position p + j fed token p + j + 1."""
        import torch
        import torch.nn.functional as F

        B, T = feats.shape[:2]
        m = "midlayer."
        h = F.linear(feats, self.p["fc.weight"])
        pos = torch.arange(T, device=feats.device)
        keys, vals, outs = [], [], []
        for j in range(steps):
            x = torch.cat([self._norm(emb[:, j:j + T], m + "input_layernorm.weight"),
                           self._norm(h, m + "hidden_norm.weight")], -1)
            q = F.linear(x, self.p[m + "self_attn.q_proj.weight"]).view(B, T, self.nq, self.D)
            k = F.linear(x, self.p[m + "self_attn.k_proj.weight"]).view(B, T, self.nkv, self.D)
            v = F.linear(x, self.p[m + "self_attn.v_proj.weight"]).view(B, T, self.nkv, self.D)
            q, k = self._rope(q, pos + j), self._rope(k, pos + j)
            keys.append(k)
            vals.append(v)
            # step 0 keys of positions <= p (the model's features), then this chain's own steps 1..j at p
            g = self.nq // self.nkv
            qh = q.transpose(1, 2)  # [B, nq, T, D]
            k0 = keys[0].repeat_interleave(g, 2).transpose(1, 2)
            s0 = qh @ k0.transpose(-1, -2) / math.sqrt(self.D)  # [B, nq, T, T]
            s0 = s0.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            diag = [(qh * keys[i].repeat_interleave(g, 2).transpose(1, 2)).sum(-1, keepdim=True) / math.sqrt(self.D)
                    for i in range(1, j + 1)]  # [B, nq, T, 1] each
            att = torch.softmax(torch.cat([s0, *diag], -1).float(), -1).to(q.dtype)
            o = att[..., :T] @ vals[0].repeat_interleave(g, 2).transpose(1, 2)
            for i in range(1, j + 1):
                o = o + att[..., T + i - 1:T + i] * vals[i].repeat_interleave(g, 2).transpose(1, 2)
            hh = h + F.linear(o.transpose(1, 2).reshape(B, T, -1), self.p[m + "self_attn.o_proj.weight"])
            n2 = self._norm(hh, m + "post_attention_layernorm.weight")
            y = F.silu(F.linear(n2, self.p[m + "mlp.gate_proj.weight"])) * F.linear(n2, self.p[m + "mlp.up_proj.weight"])
            h = hh + F.linear(y, self.p[m + "mlp.down_proj.weight"])
            outs.append(h)
        return outs

    def logits(self, out):
        import torch.nn.functional as F

        return F.linear(self._norm(out, "norm.weight"), self.p["lm_head.weight"]).float()


def _target(device):
    import torch
    from transformers import Llama4ForCausalLM

    model = Llama4ForCausalLM.from_pretrained(TARGET, dtype=torch.float32).to(device).eval()
    return model


def _features(model, ids, aux):
    """Residual stream after each aux layer [B, T, 3H] and the model's logits [B, T, V] (hooks on the layers:
    HF's last hidden_states entry is after the final norm)."""
    import torch

    got = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda mod, inp, out, i=i: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in set(aux)]
    try:
        logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([got[i] for i in aux], -1), logits


def train(a) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from maverick.config import Eagle3Config

    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    cfg = json.loads((TARGET / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    aux = Eagle3Config.default_aux_layer_ids(layers)
    dcfg = draft_hf_config(cfg, aux)
    model = _target(device)
    tok = AutoTokenizer.from_pretrained(TARGET)
    passages = [json.loads(line)["text"] for line in (TARGET / "calib.jsonl").read_text().splitlines()]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in passages]
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    data = []  # (tokens [B, P+N]) the model's own continuations of calibration windows
    with torch.no_grad():
        for _ in range(a.rounds):
            starts = [ids[int(torch.randint(len(ids), (1,), generator=gen))] for _ in range(a.batch)]
            prompts = []
            for s in starts:
                o = int(torch.randint(max(1, len(s) - a.prompt), (1,), generator=gen))
                prompts.append(s[o:o + a.prompt] + [0] * (a.prompt - len(s[o:o + a.prompt])))
            x = torch.tensor(prompts, device=device)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new, do_sample=True,
                                 temperature=1.0, top_k=0, pad_token_id=0)
            data.append(out.cpu())
    data = torch.cat(data)
    print(f"distillation data: {tuple(data.shape)} tokens from {len(passages)} calibration passages "
          f"({time.time() - t0:.0f} s)", flush=True)
    draft = TrainDraft(dcfg, cfg["hidden_size"], device)
    with torch.no_grad():  # start from the model's own output head and final norm: the draft predicts its tokens
        draft.p["lm_head.weight"].copy_(model.lm_head.weight)
        draft.p["norm.weight"].copy_(model.model.norm.weight)
    opt = torch.optim.AdamW(draft.params(), lr=a.lr, weight_decay=0.0)
    S, T = a.ttt, a.seq
    log = []
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        rows = torch.randint(len(data), (a.micro,), generator=gen)
        offs = torch.randint(data.shape[1] - T - S - 1, (1,), generator=gen).item()
        x = data[rows, offs:offs + T + S + 1].to(device)
        with torch.no_grad():
            feats, logits = _features(model, x, aux)
            emb = model.model.embed_tokens(x)
        outs = draft.unroll(emb[:, 1:], feats[:, :T], S)
        loss, accs = 0.0, []
        for j, out in enumerate(outs):  # step j at p predicts the token after p + j + 1: the model's logits there
            target = torch.softmax(logits[:, j + 1:j + 1 + T].float(), -1)
            lp = torch.log_softmax(draft.logits(out), -1)
            loss = loss + -(target * lp).sum(-1).mean() * (0.8 ** j)
            accs.append((lp.argmax(-1) == target.argmax(-1)).float().mean().item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.params(), 1.0)
        opt.step()
        if step % 200 == 0 or step == a.steps - 1:
            log.append({"step": step, "loss": loss.item(), "top1_agreement": accs})
            print(f"step {step} loss {loss.item():.3f} top-1 agreement by chain step "
                  + " ".join(f"{x:.3f}" for x in accs), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in draft.p.items()}
    tensors["d2t"] = torch.zeros(cfg["vocab_size"], dtype=torch.int64)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dcfg, indent=1))
    (out / "training.json").write_text(json.dumps({"steps": a.steps, "ttt_steps": S, "seq": T, "micro": a.micro,
                                                   "lr": a.lr, "seed": a.seed, "data_tokens": data.numel(),
                                                   "seconds": time.time() - t0, "log": log}, indent=1))
    print(f"draft written to {out} ({time.time() - t0:.0f} s)")
    return 0


def evaluate(a) -> int:
    import torch
    from transformers import AutoTokenizer

    from maverick.builder.from_checkpoint import load_model_from_checkpoint
    from maverick.checkpoint import open_checkpoint
    from maverick.checkpoint.eagle3 import read_eagle3
    from maverick.models import ModelSpec
    from maverick.models.eagle3 import Eagle3Draft
    from maverick.runtime.engine import EngineCore
    from maverick.runtime.model_runner import ModelRunner
    from maverick.runtime.sampling_params import SamplingParams

    device = torch.device(a.device)
    reader = open_checkpoint(TARGET)
    dcfg, weights = read_eagle3(a.draft, reader.config, torch.float32)
    draft = Eagle3Draft(dcfg, torch.float32)
    draft.load_state_dict(weights)
    draft = draft.to(device)
    tok = AutoTokenizer.from_pretrained(TARGET)
    test = tok((TARGET / "test.txt").read_text(), add_special_tokens=False)["input_ids"]
    step = len(test) // a.prompts
    prompts = [test[i * step:i * step + a.prompt] for i in range(a.prompts)]
    results = []
    for temperature in (0.0, 0.7):
        for k in range(1, 6):
            model = load_model_from_checkpoint(reader, ModelSpec(dtype=torch.float32)).to(device)
            runner = ModelRunner(model, max_seq_len=a.prompt + a.new + 16, max_batch_size=len(prompts),
                                 block_size=16, device=device)
            runner.attach_draft(draft, k)
            engine = EngineCore(runner, None, max_batch_size=len(prompts), max_num_tokens=a.prompt * len(prompts))
            for i, p in enumerate(prompts):
                engine.add_request(p, SamplingParams(max_tokens=a.new, temperature=temperature, seed=a.seed + i,
                                                     ignore_eos=True))
            while engine.has_unfinished():
                engine.step()
            stats = engine.spec_stats
            results.append({"k": k, "temperature": temperature, "acceptance_length": stats.acceptance_length,
                            "accepted": stats.accepted, "proposed": stats.proposed, "rounds": stats.rounds})
            print(f"K={k} temperature={temperature}: acceptance length {stats.acceptance_length:.2f} "
                  f"({stats.accepted}/{stats.proposed} draft tokens accepted, {stats.rounds} rounds)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"prompts": len(prompts), "prompt_tokens": a.prompt,
                                            "new_tokens": a.new, "device": str(device), "results": results},
                                           indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cuda")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--rounds", type=int, default=16, help="generation rounds of --batch prompts each")
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--prompt", type=int, default=32)
    t.add_argument("--new", type=int, default=224)
    t.add_argument("--seq", type=int, default=192, help="positions a training window feeds the head")
    t.add_argument("--ttt", type=int, default=3, help="chain steps unrolled (the training-time test)")
    t.add_argument("--micro", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("--draft", default=str(ROOT / "maverick" / "data" / "shakespeare_eagle3"))
    e.add_argument("--device", default="cpu")
    e.add_argument("--prompts", type=int, default=16)
    e.add_argument("--prompt", type=int, default=64)
    e.add_argument("--new", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json")
    a = p.parse_args(argv)
    return train(a) if a.cmd == "train" else evaluate(a)


if __name__ == "__main__":
    sys.exit(main())
