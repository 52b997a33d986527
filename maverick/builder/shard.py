"""Fuse and shard checkpoint tensors into one rank's engine tensors (the `rule`s of the name table).

All reshaping happens here, once, at build time; the runtime never slices a weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from maverick.checkpoint import names as N
from maverick.config import ModelConfig, divide


@dataclass(frozen=True)
class RankLayout:
    cfg: ModelConfig
    tp_size: int
    tp_rank: int
    ep_size: int = 1

    @property
    def moe_tp(self) -> int:
        return self.tp_size // self.ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank % self.moe_tp

    @property
    def ep_rank(self) -> int:
        return self.tp_rank // self.moe_tp


def _rows(w: torch.Tensor, parts: int, index: int, dim: int = 0) -> torch.Tensor:
    size = divide(w.shape[dim], parts, f"dim {dim} of a {list(w.shape)} tensor")
    return w.narrow(dim, index * size, size)


def _replicate(ts, lay: RankLayout):
    return ts[0]


def _qkv(ts, lay: RankLayout):
    q, k, v = ts
    return torch.cat([_rows(q, lay.tp_size, lay.tp_rank), _rows(k, lay.tp_size, lay.tp_rank),
                      _rows(v, lay.tp_size, lay.tp_rank)])


def _gate_up(ts, lay: RankLayout):
    gate, up = ts
    return torch.cat([_rows(gate, lay.tp_size, lay.tp_rank), _rows(up, lay.tp_size, lay.tp_rank)])


def _columns(ts, lay: RankLayout):
    return _rows(ts[0], lay.tp_size, lay.tp_rank, dim=1)


def _vocab_rows(ts, lay: RankLayout):
    w = ts[0]
    padded = lay.cfg.padded_vocab_size(lay.tp_size)
    if padded > w.shape[0]:
        w = torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])])
    return _rows(w, lay.tp_size, lay.tp_rank)


def _local_experts(w: torch.Tensor, lay: RankLayout) -> torch.Tensor:
    return _rows(w, lay.ep_size, lay.ep_rank)


def _experts_gate_up(ts, lay: RankLayout):
    # HF bmm layout [E, H, 2I] -> engine [E_local, 2 * I_local, H]: gate rows then up rows, [out, in]
    w = _local_experts(ts[0], lay).transpose(1, 2)
    gate, up = w.chunk(2, dim=1)
    return torch.cat([_rows(gate, lay.moe_tp, lay.moe_tp_rank, 1), _rows(up, lay.moe_tp, lay.moe_tp_rank, 1)], 1)


def _experts_down(ts, lay: RankLayout):
    # HF [E, I, H] -> engine [E_local, H, I_local]
    w = _local_experts(ts[0], lay).transpose(1, 2)
    return _rows(w, lay.moe_tp, lay.moe_tp_rank, 2)


def _experts_gate_up_scale(ts, lay: RankLayout):
    # per-channel scales [E, 2I] (gate then up) -> [E_local, 2 * I_local], matching _experts_gate_up
    gate, up = _local_experts(ts[0], lay).chunk(2, dim=1)
    return torch.cat([_rows(gate, lay.moe_tp, lay.moe_tp_rank, 1), _rows(up, lay.moe_tp, lay.moe_tp_rank, 1)], 1)


def _experts_down_scale(ts, lay: RankLayout):
    # per-channel scales [E, H]: the output dim is not sharded
    return _local_experts(ts[0], lay)


RULES: dict[str, Callable] = {
    "experts_gate_up_scale": _experts_gate_up_scale, "experts_down_scale": _experts_down_scale,
    "replicate": _replicate, "qkv": _qkv, "gate_up": _gate_up, "columns": _columns,
    "vocab_rows": _vocab_rows, "experts_gate_up": _experts_gate_up, "experts_down": _experts_down,
}


def iter_entries(cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(engine name, canonical checkpoint sources, rule) for every engine tensor."""
    for e in N.GLOBAL:
        yield e.engine, e.sources, e.rule
    for i in range(cfg.num_hidden_layers):
        for e in N.layer_entries(cfg, i):
            yield f"layers.{i}.{e.engine}", tuple(N.layer_prefix(i) + s for s in e.sources), e.rule


def shard_tensor(rule: str, tensors: list[torch.Tensor], lay: RankLayout, dtype: torch.dtype) -> torch.Tensor:
    """Apply the rule; FP8 tensors keep their bits, everything else is cast to `dtype`."""
    out = RULES[rule](tensors, lay)
    return (out if out.dtype == torch.float8_e4m3fn else out.to(dtype)).contiguous()
