"""Calibrate and quantize a Hugging Face Llama 4 checkpoint to FP8 with NVIDIA ModelOpt, and export
it in ModelOpt's Hugging Face format (the format NVIDIA publishes its FP8 checkpoints in).
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from maverick.builder.builder import TOKENIZER_FILES
from maverick.tiny_checkpoint import DATA



@dataclass
class QuantizeSummary:
    output: Path
    quantized_tensors: int
    excluded_modules: list[str]
    kv_cache_fp8: bool
    calib_samples: int

    def __str__(self) -> str:
        return (f"FP8 checkpoint written to {self.output}: {self.quantized_tensors} FP8 weight tensors, "
                f"KV cache {'FP8' if self.kv_cache_fp8 else 'high precision'}, calibrated on "
                f"{self.calib_samples} samples; kept in high precision: {', '.join(self.excluded_modules)}")


def fp8_config(kv_cache_fp8: bool) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if kv_cache_fp8:
        kv = copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
        q = cfg["quant_cfg"]
        cfg["quant_cfg"] = q + kv if isinstance(q, list) else {**q, **kv}
    # the vision tower of a multimodal checkpoint is not part of a text engine: leave it alone
    disable = [{"quantizer_name": "*vision_model*", "enable": False},
               {"quantizer_name": "*multi_modal_projector*", "enable": False}]
    q = cfg["quant_cfg"]
    cfg["quant_cfg"] = q + disable if isinstance(q, list) else {**q, "*vision_model*": {"enable": False},
                                                                  "*multi_modal_projector*": {"enable": False}}
    return cfg


def calibration_texts(path: str | Path | None, size: int) -> list[str]:
    """`size` samples from a text file (one sample a line) or a .jsonl file ({"text": ...} a line, for samples
    that span lines), cycled if it holds fewer."""
    source = Path(path) if path else DATA
    if not source.exists():
        raise FileNotFoundError(f"--calib-data {source}: file not found (expected one text sample per line, or "
                                f"a .jsonl file of {{\"text\": ...}} objects)")
    lines = [ln for ln in source.read_text().splitlines() if ln.strip()]
    if source.suffix == ".jsonl":
        try:
            lines = [json.loads(ln)["text"] for ln in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--calib-data {source}: expected one JSON object with a \"text\" string a line "
                             f"({type(e).__name__}: {e})") from None
    if not lines:
        raise ValueError(f"--calib-data {source}: no non-empty samples to calibrate on")
    return [lines[i % len(lines)] for i in range(size)]


def load_hf_model(model_dir: Path, device: str):
    from transformers import AutoConfig, Llama4ForCausalLM, Llama4ForConditionalGeneration

    cfg = AutoConfig.from_pretrained(model_dir)
    cls = Llama4ForConditionalGeneration if cfg.model_type == "llama4" else Llama4ForCausalLM
    if cfg.model_type not in ("llama4", "llama4_text"):
        raise ValueError(f"{model_dir}: model_type={cfg.model_type!r}; expected a Llama 4 checkpoint")
    return cls.from_pretrained(model_dir, dtype="auto").to(device).eval()


def quantize_model(model, tokenizer, texts: list[str], seq_len: int, kv_cache_fp8: bool, progress: bool = True):
    """ModelOpt FP8 (per-tensor weights and activations) calibrated on texts; returns the fake-quant model."""
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device

    def forward_loop(m):
        for t in tqdm(texts, desc="calibrate", unit="sample", disable=not progress):
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=seq_len).input_ids.to(device)
            with torch.no_grad():
                m(input_ids=ids)

    return mtq.quantize(model, fp8_config(kv_cache_fp8), forward_loop)


def quantize_checkpoint(model_dir: str | Path, output: str | Path, kv_cache_fp8: bool = False,
                        calib_data: str | Path | None = None, calib_size: int = 32, calib_seq_len: int = 256,
                        device: str = "cpu", progress: bool = True) -> QuantizeSummary:
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoTokenizer

    model_dir, output = Path(model_dir), Path(output)
    if calib_size < 1 or calib_seq_len < 1:
        raise ValueError(f"calib_size={calib_size}, calib_seq_len={calib_seq_len}: expected positive integers")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_hf_model(model_dir, device)
    texts = calibration_texts(calib_data, calib_size)
    model = quantize_model(model, tokenizer, texts, calib_seq_len, kv_cache_fp8, progress)
    export_hf_checkpoint(model, export_dir=output)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, output / name)
    hq = json.loads((output / "hf_quant_config.json").read_text())["quantization"]
    from safetensors import safe_open

    n_fp8 = 0
    for f in output.glob("*.safetensors"):
        h = safe_open(str(f), "pt")
        n_fp8 += sum(h.get_slice(k).get_dtype() == "F8_E4M3" for k in h.keys())
    return QuantizeSummary(output, n_fp8, list(hq.get("exclude_modules") or []), kv_cache_fp8, len(texts))
