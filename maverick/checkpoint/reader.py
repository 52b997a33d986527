"""Read a Hugging Face Llama 4 checkpoint (CausalLM or ConditionalGeneration layout, fused or
per-expert experts, single file or sharded) under canonical `Llama4ForCausalLM` names.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from maverick.config import ConfigError, ModelConfig

from . import names as N
from .errors import CheckpointError
from .quant_formats import QuantFormat, detect_quant_format
from .safetensors_files import SafetensorsFiles

_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale)$")


class CheckpointReader:
    """Canonical name -> tensor. `validate()` checks names and shapes against the config."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory does not exist")
        try:
            self.config = ModelConfig.from_pretrained(self.path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.quant: QuantFormat = detect_quant_format(self.path)
        self.files = SafetensorsFiles(self.path)
        self._direct: dict[str, str] = {}  # canonical -> stored name
        self._per_expert: dict[str, dict[int, dict[str, str]]] = {}  # canonical experts prefix -> e -> proj -> stored
        for stored in self.files.names():
            name = stored
            if name.startswith(N.IGNORED_PREFIXES):
                continue
            if name.startswith(N.MULTIMODAL_PREFIX):
                name = name[len(N.MULTIMODAL_PREFIX):]
            m = _PER_EXPERT.match(name)
            if m:
                key = m.group(3) + ("_scale" if m.group(4) == "weight_scale" else "")
                self._per_expert.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[key] = stored
            else:
                self._direct[name] = stored

    # ---- names and shapes ----------------------------------------------------------------
    def names(self) -> list[str]:
        out = list(self._direct)
        for prefix, experts in self._per_expert.items():
            out += [prefix + ".gate_up_proj", prefix + ".down_proj"]
            if "gate_proj_scale" in experts.get(0, {}):
                out += [prefix + ".gate_up_proj_weight_scale", prefix + ".down_proj_weight_scale"]
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._direct:
            return self.files.shape(self._direct[name])
        prefix, proj = name.rsplit(".", 1)
        experts = self._per_expert[prefix]
        E = len(experts)
        inter, hidden = self.files.shape(experts[0]["gate_proj"])
        return {"gate_up_proj": (E, hidden, 2 * inter), "down_proj": (E, inter, hidden),
                "gate_up_proj_weight_scale": (E, 2 * inter), "down_proj_weight_scale": (E, hidden)}[proj]

    def validate(self) -> None:
        """Stop on a missing, unexpected or misshapen tensor, naming it and the expected shape."""
        expected = dict(N.expected_shapes(self.config))
        expected.update(self.quant.expected_extra_shapes(self.config))
        have = set(self.names())
        for prefix, experts in self._per_expert.items():
            want = set(range(self.config.num_local_experts))
            missing = sorted(want - set(experts))
            if missing:
                raise CheckpointError(f"{self.path}: {prefix}: experts {missing[:8]} missing "
                                      f"(expected {self.config.num_local_experts} experts)")
            for e, projs in experts.items():
                for p in ("gate_proj", "up_proj", "down_proj"):
                    if p not in projs:
                        raise CheckpointError(f"{self.path}: missing tensor '{prefix}.{e}.{p}.weight'")
                    if self.quant.kind == "meta_fp8" and p + "_scale" not in projs:
                        raise CheckpointError(f"{self.path}: missing tensor '{prefix}.{e}.{p}.weight_scale' "
                                              "(per-channel scale of an FP8 expert)")
                    if p + "_scale" in projs:
                        rows = self.files.shape(projs[p])[0]
                        got = self.files.shape(projs[p + "_scale"])
                        if tuple(got) not in ((rows, 1), (rows,)):
                            raise CheckpointError(f"{self.path}: tensor '{prefix}.{e}.{p}.weight_scale' has shape "
                                                  f"{list(got)}, expected [{rows}, 1]")
        missing = sorted(set(expected) - have)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor '{missing[0]}'{more} "
                                  f"(expected shape {list(expected[missing[0]])})")
        unexpected = sorted(have - set(expected))
        if unexpected:
            more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
            raise CheckpointError(f"{self.path}: unexpected tensor '{unexpected[0]}'{more} "
                                  "(not part of a Llama 4 text model with this config)")
        for name, want in expected.items():
            got = self.shape(name)
            if tuple(got) != tuple(want):
                raise CheckpointError(f"{self.path}: tensor '{name}' has shape {list(got)}, "
                                      f"expected {list(want)}")
        for name in self.quant.fp8_sources(self.config):
            dt = self.dtype_name(name)
            if dt != "F8_E4M3":
                raise CheckpointError(f"{self.path}: tensor '{name}' is {dt}, expected F8_E4M3 "
                                      f"({self.quant.kind} checkpoint)")

    def dtype_name(self, name: str) -> str:
        if name in self._direct:
            return self.files.dtype_name(self._direct[name])
        prefix, proj = name.rsplit(".", 1)
        return self.files.dtype_name(self._per_expert[prefix][0]["gate_proj"])

    # ---- data ----------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """The stored tensor under its canonical name (FP8 tensors stay FP8)."""
        if name in self._direct:
            return self.files.get(self._direct[name])
        prefix, proj = name.rsplit(".", 1)
        experts = self._per_expert.get(prefix)
        if experts is None:
            raise CheckpointError(f"{self.path}: missing tensor '{name}'")
        E = len(experts)
        get = self.files.get
        if proj == "gate_up_proj":  # [out, in] per expert -> HF's bmm layout [E, H, 2I]
            return torch.stack([torch.cat([get(experts[e]["gate_proj"]).t(), get(experts[e]["up_proj"]).t()], dim=1)
                                for e in range(E)])
        if proj == "down_proj":
            return torch.stack([get(experts[e]["down_proj"]).t() for e in range(E)])
        if proj == "gate_up_proj_weight_scale":  # per output channel: [E, 2I], gate then up
            return torch.stack([torch.cat([get(experts[e]["gate_proj_scale"]).reshape(-1),
                                           get(experts[e]["up_proj_scale"]).reshape(-1)]) for e in range(E)])
        return torch.stack([get(experts[e]["down_proj_scale"]).reshape(-1) for e in range(E)])


def open_checkpoint(path: str | Path) -> CheckpointReader:
    reader = CheckpointReader(path)
    reader.validate()
    return reader
