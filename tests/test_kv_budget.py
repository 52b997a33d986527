"""The KV pool a rank allocates (TensorRT-LLM's kv_cache_config): the engine's plan, capped by max_tokens,
shrunk to free_gpu_memory_fraction of what loading left free; refused with the numbers when one sequence of
max_seq_len cannot fit."""
import pytest

from maverick.builder.memory_plan import draft_slot_bytes, kv_bytes_per_token, workspace_bytes
from maverick.runtime.engine_loader import open_engine
from maverick.runtime.kv_budget import KvCacheConfig, pool_blocks


def _plan_bytes(cfg) -> int:
    """Bytes of the engine's whole planned pool (and a draft's per-slot caches)."""
    g, loc = cfg.build.kv_pool_blocks(cfg.model)
    g_tok, l_tok = kv_bytes_per_token(cfg.model, cfg.build)
    if cfg.speculative is not None:
        g_tok += draft_slot_bytes(cfg.speculative.draft, cfg.build)
    return (g * g_tok + loc * l_tok) * cfg.build.kv_cache_block_size


def test_the_plan_where_nothing_is_measured_or_it_fits(tiny_engine):
    cfg = open_engine(tiny_engine, verify=False)
    plan = cfg.build.kv_pool_blocks(cfg.model)
    assert pool_blocks(cfg, KvCacheConfig(), None) == plan
    work = sum(workspace_bytes(cfg.model, cfg.build))
    roomy = work + int(_plan_bytes(cfg) / 0.9) + 4096
    assert pool_blocks(cfg, KvCacheConfig(), roomy) == plan  # never more than the plan


def test_max_tokens_caps_both_pools(tiny_engine):
    cfg = open_engine(tiny_engine, verify=False)
    block = cfg.build.kv_cache_block_size
    plan_g, plan_l = cfg.build.kv_pool_blocks(cfg.model)
    cap = cfg.build.max_seq_len // block + 5
    assert cap < plan_g
    assert pool_blocks(cfg, KvCacheConfig(max_tokens=cap * block), None) == (cap, min(plan_l, cap))


@pytest.mark.parametrize("engine", ["tiny_engine", "tiny_engine_spec"])
def test_a_pool_that_does_not_fit_shrinks_to_the_fraction_of_free_memory(request, engine):
    cfg = open_engine(request.getfixturevalue(engine), verify=False)
    plan_g, plan_l = cfg.build.kv_pool_blocks(cfg.model)
    work = sum(workspace_bytes(cfg.model, cfg.build))
    free = work + _plan_bytes(cfg) // 2
    g, loc = pool_blocks(cfg, KvCacheConfig(free_gpu_memory_fraction=0.8), free)
    assert g < plan_g and loc < plan_l
    g_tok, l_tok = kv_bytes_per_token(cfg.model, cfg.build)
    if cfg.speculative is not None:  # the draft's KV and features live in the same global slots
        g_tok += draft_slot_bytes(cfg.speculative.draft, cfg.build)
    used = (g * g_tok + loc * l_tok) * cfg.build.kv_cache_block_size
    assert 0.8 * (free - work) * 0.95 < used <= 0.8 * (free - work)


def test_a_pool_too_small_for_one_sequence_is_refused_with_the_numbers(tiny_engine):
    cfg = open_engine(tiny_engine, verify=False)
    work = sum(workspace_bytes(cfg.model, cfg.build))
    with pytest.raises(MemoryError, match=rf"one sequence of max_seq_len={cfg.build.max_seq_len} needs .* raise "
                                          "kv_cache_config.free_gpu_memory_fraction"):
        pool_blocks(cfg, KvCacheConfig(), work + 1000)
    with pytest.raises(MemoryError, match="room for 0 tokens"):
        pool_blocks(cfg, KvCacheConfig(max_tokens=1), None)


@pytest.mark.parametrize("value,match", [
    ({"free_gpu_memory_fraction": 0}, r"free_gpu_memory_fraction=0: expected a number in \(0, 1\]"),
    ({"free_gpu_memory_fraction": 1.5}, "free_gpu_memory_fraction=1.5"),
    ({"max_tokens": -3}, "max_tokens=-3: expected a positive integer"),
    ({"max_tokens": 2.5}, "max_tokens=2.5"),
    ({"enable_block_reuse": True}, r"unknown key\(s\) \['enable_block_reuse'\]"),
    (0.9, "expected a mapping"),
])
def test_bad_kv_cache_config_is_named(value, match):
    with pytest.raises(ValueError, match=match):
        KvCacheConfig.of(value)


def test_llm_takes_kv_cache_config(tiny_engine):
    from maverick import LLM, KvCacheConfig as Exported, SamplingParams

    assert Exported is KvCacheConfig
    cfg = open_engine(tiny_engine, verify=False)
    block = cfg.build.kv_cache_block_size
    tokens = cfg.build.max_seq_len + 3 * block
    with LLM(tiny_engine, device="cpu", kv_cache_config={"max_tokens": tokens}) as llm:
        kv = llm.engine.runner.kv
        assert (kv.global_pool.num_blocks, kv.local_pool.num_blocks) == pool_blocks(cfg, KvCacheConfig(max_tokens=tokens), None)
        assert kv.global_pool.num_blocks == tokens // block
        out = llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    with pytest.raises(ValueError, match="free_gpu_memory_fraction=2"):
        LLM(tiny_engine, device="cpu", kv_cache_config={"free_gpu_memory_fraction": 2})


def test_server_yaml_options_accept_kv_cache_config(tmp_path):
    import argparse

    from maverick.serve.cli import llm_options

    opts = tmp_path / "llm.yaml"
    opts.write_text("kv_cache_config:\n  free_gpu_memory_fraction: 0.85\n")
    a = argparse.Namespace(extra_llm_api_options=str(opts), tp_size=None, max_batch_size=None, max_num_tokens=None)
    assert llm_options(a) == {"kv_cache_config": {"free_gpu_memory_fraction": 0.85}}
