"""Frozen configuration: the model (from a Hugging Face config.json or a preset) and the build.

Every derived size is a property; every invariant is checked when the object is made, with a
message that names the key and the expected value.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact integer division; `what` names the quantity in the error message."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ConfigError(f"{what}={numerator} must be divisible by {denominator}")
    return numerator // denominator


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (Scout uses it, Maverick does not)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def from_hf(cls, rope: dict[str, Any]) -> "RopeScaling | None":
        """A config.json's rope_parameters / rope_scaling: llama3 scaling, or None for plain RoPE."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            return cls(float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        if rope_type not in ("default", None):
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r}: expected 'default' or 'llama3'")
        return None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # each routed expert and the shared expert
    intermediate_size_mlp: int  # dense FFN layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    no_rope_layers: tuple[int, ...]  # 1 = the layer uses RoPE (and chunked attention)
    attention_chunk_size: int
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1048576
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "num_local_experts", "num_experts_per_tok", "attention_chunk_size")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}={value!r}: expected a positive integer")
        divide(self.num_attention_heads, self.num_key_value_heads,
               "num_attention_heads (per num_key_value_heads)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim}: expected an even number (RoPE rotates pairs)")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok}: expected at most "
                              f"num_local_experts={self.num_local_experts}")
        if len(self.no_rope_layers) != self.num_hidden_layers:
            raise ConfigError(f"no_rope_layers has {len(self.no_rope_layers)} entries: expected "
                              f"num_hidden_layers={self.num_hidden_layers}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"moe_layers {bad}: expected layer ids in [0, {self.num_hidden_layers})")
        for name in ("bos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ConfigError(f"{name}={tid}: expected a token id in [0, {self.vocab_size})")

    # ---- derived sizes -------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        """RoPE layers use chunked local attention; NoPE layers are global."""
        return bool(self.no_rope_layers[layer])

    @property
    def rope_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.uses_rope(i))

    @property
    def nope_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if not self.uses_rope(i))

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i))

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def local_heads(self, tp_size: int) -> int:
        return divide(self.num_attention_heads, tp_size, "num_attention_heads (per tp_size)")

    def local_kv_heads(self, tp_size: int) -> int:
        return divide(self.num_key_value_heads, tp_size, "num_key_value_heads (per tp_size)")

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocabulary rounded up so every rank holds the same number of rows (multiple of 8)."""
        step = 8 * tp_size
        return (self.vocab_size + step - 1) // step * step

    def validate_parallel(self, tp_size: int, ep_size: int = 1) -> None:
        """Raise ConfigError unless the model shards evenly over tp_size ranks, experts over ep_size."""
        self.local_heads(tp_size)
        self.local_kv_heads(tp_size)
        if ep_size < 1 or tp_size % ep_size:
            raise ConfigError(f"ep_size={ep_size}: expected a divisor of tp_size={tp_size}")
        divide(self.num_local_experts, ep_size, "num_local_experts (per ep_size)")
        divide(self.intermediate_size, tp_size // ep_size, "intermediate_size (per tp_size/ep_size)")
        divide(self.intermediate_size, tp_size, "intermediate_size (shared expert, per tp_size)")
        divide(self.intermediate_size_mlp, tp_size, "intermediate_size_mlp (per tp_size)")

    def num_parameters(self) -> int:
        """Total parameter count (embeddings and lm_head included)."""
        h, q, kv = self.hidden_size, self.q_size, self.kv_size
        attn = h * (q + 2 * kv) + q * h + 2 * h
        dense = 3 * h * self.intermediate_size_mlp
        moe = (self.num_local_experts + 1) * 3 * h * self.intermediate_size + self.num_local_experts * h
        layers = sum(attn + (moe if self.is_moe_layer(i) else dense) for i in range(self.num_hidden_layers))
        return layers + 2 * self.vocab_size * h + h

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["no_rope_layers"] = list(self.no_rope_layers)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict (the engine's config.json); unknown keys are an error."""
        _reject_unknown(d, {f.name for f in dataclasses.fields(cls)}, "model config")
        d = dict(d)
        d["moe_layers"] = tuple(d["moe_layers"])
        d["no_rope_layers"] = tuple(d["no_rope_layers"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (Llama4Config or Llama4TextConfig)."""
        arch = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type == "llama4" or "text_config" in hf:
            if "text_config" not in hf:
                raise ConfigError("config.json: model_type 'llama4' needs a 'text_config' section")
            text = dict(hf["text_config"])
        elif model_type == "llama4_text":
            text = dict(hf)
        else:
            raise ConfigError(f"config.json: unsupported architecture {arch or model_type!r}: expected "
                              "model_type 'llama4' (Llama4ForConditionalGeneration) or 'llama4_text' "
                              "(Llama4ForCausalLM)")
        return cls._from_text_config(text)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.exists():
            raise ConfigError(f"{cfg_file}: no config.json found (expected a Hugging Face checkpoint)")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
        return cls.from_hf(hf)

    @classmethod
    def _from_text_config(cls, t: dict[str, Any]) -> "ModelConfig":
        def need(key: str) -> Any:
            if key not in t or t[key] is None:
                raise ConfigError(f"config.json: missing key '{key}' in the text config")
            return t[key]

        layers = need("num_hidden_layers")
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = t.get("head_dim") or hidden // heads
        step = t.get("interleave_moe_layer_step", 1)
        moe_layers = t.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, layers, step)) if step else []
        interval = t.get("no_rope_layer_interval", 4)
        no_rope = t.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]

        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        theta = rope.get("rope_theta", t.get("rope_theta", 500000.0))
        scaling = RopeScaling.from_hf(rope)
        if t.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={t['hidden_act']!r}: expected 'silu'")
        if t.get("attention_bias", False):
            raise ConfigError("attention_bias=true: expected false (Llama 4 has no attention bias)")
        eos = t.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        chunk = t.get("attention_chunk_size") or t.get("max_position_embeddings") or 8192
        return cls(
            vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            intermediate_size_mlp=t.get("intermediate_size_mlp") or need("intermediate_size"),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=t.get("num_key_value_heads") or heads, head_dim=head_dim,
            num_local_experts=t.get("num_local_experts", 1),
            num_experts_per_tok=t.get("num_experts_per_tok", 1),
            moe_layers=tuple(moe_layers), no_rope_layers=tuple(int(x) for x in no_rope),
            attention_chunk_size=chunk, rope_theta=float(theta), rope_scaling=scaling,
            use_qk_norm=bool(t.get("use_qk_norm", False)),
            attn_temperature_tuning=bool(t.get("attn_temperature_tuning", True)),
            floor_scale=float(t.get("floor_scale", 8192)), attn_scale=float(t.get("attn_scale", 0.1)),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(t.get("max_position_embeddings") or 1048576),
            bos_token_id=t.get("bos_token_id"), eos_token_ids=eos, pad_token_id=t.get("pad_token_id"),
        )

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls._from_text_config(PRESETS[name])


_LLAMA4_COMMON = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_experts_per_tok=1,
    attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
    rms_norm_eps=1e-5, max_position_embeddings=1048576, bos_token_id=200000,
    eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Llama 4 Maverick 17B-128E: dense and MoE layers alternate, no QK-norm, no RoPE scaling.
    "maverick": dict(_LLAMA4_COMMON, intermediate_size_mlp=16384, num_local_experts=128,
                     interleave_moe_layer_step=2, use_qk_norm=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # Llama 4 Scout 17B-16E: every layer MoE, QK-norm, llama3 RoPE scaling.
    "scout": dict(_LLAMA4_COMMON, intermediate_size_mlp=16384, num_local_experts=16,
                  interleave_moe_layer_step=1, use_qk_norm=True, max_position_embeddings=10485760,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
    # The bundled tiny default: every Maverick feature at toy size (see `python -m maverick.tiny_checkpoint --help`).
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                 attention_chunk_size=32, use_qk_norm=False, floor_scale=8, attn_scale=0.1,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 max_position_embeddings=4096, bos_token_id=1, eos_token_id=[2], pad_token_id=0),
}


def _reject_unknown(d: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected keys among {sorted(known)}")


DTYPES = ("bfloat16", "float16", "float32")
# FP8: ModelOpt per-tensor weights and static activation scales on every linear and expert.
# FP8_PER_CHANNEL_PER_TOKEN: Meta's FP8 Maverick: routed experts only, per-output-channel weight
# scales, activations quantized per token on the fly; everything else in `dtype`.
QUANT_ALGOS = (None, "FP8", "FP8_PER_CHANNEL_PER_TOKEN")
KV_CACHE_ALGOS = (None, "FP8")
# lm_head: kept in `dtype` (ModelOpt leaves it out), or FP8_PER_CHANNEL_PER_TOKEN: the builder quantizes each
# vocabulary row (scale amax / 448) and the activation is quantized per token on the fly. At TP8 its 258 MB
# of BF16 a rank are 12% of a decode step's bytes; FP8 halves them, at FP8's rounding of the logits.
LM_HEAD_ALGOS = (None, "FP8_PER_CHANNEL_PER_TOKEN")


@dataclass(frozen=True)
class QuantConfig:
    algo: str | None = None  # one of QUANT_ALGOS
    kv_cache_algo: str | None = None
    exclude_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.algo not in QUANT_ALGOS:
            raise ConfigError(f"quant.algo={self.algo!r}: expected one of {QUANT_ALGOS}")
        if self.kv_cache_algo not in KV_CACHE_ALGOS:
            raise ConfigError(f"quant.kv_cache_algo={self.kv_cache_algo!r}: expected one of {KV_CACHE_ALGOS}")


TARGET_ARCHS = {"any": None, "sm90": 9, "sm100": 10}  # name -> the compute capability's major version


@dataclass(frozen=True)
class BuildConfig:
    """What an engine is built for. Field names follow TensorRT-LLM's LLM API."""

    tp_size: int = 1
    ep_size: int = 1
    max_batch_size: int = 8
    max_seq_len: int = 8192
    max_num_tokens: int = 8192
    dtype: str = "bfloat16"
    kv_cache_block_size: int | None = None  # None: chosen for the model (for_model)
    quant: QuantConfig = field(default_factory=QuantConfig)
    # Decode steps of up to max_batch_size sequences replay the graph of the next size up (graph_batch_sizes);
    # an eager decode step is host-bound (one-rank TP8 on H200: 40.5 ms eager against 3.8 ms replayed for 16
    # tokens of prefill, the same launches).
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    # One sequence's prefill chunk replays a CUDA graph of the next token count up. Eager, a prefill is
    # host-bound up to about 2K tokens: one-rank TP8 on H200, eager -> graph: 16 tokens 40.5 ->
    # 3.8 ms, 128: 60.5 -> 12.7, 1024: 57.8 -> 32.8, 2048: 79.9 -> 54.9, but 4096: 111.4 -> 103.7, where
    # padding up to it would cost more than it saves. Sizes above max_num_tokens or max_seq_len are skipped.
    cuda_graph_prefill_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)
    # The GPU architecture the engine is for: "sm90" (Hopper), "sm100" (Blackwell) or "any". Loading on a GPU of
    # another architecture is refused (its tuned tables and kernel choices were made for this one).
    target_arch: str = "any"
    lm_head_quant_algo: str | None = None  # one of LM_HEAD_ALGOS
    # TensorRT-LLM's kv_cache_config.max_tokens: the KV pool holds at most this many tokens a layer (None: room
    # for max_batch_size sequences of max_seq_len); requests beyond it wait or are preempted and recomputed
    kv_cache_max_tokens: int | None = None

    def __post_init__(self) -> None:
        for key, lo, hi in (("tp_size", 1, 64), ("ep_size", 1, 64), ("max_batch_size", 1, 4096),
                            ("max_seq_len", 2, 1 << 24), ("max_num_tokens", 1, 1 << 20),
                            ("kv_cache_block_size", 1, 4096)):
            value = getattr(self, key)
            if key == "kv_cache_block_size" and value is None:
                continue
            if not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{key}={value!r}: expected an integer in [{lo}, {hi}]")
        if self.tp_size % self.ep_size:
            raise ConfigError(f"ep_size={self.ep_size}: expected a divisor of tp_size={self.tp_size}")
        if self.kv_cache_block_size is not None and self.kv_cache_block_size & (self.kv_cache_block_size - 1):
            raise ConfigError(f"kv_cache_block_size={self.kv_cache_block_size}: expected a power of two")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.target_arch not in TARGET_ARCHS:
            raise ConfigError(f"target_arch={self.target_arch!r}: expected one of {sorted(TARGET_ARCHS)}")
        if self.kv_cache_max_tokens is not None and (
                not isinstance(self.kv_cache_max_tokens, int) or self.kv_cache_max_tokens < (self.kv_cache_block_size or 1)):
            raise ConfigError(f"kv_cache_max_tokens={self.kv_cache_max_tokens!r}: expected an integer >= "
                              f"kv_cache_block_size={self.kv_cache_block_size}, or none")
        if self.lm_head_quant_algo not in LM_HEAD_ALGOS:
            raise ConfigError(f"lm_head_quant_algo={self.lm_head_quant_algo!r}: expected one of {LM_HEAD_ALGOS}")
        for key in ("cuda_graph_batch_sizes", "cuda_graph_prefill_tokens"):
            sizes = getattr(self, key)
            if not all(isinstance(b, int) and b >= 1 for b in sizes):
                raise ConfigError(f"{key}={sizes!r}: expected a list of positive integers")

    def check_device(self, capability: tuple[int, int] | None) -> None:
        """Refuse to run on a GPU of another architecture than target_arch (capability None: CPU, always fine)."""
        if capability is None or self.target_arch == "any":
            return
        if TARGET_ARCHS[self.target_arch] != capability[0]:
            raise ConfigError(f"this engine was built for target_arch={self.target_arch}, but the GPU is "
                              f"sm{capability[0]}{capability[1]}; rebuild it with target_arch: "
                              f"sm{capability[0]}{capability[1] if capability[0] < 10 else 0} (or any)")

    def kv_pool_blocks(self, model: ModelConfig) -> tuple[int, int]:
        """(global, local) KV blocks a rank's pools hold: max_batch_size sequences of max_seq_len in the global
        (NoPE) layers, of at most one chunk in the local rings, each capped at kv_cache_max_tokens. The runtime
        allocates these and the memory plan counts them."""
        block = self.kv_cache_block_size
        glob = self.max_batch_size * -(-self.max_seq_len // block)
        local = self.max_batch_size * -(-min(self.max_seq_len, model.attention_chunk_size) // block)
        if self.kv_cache_max_tokens is not None:
            cap = self.kv_cache_max_tokens // block
            glob, local = min(glob, cap), min(local, cap)
        return glob, local

    def graph_batch_sizes(self) -> list[int]:
        """The decode graph sizes a runtime of this build captures: the listed ones up to max_batch_size, and
        max_batch_size itself, so that no decode step runs eagerly."""
        return sorted({b for b in self.cuda_graph_batch_sizes if b < self.max_batch_size} | {self.max_batch_size})

    def graph_prefill_tokens(self) -> list[int]:
        """The prefill graph sizes a runtime of this build captures (within max_num_tokens and max_seq_len)."""
        return sorted(t for t in set(self.cuda_graph_prefill_tokens)
                      if 1 < t <= min(self.max_num_tokens, self.max_seq_len))

    def for_model(self, model: ModelConfig) -> "BuildConfig":
        """This config with a KV block size chosen where none was given: the largest power of two up to 64
        that divides attention_chunk_size (a local layer's ring holds whole blocks of one chunk): 64 for
        Maverick's 8192, 1 for a chunk of 11. An explicit block size is kept (and checked by validate_for)."""
        if self.kv_cache_block_size is not None:
            return self
        block = 64
        if model.attention_chunk_size < self.max_seq_len:
            while model.attention_chunk_size % block:
                block //= 2
        return self.replace(kv_cache_block_size=block)

    def validate_for(self, model: ModelConfig) -> None:
        if self.kv_cache_block_size is None:
            raise ConfigError("kv_cache_block_size is not chosen yet: call BuildConfig.for_model(model) first")
        model.validate_parallel(self.tp_size, self.ep_size)
        if model.attention_chunk_size % self.kv_cache_block_size and \
                model.attention_chunk_size < self.max_seq_len:
            raise ConfigError(f"kv_cache_block_size={self.kv_cache_block_size}: expected a divisor of "
                              f"attention_chunk_size={model.attention_chunk_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cuda_graph_batch_sizes"] = list(self.cuda_graph_batch_sizes)
        d["cuda_graph_prefill_tokens"] = list(self.cuda_graph_prefill_tokens)
        d["quant"]["exclude_modules"] = list(self.quant.exclude_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "build config") -> "BuildConfig":
        _reject_unknown(d, {f.name for f in dataclasses.fields(cls)}, where)
        d = dict(d)
        if "quant" in d:
            q = d["quant"] or {}
            if not isinstance(q, dict):
                raise ConfigError(f"{where}: quant must be a mapping, got {q!r}")
            _reject_unknown(q, {f.name for f in dataclasses.fields(QuantConfig)}, f"{where}.quant")
            q = dict(q)
            q["exclude_modules"] = tuple(q.get("exclude_modules", ()))
            d["quant"] = QuantConfig(**q)
        if isinstance(d.get("target_arch"), str):  # TensorRT-LLM's and nvcc's spelling: sm_90
            d["target_arch"] = d["target_arch"].replace("sm_", "sm")
        for key in ("cuda_graph_batch_sizes", "cuda_graph_prefill_tokens"):
            if key in d:
                if not isinstance(d[key], (list, tuple)):
                    raise ConfigError(f"{where}: {key} must be a list of positive integers, got {d[key]!r}")
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes: Any) -> "BuildConfig":
        return dataclasses.replace(self, **changes)


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]



EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


# The EAGLE-3 draft's linear layers by engine name (q|k|v and gate|up fused), in the order a step runs them.
DRAFT_LINEARS = ("fc", "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


@dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 draft head (NVIDIA's / the EAGLE authors' checkpoint format): one Llama decoder layer whose
    attention reads concat(input_layernorm(embedding), hidden_norm(h)) [T, 2H], over the target's hidden
    states at aux_layer_ids fused by `fc` (3 x target_hidden -> hidden), and an lm_head over draft_vocab_size
    ids (draft id d is target id d + d2t[d])."""

    hidden_size: int
    target_hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's: the embedding is the target's
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    # the linears stored in FP8 (ModelOpt's per-tensor format), by engine name: a subset of DRAFT_LINEARS
    fp8_linears: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        odd = [n for n in self.fp8_linears if n not in DRAFT_LINEARS]
        if odd:
            raise ConfigError(f"fp8_linears={list(self.fp8_linears)}: {odd} unknown; expected names from "
                              f"{list(DRAFT_LINEARS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if len(self.aux_layer_ids) != 3:
            raise ConfigError(f"eagle_aux_hidden_state_layer_ids={list(self.aux_layer_ids)}: expected 3 layer ids")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(f"draft_vocab_size={self.draft_vocab_size}: expected 1..vocab_size={self.vocab_size}")

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @staticmethod
    def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
        """Where no checkpoint says: early, middle and late layers, (1, L/2 - 1, L - 4) as NVIDIA's Maverick head
        ((1, 23, 44)); models under 8 layers (0, L/2, L - 1)."""
        if num_layers < 8:
            return (0, num_layers // 2, num_layers - 1)
        return (1, num_layers // 2 - 1, num_layers - 4)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], target: "ModelConfig") -> "Eagle3Config":
        """From an EAGLE-3 checkpoint's config.json, checked against the target model it drafts for."""
        arch = hf.get("architectures") or []
        if EAGLE3_ARCHITECTURE not in arch:
            raise ConfigError(f"architectures={arch}: expected [{EAGLE3_ARCHITECTURE!r}] (an EAGLE-3 draft head)")
        if hf.get("num_hidden_layers", 1) != 1:
            raise ConfigError(f"num_hidden_layers={hf['num_hidden_layers']}: this engine supports one draft layer")

        def need(key: str):
            if hf.get(key) is None:
                raise ConfigError(f"EAGLE-3 config.json: '{key}' is missing")
            return hf[key]

        hidden = need("hidden_size")
        target_hidden = hf.get("target_hidden_size") or hidden
        if target_hidden != target.hidden_size:
            raise ConfigError(f"target_hidden_size={target_hidden}: the target model's hidden_size is "
                              f"{target.hidden_size}")
        heads = need("num_attention_heads")
        ids = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        ids = tuple(int(i) for i in ids) if ids is not None else cls.default_aux_layer_ids(target.num_hidden_layers)
        bad = [i for i in ids if not 0 <= i < target.num_hidden_layers]
        if bad:
            raise ConfigError(f"eagle_aux_hidden_state_layer_ids={list(ids)}: {bad} out of range for a target of "
                              f"{target.num_hidden_layers} layers")
        vocab = need("vocab_size")
        if vocab != target.vocab_size:
            raise ConfigError(f"vocab_size={vocab}: the target model's vocab_size is {target.vocab_size}")
        scaling = RopeScaling.from_hf(hf.get("rope_scaling") or {})
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r}: expected 'silu'")
        return cls(hidden_size=hidden, target_hidden_size=target_hidden, intermediate_size=need("intermediate_size"),
                   num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hidden // heads, vocab_size=vocab,
                   draft_vocab_size=hf.get("draft_vocab_size") or vocab, aux_layer_ids=ids,
                   rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                   rope_theta=float(hf.get("rope_theta", 500000.0)), rope_scaling=scaling)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        d["fp8_linears"] = list(self.fp8_linears)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Eagle3Config":
        d = dict(d)
        _reject_unknown(d, {f.name for f in dataclasses.fields(cls)}, "speculative.draft")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["aux_layer_ids"] = tuple(d["aux_layer_ids"])
        d["fp8_linears"] = tuple(d.get("fp8_linears", ()))
        return cls(**d)


DECODING_TYPES = ("Eagle",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """TensorRT-LLM's speculative_config: decoding_type Eagle (EAGLE-3, one model: draft and target in one
    step), max_draft_len draft tokens a step, speculative_model_dir the draft checkpoint. In an engine the
    draft's own config rides along (`draft`), its weights in draft.safetensors."""

    max_draft_len: int
    decoding_type: str = "Eagle"
    speculative_model_dir: str | None = None
    draft: Eagle3Config | None = None

    def __post_init__(self) -> None:
        if self.decoding_type not in DECODING_TYPES:
            raise ConfigError(f"speculative_config.decoding_type={self.decoding_type!r}: expected one of "
                              f"{list(DECODING_TYPES)}")
        if not 1 <= self.max_draft_len <= 8:
            raise ConfigError(f"speculative_config.max_draft_len={self.max_draft_len}: expected 1..8")

    def to_dict(self) -> dict[str, Any]:
        return {"decoding_type": self.decoding_type, "max_draft_len": self.max_draft_len,
                "speculative_model_dir": self.speculative_model_dir,
                "draft": None if self.draft is None else self.draft.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "speculative_config") -> "SpeculativeConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        _reject_unknown(d, {"decoding_type", "max_draft_len", "speculative_model_dir", "draft"}, where)
        if "max_draft_len" not in d:
            raise ConfigError(f"{where}: 'max_draft_len' is missing")
        draft = d.pop("draft", None)
        return cls(**d, draft=None if draft is None else Eagle3Config.from_dict(draft))
