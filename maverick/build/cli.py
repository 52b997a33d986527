"""build_engine.py / maverick-build: checkpoint -> engine directory, or --dry-run memory plan."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maverick.checkpoint import CheckpointError
from maverick.checkpoint.quant_formats import detect_quant_format
from maverick.config import ConfigError, ModelConfig

from .engine_format import EngineError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engine.py", description="Build a Maverick engine from a Llama 4 "
                                "checkpoint (Hugging Face BF16, ModelOpt FP8 or Meta FP8).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Hugging Face checkpoint directory")
    src.add_argument("--preset", help="model preset for --dry-run without a checkpoint: maverick, scout, tiny")
    p.add_argument("--output", help="engine directory to write")
    p.add_argument("--config", help="engine config YAML (configs/*.yaml); flags below override it")
    p.add_argument("--tp-size", type=int)
    p.add_argument("--ep-size", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--max-num-tokens", type=int)
    p.add_argument("--kv-cache-block-size", type=int)
    p.add_argument("--quant", dest="algo", choices=["FP8"], help="dry-run only: plan FP8 weights")
    p.add_argument("--kv-cache-dtype", choices=["fp8"], help="dry-run only: plan an FP8 KV cache")
    p.add_argument("--lm-head-quant-algo", choices=["FP8_PER_CHANNEL_PER_TOKEN"],
                   help="quantize lm_head's rows to FP8 here (activations per token): half its bytes, FP8 logits")
    p.add_argument("--dry-run", action="store_true", help="print the per-rank memory plan; read no weights")
    p.add_argument("--gpu-memory-gb", type=float, help="with --dry-run: say whether the plan fits this GPU")
    p.add_argument("--overwrite", action="store_true", help="replace an existing engine at --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from .memory_plan import format_plan, plan
    from .yaml_config import build_config_from

    try:
        overrides = dict(tp_size=a.tp_size, ep_size=a.ep_size, dtype=a.dtype, max_batch_size=a.max_batch_size,
                         max_seq_len=a.max_seq_len, max_num_tokens=a.max_num_tokens,
                         kv_cache_block_size=a.kv_cache_block_size, algo=a.algo,
                         kv_cache_algo="FP8" if a.kv_cache_dtype == "fp8" else None,
                         lm_head_quant_algo=a.lm_head_quant_algo)
        build = build_config_from(a.config, overrides)
        if a.dry_run:
            cfg = ModelConfig.preset(a.preset) if a.preset else ModelConfig.from_pretrained(a.checkpoint)
            if a.checkpoint and build.quant.algo is None:  # plan what the checkpoint's format implies
                q = detect_quant_format(Path(a.checkpoint))
                if q.kind != "none":
                    build = build.replace(quant=q.build_quant())
            build.validate_for(cfg)
            print(format_plan(cfg, build, plan(cfg, build), a.gpu_memory_gb))
            return 0
        if a.preset:
            raise ConfigError("--preset is for --dry-run; building an engine needs --checkpoint")
        if not a.output:
            raise ConfigError("--output is required to build an engine")
        if a.algo or a.kv_cache_dtype:
            raise ConfigError("--quant/--kv-cache-dtype apply to --dry-run; an engine's quantization follows its "
                              "checkpoint (run quantize.py to make an FP8 checkpoint)")
        from .builder import build_engine

        cfg = build_engine(a.checkpoint, a.output, build, progress=not a.no_progress, overwrite=a.overwrite)
        print(f"engine written to {a.output}: tp_size={cfg.build.tp_size} dtype={cfg.build.dtype} "
              f"quant={cfg.build.quant.algo or 'none'} kv_cache={cfg.build.quant.kv_cache_algo or cfg.build.dtype} "
              f"lm_head={cfg.build.lm_head_quant_algo or cfg.build.dtype}")
        return 0
    except (ConfigError, CheckpointError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
