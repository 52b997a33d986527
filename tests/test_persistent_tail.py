"""A decoder layer's tail after attention as persistent-chain stages (maverick/layers/persistent_tail.py),
taken from a built model: the stages' reference equals the layer's own ops, and the chain kernel (the
Triton interpreter on CPU) follows the reference."""
import pytest
import torch

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model():
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig

    cfg = ModelConfig.preset("tiny")  # dense layers 0 and 2, MoE layers 1 and 3
    build = BuildConfig(max_seq_len=64, max_batch_size=2, kv_cache_block_size=16, quant=QuantConfig("FP8", None),
                        dtype="bfloat16")
    model = synthetic_model(cfg, build, 0, DEV, seed=4)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # norm weights other than 1, so a stage with the wrong norm shows
        for layer in model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
    return model


@pytest.mark.parametrize("layer_id", [0, 1, 3])
def test_layer_tail_stages_are_the_layers_ops(model, layer_id):
    """o_proj + residual, the FFN (dense, or MoE: router, shared and routed experts) with its norm and
    residual, the next layer's qkv of its normed input (the last layer: the residual stream): the stages'
    reference against the layer's modules (o_proj + residual bit-exact; the FFN within bf16 roundings: the
    stages take SwiGLU in fp32 as the GPU kernels do, where the CPU modules take it on bf16 outputs, and add
    the shared and routed experts' outputs to the stream one after the other), the same expert picked, and
    the chain kernel against the reference."""
    import maverick_plugins as ops
    from maverick.layers.persistent_tail import layer_tail_stages
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import gemv_chain_ref

    layer = model.layers[layer_id]
    nxt = model.layers[layer_id + 1] if layer_id + 1 < len(model.layers) else None
    stages = layer_tail_stages(layer, nxt)
    q, H = layer.self_attn.o_proj.weight.shape[1], model.cfg.hidden_size
    chain = GemvChain(stages, rows=4, eps=model.cfg.rms_norm_eps, inputs=(q, H))
    gen = torch.Generator().manual_seed(layer_id)
    for call in range(2):
        o = torch.randn(1, q, generator=gen).to(DEV, torch.bfloat16)
        x = (4 * torch.randn(1, H, generator=gen)).to(DEV, torch.bfloat16)
        with torch.no_grad():
            h = x + layer.self_attn.o_proj(o)
            h2 = h + layer.feed_forward(layer.post_attention_layernorm(h))
            want = nxt.self_attn.qkv_proj(nxt.input_layernorm(h2)) if nxt is not None else h2
        ref = gemv_chain_ref((o, x), stages, model.cfg.rms_norm_eps)
        ffn_out = len(stages) - (2 if nxt is not None else 1)
        assert torch.equal(ref[0], h.reshape(-1)), call
        # the qkv after it within 0.03 (0.35-0.6 with the wrong layer's norm weight)
        assert rel(ref[ffn_out], h2) < 1e-2 and rel(ref[-1], want) < 0.06, call
        if layer.is_moe:
            assert int(ref[1].argmax()) == int(ops.moe_router(layer.post_attention_layernorm(h),
                                                              layer.feed_forward.router.weight, 1)[0]), call
        got = chain(o, x).clone()
        # CPU: loose, the interpreter rounds to e4m3 its own way (a SwiGLU output alone: up to 0.28)
        assert rel(chain.output(ffn_out), ref[ffn_out]) < (1e-2 if GPU else 0.15), call
        assert rel(got, ref[-1]) < (2e-2 if GPU else 0.3), call


def test_layer_tail_refuses_what_it_cannot_run(model):
    from maverick.layers.persistent_tail import layer_tail_stages

    layer = model.layers[1]
    top_k = layer.feed_forward.top_k
    layer.feed_forward.top_k = 2
    try:
        with pytest.raises(ValueError, match="layer 1: the persistent tail takes top-1 FP8 experts"):
            layer_tail_stages(layer)
    finally:
        layer.feed_forward.top_k = top_k


