"""build_engine.py / maverick-build: checkpoint -> engine directory, or --dry-run memory plan."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maverick.checkpoint import CheckpointError
from maverick.checkpoint.quant_formats import detect_quant_format
from maverick.config import ConfigError, ModelConfig

from .engine_format import EngineError


def recorded_tp_size(checkpoint: Path, yaml_path: str | None) -> int | None:
    """The tp_size quantize.py recorded with a checkpoint, unless the YAML config sets one."""
    import json

    from .yaml_config import load_build_yaml

    if yaml_path and "tp_size" in load_build_yaml(yaml_path):
        return None
    f = checkpoint / "maverick_build.json"
    return json.loads(f.read_text()).get("tp_size") if f.exists() else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engine.py", description="Build a Maverick engine from a Llama 4 "
                                "checkpoint (Hugging Face BF16, ModelOpt FP8 or Meta FP8).")
    # each option also under trtllm-build's spelling, so deployment scripts carry over
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", "--checkpoint_dir", dest="checkpoint", help="Hugging Face checkpoint directory")
    src.add_argument("--preset", help="model preset for --dry-run without a checkpoint: maverick, scout, tiny")
    p.add_argument("--output", "--output_dir", dest="output", help="engine directory to write")
    p.add_argument("--config", help="engine config YAML (configs/*.yaml); flags below override it")
    p.add_argument("--tp-size", "--tp_size", dest="tp_size", type=int)
    p.add_argument("--ep-size", "--ep_size", "--moe_ep_size", dest="ep_size", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int)
    p.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=int)
    p.add_argument("--max-num-tokens", "--max_num_tokens", dest="max_num_tokens", type=int)
    p.add_argument("--kv-cache-block-size", "--tokens_per_block", dest="kv_cache_block_size", type=int,
                   help="tokens a KV block holds (default: chosen for the model, at most 64)")
    p.add_argument("--kv-cache-type", "--kv_cache_type", dest="kv_cache_type", choices=["paged"],
                   help="the KV cache is always paged")
    p.add_argument("--kv-cache-max-tokens", dest="kv_cache_max_tokens", type=int,
                   help="cap the KV pool at this many tokens a layer (TensorRT-LLM's kv_cache_config.max_tokens)")
    p.add_argument("--quant", dest="algo", choices=["FP8"], help="dry-run only: plan FP8 weights")
    p.add_argument("--kv-cache-dtype", choices=["fp8"], help="dry-run only: plan an FP8 KV cache")
    p.add_argument("--lm-head-quant-algo", choices=["FP8_PER_CHANNEL_PER_TOKEN"],
                   help="quantize lm_head's rows to FP8 here (activations per token): half its bytes, FP8 logits")
    p.add_argument("--speculative-model", "--speculative_model_dir", "--speculative_model", dest="speculative_model",
                   help="EAGLE-3 draft checkpoint (NVIDIA's LlamaForCausalLMEagle3 format) to build in beside the target")
    p.add_argument("--max-draft-len", "--max_draft_len", dest="max_draft_len", type=int,
                   help="draft tokens a step (speculative_config.max_draft_len)")
    p.add_argument("--decoding-type", "--decoding_type", dest="decoding_type", choices=["Eagle"],
                   help="speculative_config.decoding_type (Eagle: EAGLE-3, draft and target in one step)")
    p.add_argument("--target-arch", "--target_arch", dest="target_arch",
                   choices=["any", "sm90", "sm_90", "sm100", "sm_100"],
                   help="the GPU architecture the engine is for; loading it on another is refused (default: any)")
    p.add_argument("--dry-run", action="store_true", help="print the per-rank memory plan; read no weights")
    p.add_argument("--gpu-memory-gb", type=float, help="with --dry-run: say whether the plan fits this GPU")
    p.add_argument("--overwrite", action="store_true", help="replace an existing engine at --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from maverick.checkpoint.eagle3 import draft_config

    from .memory_plan import format_plan, plan
    from .yaml_config import build_config_from, speculative_config_from

    try:
        overrides = dict(tp_size=a.tp_size, ep_size=a.ep_size, dtype=a.dtype, max_batch_size=a.max_batch_size,
                         max_seq_len=a.max_seq_len, max_num_tokens=a.max_num_tokens,
                         kv_cache_block_size=a.kv_cache_block_size, kv_cache_max_tokens=a.kv_cache_max_tokens,
                         algo=a.algo,
                         kv_cache_algo="FP8" if a.kv_cache_dtype == "fp8" else None,
                         lm_head_quant_algo=a.lm_head_quant_algo, target_arch=a.target_arch)
        if overrides["tp_size"] is None and a.checkpoint:  # quantize.py --tp_size records it with the checkpoint
            overrides["tp_size"] = recorded_tp_size(Path(a.checkpoint), a.config)
        build = build_config_from(a.config, overrides)
        speculative = speculative_config_from(a.config, a.speculative_model, a.max_draft_len, a.decoding_type)
        if a.dry_run:
            cfg = ModelConfig.preset(a.preset) if a.preset else ModelConfig.from_pretrained(a.checkpoint)
            if a.checkpoint and build.quant.algo is None:  # plan what the checkpoint's format implies
                q = detect_quant_format(Path(a.checkpoint))
                if q.kind != "none":
                    build = build.replace(quant=q.build_quant())
            build = build.for_model(cfg)
            build.validate_for(cfg)
            draft = None
            if speculative is not None and speculative.speculative_model_dir:
                draft = draft_config(speculative.speculative_model_dir, cfg)
            print(format_plan(cfg, build, plan(cfg, build, draft), a.gpu_memory_gb))
            return 0
        if a.preset:
            raise ConfigError("--preset is for --dry-run; building an engine needs --checkpoint")
        if not a.output:
            raise ConfigError("--output is required to build an engine")
        if a.algo or a.kv_cache_dtype:
            raise ConfigError("--quant/--kv-cache-dtype apply to --dry-run; an engine's quantization follows its "
                              "checkpoint (run quantize.py to make an FP8 checkpoint)")
        from .builder import build_engine

        cfg = build_engine(a.checkpoint, a.output, build, progress=not a.no_progress, overwrite=a.overwrite,
                           speculative=speculative)
        print(f"engine written to {a.output}: tp_size={cfg.build.tp_size} dtype={cfg.build.dtype} "
              f"quant={cfg.build.quant.algo or 'none'} kv_cache={cfg.build.quant.kv_cache_algo or cfg.build.dtype} "
              f"lm_head={cfg.build.lm_head_quant_algo or cfg.build.dtype}"
              + (f" speculative=EAGLE-3 max_draft_len={cfg.speculative.max_draft_len}" if cfg.speculative else ""))
        return 0
    except (ConfigError, CheckpointError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
