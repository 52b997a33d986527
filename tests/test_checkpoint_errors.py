"""Malformed checkpoints stop the load with a message naming the tensor and the expected shape."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from maverick.checkpoint import CheckpointError, open_checkpoint
from maverick.config import ConfigError, ModelConfig


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor(tiny_ckpt, tmp_path):
    bad = _variant(tiny_ckpt, tmp_path / "c", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'.*\[32, 64\]"):
        open_checkpoint(bad)


def test_unexpected_tensor(tiny_ckpt, tmp_path):
    bad = _variant(tiny_ckpt, tmp_path / "c", lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        open_checkpoint(bad)


def test_wrong_shape(tiny_ckpt, tmp_path):
    def edit(t):
        t["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(64, 63)
    bad = _variant(tiny_ckpt, tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.o_proj\.weight' has shape \[64, 63\], expected \[64, 64\]"):
        open_checkpoint(bad)


def test_wrong_expert_shape(tiny_ckpt, tmp_path):
    def edit(t):
        t["model.layers.1.feed_forward.experts.gate_up_proj"] = torch.zeros(4, 64, 32)
    bad = _variant(tiny_ckpt, tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj' has shape \[4, 64, 32\], expected \[4, 64, 64\]"):
        open_checkpoint(bad)


def test_per_expert_layout_matches_fused(tiny_ckpt, tmp_path):
    """Re-exports that store experts one by one ([out, in] each) read as the fused tensors."""
    def edit(t):
        for layer in (1, 3):
            p = f"model.layers.{layer}.feed_forward.experts."
            gu, down = t.pop(p + "gate_up_proj"), t.pop(p + "down_proj")
            for e in range(gu.shape[0]):
                gate, up = gu[e].t().chunk(2, dim=0)
                t[f"{p}{e}.gate_proj.weight"] = gate.contiguous()
                t[f"{p}{e}.up_proj.weight"] = up.contiguous()
                t[f"{p}{e}.down_proj.weight"] = down[e].t().contiguous()
    per = _variant(tiny_ckpt, tmp_path / "c", edit)
    a, b = open_checkpoint(tiny_ckpt), open_checkpoint(per)
    for name in ("model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.3.feed_forward.experts.down_proj"):
        assert torch.equal(a.get(name), b.get(name))


def test_missing_expert(tiny_ckpt, tmp_path):
    def edit(t):
        p = "model.layers.1.feed_forward.experts."
        gu, down = t.pop(p + "gate_up_proj"), t.pop(p + "down_proj")
        for e in range(gu.shape[0] - 1):  # expert 3 left out
            gate, up = gu[e].t().chunk(2, dim=0)
            t[f"{p}{e}.gate_proj.weight"], t[f"{p}{e}.up_proj.weight"] = gate.contiguous(), up.contiguous()
            t[f"{p}{e}.down_proj.weight"] = down[e].t().contiguous()
    bad = _variant(tiny_ckpt, tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=r"experts \[3\] missing"):
        open_checkpoint(bad)


def test_pickled_weights_refused(tiny_ckpt, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(tiny_ckpt / "config.json", d / "config.json")
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        open_checkpoint(d)


def test_corrupt_safetensors(tiny_ckpt, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(tiny_ckpt, d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        open_checkpoint(d)


def test_sharded_checkpoint(tiny_ckpt, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(tiny_ckpt, d)
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / fname)
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    r = open_checkpoint(d)
    assert torch.equal(r.get("lm_head.weight"), tensors["lm_head.weight"])


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type="llama3"), "unsupported architecture"),
    (lambda c: c.pop("hidden_size"), "missing key 'hidden_size'"),
    (lambda c: c.update(num_key_value_heads=3), "num_attention_heads.*divisible by 3"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_bad_config(tiny_ckpt, edit, match):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    edit(cfg)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(cfg)


def test_tp_must_divide_heads(tiny_ckpt):
    cfg = open_checkpoint(tiny_ckpt).config
    with pytest.raises(ConfigError, match=r"num_attention_heads \(per tp_size\)=4 must be divisible by 3"):
        cfg.validate_parallel(3)


def test_presets():
    m = ModelConfig.preset("maverick")
    assert m.moe_layers == tuple(range(1, 48, 2)) and m.nope_layer_ids == tuple(range(3, 48, 4))
    assert m.local_heads(8) == 5 and m.local_kv_heads(8) == 1
    assert 395e9 < m.num_parameters() < 405e9  # "about 400B"
    s = ModelConfig.preset("scout")
    assert s.use_qk_norm and s.rope_scaling is not None and len(s.moe_layers) == 48
    with pytest.raises(ConfigError, match="unknown preset 'x'"):
        ModelConfig.preset("x")


def test_rope_scaling_matches_transformers():
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from maverick.config import PRESETS
    from maverick.layers.rotary import rope_inv_freq

    hf_cfg = Llama4TextConfig(**{k: v for k, v in PRESETS["scout"].items()})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert torch.allclose(rope_inv_freq(ModelConfig.preset("scout")), ref, rtol=1e-6, atol=0)