def test_layer_tail_shares_the_modules_weights(model):
    """share_weights: the layer's weights become views of the chain's packed buffer (one copy in memory),
    the layer's own ops still give the same output, and a weight whose K needs padding is refused."""
    import copy

    from maverick.layers.persistent_tail import layer_tail_stages
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage

    layer = copy.deepcopy(model.layers[1])
    q, H = layer.self_attn.o_proj.weight.shape[1], model.cfg.hidden_size
    n2 = torch.randn(1, H, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    with torch.no_grad():
        before = layer.feed_forward(n2)
    chain = GemvChain(layer_tail_stages(layer), inputs=(q, H), share_weights=True)
    base, end = chain.weights.data_ptr(), chain.weights.data_ptr() + chain.weights.numel()
    for w in (layer.self_attn.o_proj.weight, layer.feed_forward.experts.gate_up_proj,
              layer.feed_forward.shared_expert.down_proj.weight):
        assert base <= w.data_ptr() < end, w.shape
    assert chain.router_weights.data_ptr() == layer.feed_forward.router.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(layer.feed_forward(n2), before)
    w8 = torch.zeros(8, 24, dtype=torch.float8_e4m3fn, device=DEV)
    with pytest.raises(ValueError, match=r"share_weights needs K a multiple of 16, got a weight \[8, 24\]"):
        GemvChain([ChainStage(w8, torch.ones(8, device=DEV), torch.ones((), device=DEV))], share_weights=True)


def test_one_token_steps_through_the_tails_match_the_layers(model, monkeypatch):
    """MAVERICK_PERSISTENT=1: a runner's one-token steps run each layer as attention + its tail (here the
    tails' reference); the logits of a decode step match the layer-by-layer forward within the tails'
    roundings, the same top token (up to near ties), and prefill (many tokens) keeps the layers. A bad value is refused."""
    from helpers import one_token_step_logits, prompt_ids

    from maverick.runtime.model_runner import ModelRunner

    ids = prompt_ids(12, seed=3, vocab=500)

    want = one_token_step_logits(ModelRunner(model, 64, 2, 16, device=DEV), ids)
    monkeypatch.setenv("MAVERICK_PERSISTENT", "1")
    try:
        runner = ModelRunner(model, 64, 2, 16, device=DEV)
        assert model.tails is not None and len(model.tails) == len(model.layers)
        got = one_token_step_logits(runner, ids)
    finally:
        model.tails = None
    # 0.045 here over 4 layers (the stream after the tail's qkv stage instead: 1.3)
    assert rel(got, want) < 0.1
    # the top token, or one the layer-by-layer step ranks within the roundings' reach of it (random weights
    # give near ties: on an H100 the top token differed at a relative difference of 0.031)
    top, last = int(got[-1].argmax()), want[-1].float()
    assert last[top] >= last.max() - 2 * (got[-1].float() - last).abs().max()
    monkeypatch.setenv("MAVERICK_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="MAVERICK_PERSISTENT='yes': expected 0 or 1"):
        ModelRunner(model, 64, 2, 16, device=DEV)


def test_layer_tails_share_one_workspace_and_carry_the_stream_in_place(model):
    """Two layers' tail chains in one workspace, the second reading the first's residual stream where it
    lies (no copy): the same output as the second chain alone with that stream copied in; a workspace too
    small, and an input placed off the alignment, refused."""
    from maverick.layers.persistent_tail import layer_tail_stages
    from maverick_plugins.kernels.persistent_chain import GemvChain, footprint

    q, H = model.layers[0].self_attn.o_proj.weight.shape[1], model.cfg.hidden_size
    s0, s1 = layer_tail_stages(model.layers[0], model.layers[1]), layer_tail_stages(model.layers[1], model.layers[2])
    ws = torch.zeros(footprint(s0, (q, H)) + footprint(s1, (q, H)), dtype=torch.bfloat16, device=DEV)
    a = GemvChain(s0, rows=4, inputs=(q, H), workspace=ws)
    b = GemvChain(s1, rows=4, inputs=(q, H), workspace=ws, start=a.end, input_at=(None, a.spans[-2][0]))
    alone = GemvChain(s1, rows=4, inputs=(q, H))
    gen = torch.Generator().manual_seed(2)
    o0, o1 = (torch.randn(1, q, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
    x = (4 * torch.randn(1, H, generator=gen)).to(DEV, torch.bfloat16)
    a(o0, x)
    stream = a.output(-2)
    assert stream.data_ptr() == b.act[b.input_offs[1]:].data_ptr()  # b's input 1 is a's output
    got = b(o1, stream).clone()
    assert torch.equal(got, alone(o1, stream.clone()))
    with pytest.raises(ValueError, match="workspace: expected bf16 with at least"):
        GemvChain(s1, inputs=(q, H), workspace=ws[:10])
    with pytest.raises(ValueError, match="input 1 at element 5: expected a multiple of 16"):
        GemvChain(s1, inputs=(q, H), input_at=(None, 5))
