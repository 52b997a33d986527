"""GPU checks (run on a GPU machine: `pytest -m gpu -o addopts=''`)."""
import pytest
import torch

from helpers import prompt_ids
from maverick import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("GPU test collected on a machine without CUDA: run it with -m gpu on a GPU machine")


def test_cuda_greedy_equals_cpu(tiny_engine):
    """The whole runtime on CUDA (reference ops) gives the CPU path's greedy tokens (fp32 engine): three prompts
    (max_num_tokens 64: the first step prefills 40 + 9 tokens and 15 of the third eagerly, the next runs the
    two decode rows' graph and the third's last 35 tokens in the 64-token prefill graph), and one 100-token
    prompt alone, both its chunks (64 + 36 tokens) in the 64-token prefill graph."""
    prompts = [prompt_ids(40, seed=3), prompt_ids(9, seed=4), prompt_ids(50, seed=6)]
    alone = prompt_ids(100, seed=5)
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(tiny_engine, device="cpu") as cpu:
        ref = [o.outputs[0].token_ids for o in cpu.generate(prompts, p) + cpu.generate([alone], p)]
    with LLM(tiny_engine, device="cuda") as gpu:
        assert gpu.engine.runner.graphs.prefill_tokens == [16, 32, 64]
        got = [o.outputs[0].token_ids for o in gpu.generate(prompts, p) + gpu.generate([alone], p)]
        assert gpu.kv_cache.all_free
    assert got == ref


def _last_token_logits(runner, prompts, tokens, kernels, eager_rows=None):
    """Prefill (reference path), then teacher-forced decode steps feeding `tokens` [steps][seq]."""
    from maverick_plugins import dispatch

    from maverick.layers.forward_batch import ForwardBatch
    from maverick.runtime.step import StepSeq
    from maverick.runtime.staging import to_device

    runner.kernel_options = dispatch.KernelOptions(enabled=False)
    seqs = [StepSeq(i, p, 0, runner.kv.grow(i, len(p))) for i, p in enumerate(prompts)]
    runner.forward(seqs)
    runner.kernel_options = dispatch.KernelOptions(enabled=kernels)
    out = []
    for step, toks in enumerate(tokens):
        cur = [len(p) + step for p in prompts]
        seqs = [StepSeq(i, [toks[i]], cur[i], runner.kv.grow(i, cur[i] + 1)) for i in range(len(prompts))]
        if eager_rows:  # eager, with exactly the padded shapes the graph of that size was captured with
            with torch.inference_mode(), dispatch.use(runner.kernel_options):
                batch = ForwardBatch(**to_device(runner._padded(seqs, (eager_rows, 1)).tensors(), "cuda"))
                out.append(runner.model(batch, runner.kv_caches)[:len(seqs)])
        else:
            out.append(runner.forward(seqs).clone())
    for i in range(len(prompts)):
        runner.kv.free(i)
    runner.kernel_options = dispatch.KernelOptions()
    return torch.stack(out)


@pytest.mark.parametrize("kv,seqs", [(None, 3), ("FP8", 3), (None, 1)])
def test_kernels_and_cuda_graphs(kv, seqs):
    """Tiny preset, random FP8 weights in engine layout, 12 teacher-forced decode steps of 3 sequences (or
    one: the one-token paths, moe_block's pick in pass 1 and its shared rows that skip the PDL wait):
    (1) CUDA-graph replays equal eager execution of the same kernels bit for bit; (2) the kernels
    equal the reference path up to FP8 rounding (the GEMM kernel accumulates in another order, and a
    flipped e4m3 rounding downstream moves a random model's logits by a few percent; an indexing or
    scale bug moves them by 100%)."""
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig
    from maverick.runtime.model_runner import ModelRunner

    cfg = ModelConfig.preset("tiny")
    build = BuildConfig(max_seq_len=256, max_batch_size=4, kv_cache_block_size=16, quant=QuantConfig("FP8", kv),
                        dtype="float32")  # fp32 activations: the kernels' and the reference's roundings agree
    model = synthetic_model(cfg, build, 0, "cuda", seed=1)
    prompts = [prompt_ids(40, seed=1, vocab=500), prompt_ids(7, seed=2, vocab=500), prompt_ids(70, seed=3, vocab=500)]
    prompts = prompts[:seqs]
    tokens = torch.randint(4, 500, (12, seqs), generator=torch.Generator().manual_seed(0)).tolist()
    graphed = ModelRunner(model, 256, 4, 16, device="cuda")
    graphed.capture_cuda_graphs([1, 2, 4])
    g = _last_token_logits(graphed, prompts, tokens, kernels=True)
    e = _last_token_logits(ModelRunner(model, 256, 4, 16, device="cuda"), prompts, tokens, kernels=True,
                       eager_rows=4 if seqs > 1 else 1)
    r = _last_token_logits(ModelRunner(model, 256, 4, 16, device="cuda"), prompts, tokens, kernels=False)
    assert torch.equal(g, e)
    rel = ((e - r).norm(dim=-1) / r.norm(dim=-1)).max().item()
    assert rel < 0.05, rel
    print(f"kv={kv}: kernels vs reference, worst per-row relative logit difference {rel:.3f}")


@pytest.mark.parametrize("kv", [None, "FP8"])
def test_prefill_cuda_graphs(kv):
    """One sequence's prompt chunks replay prefill graphs padded up to 16, 32 or 64 tokens (7 -> 16, 40 -> 64,
    and 30 + 33 crossing a 32-token attention chunk with context -> 32, 64). Tiny preset in bf16 with FP8
    weights (the grouped-GEMM MoE path eagerly and in the graph alike): the logits equal the same padded batch
    run eagerly bit for bit, so does the KV cache (the padding writes only the scratch block), and the
    unpadded eager prefill is within bf16/FP8 rounding."""
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig
    from maverick.layers.forward_batch import ForwardBatch
    from maverick.runtime.step import StepSeq
    from maverick.runtime.model_runner import ModelRunner
    from maverick.runtime.staging import to_device

    cfg = ModelConfig.preset("tiny")
    build = BuildConfig(max_seq_len=256, max_batch_size=2, kv_cache_block_size=16, quant=QuantConfig("FP8", kv))
    model = synthetic_model(cfg, build, 0, "cuda", seed=3)
    graphed = ModelRunner(model, 256, 2, 16, device="cuda")
    graphed.capture_cuda_graphs([1, 2], [16, 32, 64])
    padded, plain = ModelRunner(model, 256, 2, 16, device="cuda"), ModelRunner(model, 256, 2, 16, device="cuda")
    cases = [([7], (1, 16)), ([40], (1, 64)), ([30, 33], (1, 32))]
    for seq_id, (chunks, first_shape) in enumerate(cases):
        ids = prompt_ids(sum(chunks), seed=20 + seq_id, vocab=500)
        pos = 0
        for n in chunks:
            seq = {r: [StepSeq(seq_id, ids[pos:pos + n], pos, r.kv.grow(seq_id, pos + n))]
                   for r in (graphed, padded, plain)}
            shape = graphed._graphable(seq[graphed])
            assert shape == (first_shape if pos == 0 else (1, 64)), shape
            g = graphed.forward(seq[graphed]).clone()
            with torch.inference_mode():
                batch = ForwardBatch(**to_device(padded._padded(seq[padded], shape).tensors(), "cuda"))
                e = padded.model(batch, padded.kv_caches)
            assert torch.equal(g, e), (seq_id, pos)
            ref = plain.forward(seq[plain])
            rel = ((g - ref).norm() / ref.norm()).item()
            # other kernels unpadded (7 tokens: the split-KV decode attention, bf16 probabilities) and FP8
            # roundings flipped downstream: 0.054 measured on H200 (FP8 KV); a padding or index bug gives O(1)
            assert rel < 0.1, (seq_id, pos, rel)
            pos += n
        for (kg, vg), (ke, ve) in zip(graphed.kv_caches, padded.kv_caches):
            assert torch.equal(kg[:-1], ke[:-1]) and torch.equal(vg[:-1], ve[:-1])
        for r in (graphed, padded, plain):
            r.kv.free(seq_id)


def test_graphed_sampler_equals_eager():
    """The sampler graph replayed after the forward graph samples exactly what sample() gives eagerly on
    the same logits (top-k, top-p, min-p, seeds, greedy rows mixed in), and an all-greedy step (the
    argmax shortcut) gives the argmax; padded rows never leak into the result."""
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig
    from maverick.layers.sampler import sample
    from maverick.runtime.step import StepSeq
    from maverick.runtime.model_runner import ModelRunner
    from maverick.layers.sampler import SamplingRows

    cfg = ModelConfig.preset("tiny")
    build = BuildConfig(max_seq_len=128, max_batch_size=4, kv_cache_block_size=16, quant=QuantConfig("FP8", None))
    runner = ModelRunner(synthetic_model(cfg, build, 0, "cuda", seed=2), 128, 4, 16, device="cuda")
    runner.capture_cuda_graphs([1, 4])
    prompts = [prompt_ids(20, seed=5, vocab=500), prompt_ids(33, seed=6, vocab=500), prompt_ids(9, seed=7, vocab=500)]
    runner.forward([StepSeq(i, p, 0, runner.kv.grow(i, len(p))) for i, p in enumerate(prompts)])
    rows = SamplingRows(temperature=[0.9, 0.0, 1.3], top_k=[40, 0, 0], top_p=[0.9, 1.0, 0.5],
                        min_p=[0.0, 0.0, 0.05], seeds=[11, 12, 13], offsets=[0, 4, 9])
    for step in range(6):
        seqs = [StepSeq(i, [7 + step], len(p) + step, runner.kv.grow(i, len(p) + step + 1))
                for i, p in enumerate(prompts)]
        logits, tokens = runner.step(seqs, rows)
        assert runner._graphable(seqs) == (4, 1) and logits.shape[0] == 3 and tokens.shape == (3,)
        expect = sample(logits.clone(), rows.to_tensors("cuda"))
        assert torch.equal(tokens, expect), (tokens, expect)
        assert tokens[1] == logits[1].argmax()
        greedy = SamplingRows([0.0] * 3, [0] * 3, [1.0] * 3, [0.0] * 3, [1, 2, 3], [0] * 3)
        rows.offsets = [o + 1 for o in rows.offsets]
    seqs = [StepSeq(i, [3], len(p) + 6, runner.kv.grow(i, len(p) + 7)) for i, p in enumerate(prompts)]
    logits, tokens = runner.step(seqs, greedy)
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize("chunk", [None, 32])
def test_decode_attention_bf16(chunk):
    """bf16 models take the bf16 tensor-core path (the Triton interpreter multiplies bf16 dots' raw bit patterns)."""
    import maverick_plugins as ops
    from maverick_plugins.kernels.decode_attention import decode_attention
    from test_kernels import _attention_case

    args = list(_attention_case(2, 3, [20, 45], chunk, False))
    for i in (0, 1, 2, 3, 4):  # q, k, v and the caches in bf16
        args[i] = args[i].to(torch.bfloat16)
    ref = ops.paged_attention_ref(*args).float()
    (q, k, v, kc, vc, table, ctx, qi, qp, t2p, sc, ch, ks, vs) = args
    out = decode_attention(q, k, v, kc, vc, table, ctx, qi, qp, sc, ch, ks, vs).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2  # probabilities rounded to bf16 for the PV product


@pytest.mark.parametrize("Q,ctx,chunk,fp8", [(1000, [0, 300], None, False), (1000, [0, 300], 512, False),
                                             (700, [1200, 0], 1024, True), (130, [64, 0], None, True)])
def test_prefill_attention_at_model_shapes(Q, ctx, chunk, fp8):
    """Maverick per-rank TP8 attention shapes (5 query heads per kv head, head_dim 128, 64-token blocks), bf16
    activations, against the reference; then the kernel's time against the reference's in the same run."""
    import maverick_plugins as ops
    from maverick_plugins.kernels.prefill_attention import prefill_attention

    torch.manual_seed(0)
    B, kvh, group, D, bs = 2, 1, 5, 128, 64
    H = kvh * group
    nb = (max(ctx) + Q + bs - 1) // bs
    if chunk is not None:
        nb = min(nb, chunk // bs)
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    kc = torch.randn(B * nb + 1, bs, kvh, D, device="cuda").to(dt)
    vc = torch.randn(B * nb + 1, bs, kvh, D, device="cuda").to(dt)
    table = torch.randperm(B * nb, device="cuda").view(B, nb)
    T = B * Q
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, kvh, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, kvh, D, device="cuda", dtype=torch.bfloat16)
    qi = torch.arange(T, device="cuda").view(B, Q)
    ctx_t = torch.tensor(ctx, device="cuda")
    qp = ctx_t[:, None] + torch.arange(Q, device="cuda")[None, :]
    s = torch.tensor(0.25, device="cuda") if fp8 else None
    args = (q, k, v, kc, vc, table, ctx_t, qi, qp, torch.arange(T, device="cuda"), D ** -0.5, chunk, s, s)
    ref = ops.paged_attention_ref(*args).float()
    out = prefill_attention(q, k, v, kc, vc, table, ctx_t, qi, qp, D ** -0.5, chunk, s, s).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2  # bf16 probabilities in the PV product

    def ms(fn):
        fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(5):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 5

    t_k = ms(lambda: prefill_attention(q, k, v, kc, vc, table, ctx_t, qi, qp, D ** -0.5, chunk, s, s))
    t_r = ms(lambda: ops.paged_attention_ref(*args))
    print(f"prefill attention Q={Q} ctx={ctx} chunk={chunk} fp8={fp8}: kernel {t_k:.3f} ms, reference {t_r:.3f} ms")


@pytest.mark.parametrize("rows,dynamic", [(False, False), (True, False), (True, True)])
def test_fp8_linear_cublas_equals_reference(rows, dynamic):
    import maverick_plugins as ops

    torch.manual_seed(0)
    x, w = torch.randn(100, 256, device="cuda", dtype=torch.bfloat16), torch.randn(128, 256, device="cuda")
    ws = (w.abs().amax(1) / 448) if rows else (w.abs().max() / 448)
    w8 = (w / (ws[:, None] if rows else ws)).to(torch.float8_e4m3fn)
    xs = None if dynamic else torch.tensor(4 / 448, device="cuda")
    got = ops.fp8.fp8_linear_cublas(x, w8, ws.float(), xs, torch.bfloat16).float()
    ref = ops.fp8_linear_ref(x, w8, ws.float(), xs, torch.bfloat16).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2  # bf16 output rounding


@pytest.mark.parametrize("T,offset,dynamic", [(64, 0, False), (256, 0, False), (37, 4, False), (64, 0, True)])
def test_grouped_moe_on_cuda_equals_reference(T, offset, dynamic):
    """Both many-token MoE paths (host-grouped cuBLAS; capturable torch._scaled_grouped_mm), also with
    expert parallelism (offset: half the routed experts live on another rank) and Meta-style per-channel
    weight scales with dynamic per-token activations."""
    import maverick_plugins as ops

    torch.manual_seed(1)
    H, I, E = 256, 128, 8
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    vals, ids = torch.randn(T, E + offset, device="cuda").topk(1, dim=-1)
    sc = torch.sigmoid(vals).to(torch.bfloat16)
    gu8 = (torch.randn(E, 2 * I, H, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    dn8 = (torch.randn(E, H, I, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    if dynamic:
        s13 = torch.rand(E, 2 * I, device="cuda") / (32 * 16.0) + 1e-3
        s2 = torch.rand(E, H, device="cuda") / (32 * 16.0) + 1e-3
        args = (x, ids, sc, gu8, dn8, offset, s13, None, s2, None)
    else:
        s = torch.tensor(1 / (32 * 16.0), device="cuda")
        xs = torch.tensor(4 / 448, device="cuda")
        args = (x, ids, sc, gu8, dn8, offset, s, xs, s, xs)
    ref = ops.moe_experts_ref(*args).float()
    assert ref.norm() > 0
    for path in (ops.moe_experts_grouped, ops.moe.moe_experts_grouped_mm):
        got = path(*args).float()
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2, path  # cuBLAS vs fp32 products, bf16 rounding
    if offset:  # tokens routed to the other rank's experts contribute nothing here
        assert torch.equal(got[(ids < offset).squeeze(1)], torch.zeros_like(got[(ids < offset).squeeze(1)]))


def test_grouped_mm_moe_captures_in_a_cuda_graph():
    import maverick_plugins as ops

    torch.manual_seed(2)
    T, H, I, E = 64, 256, 128, 8
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    gu8 = (torch.randn(E, 2 * I, H, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    dn8 = (torch.randn(E, H, I, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    s, xs = torch.tensor(1 / 512.0, device="cuda"), torch.tensor(4 / 448, device="cuda")
    ids = torch.randint(0, E, (T, 1), device="cuda")
    sc = torch.rand(T, 1, device="cuda").to(torch.bfloat16)
    run = lambda: ops.moe.moe_experts_grouped_mm(x, ids, sc, gu8, dn8, 0, s, xs, s, xs)  # noqa: E731
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    for seed in range(3):  # new routing each replay: no shape depends on it
        ids.copy_(torch.randint(0, E, (T, 1), generator=torch.Generator().manual_seed(seed)))
        g.replay()
        ref = ops.moe_experts_ref(x, ids, sc, gu8, dn8, 0, s, xs, s, xs).float()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("n,k,swiglu", [(896, 5120, False), (4096, 5120, True)])
def test_serial_split_k_on_gpu(n, k, swiglu):
    """Maverick's split-K shapes (qkv: 8 splits, dense fc13 + SwiGLU: 4): the last-split reduction equals the
    two-launch path bit for bit, eagerly and in CUDA-graph replays with new inputs (the arrival counters
    must be back at zero after every call)."""
    from maverick_plugins.kernels import fp8_gemm
    from maverick_plugins.kernels.counters import arrival_counters

    torch.manual_seed(3)
    w = (torch.randn(n, k, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws, xs = torch.tensor(1 / (32 * 72.0), device="cuda"), torch.tensor(8 / 448, device="cuda")
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)

    def run(serial):
        return fp8_gemm.fp8_gemm_small_m(x, w, ws, xs, torch.bfloat16, swiglu=swiglu, serial=serial)

    assert torch.equal(run(True), run(False))
    run(True)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run(True)
    for seed in range(5):
        x.copy_(torch.randn(4, k, generator=torch.Generator().manual_seed(seed)).to(x))
        g.replay()
        assert torch.equal(out, run(False)), seed
    assert int(arrival_counters(x.device, 1, "fp8_gemm").abs().sum()) == 0


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("B", [1, 2, 3])
def test_decode_attention_at_model_shapes_in_a_graph(fp8, B):
    """TP8 shapes (1 kv head, 5 query heads, head_dim 128, 64-token blocks), a table for 16K tokens, one
    graph replayed with contexts from 0 to 16K: the split length follows each context on the device and
    the merge matches the reference every time (global and chunked local layers). Batch 1 is the one
    (sequence, kv head) launch (256 splits, 5 stages, 8 warps, 8-column merge slices), 2 and 3 take 16."""
    import maverick_plugins as ops
    from maverick_plugins.kernels.decode_attention import decode_attention

    torch.manual_seed(5)
    kvh, group, D, bs, nb = 1, 5, 128, 64, 256
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    kc = torch.randn(B * nb + 1, bs, kvh, D, device="cuda").to(dt)
    vc = torch.randn(B * nb + 1, bs, kvh, D, device="cuda").to(dt)
    table = torch.randperm(B * nb, device="cuda", dtype=torch.int32).view(B, nb)
    q = torch.randn(B, kvh * group, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, kvh, D, device="cuda", dtype=torch.bfloat16) / 4
    v = torch.randn(B, kvh, D, device="cuda", dtype=torch.bfloat16) / 4
    ctx = torch.zeros(B, dtype=torch.int32, device="cuda")
    qi = torch.arange(B, device="cuda").view(B, 1)
    qp = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    s = torch.tensor(0.5, device="cuda") if fp8 else None
    for chunk in (None, 8192):
        tbl = table if chunk is None else table[:, : chunk // bs].contiguous()

        def run():
            return decode_attention(q, k, v, kc, vc, tbl, ctx, qi, qp, D ** -0.5, chunk, s, s)

        run()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()
        for c0, c1 in ((0, 1), (63, 64), (1000, 9000), (8192, 16383), (16000, 130)):
            ctx.copy_(torch.tensor([c0, c1, 4097][:B]))
            qp.copy_(ctx.view(B, 1).long())
            g.replay()
            ref = ops.paged_attention_ref(q, k, v, kc, vc, tbl, ctx, qi, qp, torch.arange(B, device="cuda"),
                                          D ** -0.5, chunk, s, s).float()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (chunk, c0, c1, err)  # probabilities rounded to bf16 for the PV product


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("local", [False, True])
def test_qkv_attention_at_model_shapes_in_a_graph(fp8, local):
    """One decode token a sequence at TP8 shapes, from the raw QKV output: RoPE + QK-norm (chunked local
    layers) or the temperature (global), attention and the cache write in one kernel (qkv_attention's
    CUDA path), replayed in a graph over contexts up to 16K, against qkv_attention_ref every time."""
    import maverick_plugins as ops

    torch.manual_seed(6)
    B, H, kvh, D, bs, nb = 2, 5, 1, 128, 64, 256
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    chunk = 8192 if local else None
    table = torch.randperm(B * nb, device="cuda", dtype=torch.int32).view(B, nb)
    table = table[:, : chunk // bs].contiguous() if local else table
    kc = torch.randn(B * nb + 1, bs, kvh, D, device="cuda").to(dt)
    vc = torch.randn(B * nb + 1, bs, kvh, D, device="cuda").to(dt)
    qkv = torch.randn(B, (H + 2 * kvh) * D, device="cuda", dtype=torch.bfloat16)
    ctx = torch.zeros(B, dtype=torch.int32, device="cuda")
    pos = torch.zeros(B, dtype=torch.long, device="cuda")
    slots = torch.zeros(B, dtype=torch.long, device="cuda")
    inv = 1.0 / (500000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    cos, sin = (torch.zeros(B, D // 2, device="cuda") for _ in range(2))
    qi = torch.arange(B, device="cuda").view(B, 1)
    s = torch.tensor(0.25, device="cuda") if fp8 else None
    temp = None if local else (8192.0, 0.1)

    def args(k_cache, v_cache):
        return (qkv, cos, sin, pos, H, kvh, D, local, local, 1e-5, temp, k_cache, v_cache, slots, s, s, table, ctx,
                qi, pos.view(B, 1), torch.arange(B, device="cuda"), D ** -0.5, chunk)

    ops.qkv_attention(*args(kc.clone(), vc.clone()))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.qkv_attention(*args(kc, vc))
    for c0, c1 in ((0, 1), (63, 64), (1000, 9000), (8191, 16383), (16000, 130)):
        ctx.copy_(torch.tensor([c0, c1]))
        pos.copy_(ctx)
        ring = pos % chunk if local else pos
        slots.copy_(table.long().gather(1, (ring // bs)[:, None])[:, 0] * bs + ring % bs)
        c, sn = ops.rope_cos_sin(pos, inv)
        cos.copy_(c)
        sin.copy_(sn)
        ref_kc, ref_vc = kc.clone(), vc.clone()
        g.replay()
        ref = ops.qkv_attention_ref(*args(ref_kc, ref_vc)).float()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (c0, c1, err)  # probabilities rounded to bf16 for the PV product
        for got, want in ((kc, ref_kc), (vc, ref_vc)):  # one e4m3 / bf16 ulp apart at most, and rarely
            got, want = got.float(), want.float()
            assert bool(((got - want).abs() <= want.abs() / 8).all()), (c0, c1)
            assert int((got != want).sum()) <= B * D // 20, (c0, c1)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("n,k,swiglu", [(896, 5120, False), (5120, 640, False), (4096, 5120, True), (5120, 2048, False),
                                        (2048, 5120, True), (5120, 1024, False)])
def test_fp8_gemm_swap_ab_on_gpu(n, k, swiglu, pdl):
    """Every tuned TP8 shape with its tuned swap-AB config (y^T = W x^T on wgmma) gives the result of
    x W^T on mma.sync, eager and in a graph, with and without PDL. Not bit for bit: Hopper's FP8 wgmma adds
    products with a shorter mantissa than fp32 (measured 2e-4 relative at K=5120), far inside FP8's ~1e-2."""
    from maverick_plugins import dispatch
    from maverick_plugins.kernels import fp8_gemm

    with dispatch.use(dispatch.KernelOptions(pdl=pdl)):
        _swap_ab_matches(fp8_gemm, n, k, swiglu)


def _swap_ab_matches(fp8_gemm, n, k, swiglu):
    from maverick_plugins import dispatch

    torch.manual_seed(4)
    w = (torch.randn(n, k, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws, xs = torch.tensor(1 / (32 * 72.0), device="cuda"), torch.tensor(8 / 448, device="cuda")
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    tuned = dispatch.H200.gemm[(n, k)]
    assert tuned[5], "the tuned config uses swap-AB"
    plain = (64, 256, tuned[2], 4, 3, False)
    base = fp8_gemm.fp8_gemm_small_m(x, w, ws, xs, torch.float32, swiglu=swiglu, config=plain)
    swapped = fp8_gemm.fp8_gemm_small_m(x, w, ws, xs, torch.float32, swiglu=swiglu, config=tuned)
    assert ((swapped - base).norm() / base.norm()).item() < 1e-3
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fp8_gemm.fp8_gemm_small_m(x, w, ws, xs, torch.float32, swiglu=swiglu, config=tuned)
    x.copy_(torch.randn_like(x))
    g.replay()
    base = fp8_gemm.fp8_gemm_small_m(x, w, ws, xs, torch.float32, swiglu=swiglu, config=plain)
    assert ((out - base).norm() / base.norm()).item() < 1e-3


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("n,k,swiglu", [(896, 5120, False), (5120, 640, False), (4096, 5120, True), (5120, 2048, False),
                                        (2048, 5120, True), (5120, 1024, False), (200, 96, False),
                                        (1792, 5120, False), (8192, 5120, True), (5120, 4096, False)])  # TP8, TP4
def test_fp8_gemv_on_gpu(n, k, swiglu, rows):
    """The one-token GEMV at every TP8 shape (tuned configs, PDL as by default) and an untuned small one:
    against the reference (exact products, fp32 sums) within fp32 summation order, e4m3 subnormal rows
    included, eager and in a graph replay with a new input; two tokens as well."""
    import maverick_plugins as ops
    from maverick_plugins.dispatch import H200
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv

    config_for = H200.gemv_config

    torch.manual_seed(6)
    w = (torch.randn(n, k, device="cuda") * 32).clamp(-448, 448)
    w[::3] *= 2 ** -12  # rows of e4m3 subnormals
    w = w.to(torch.float8_e4m3fn)
    ws = torch.rand(n, device="cuda") / 1000 + 1e-4 if rows else torch.tensor(1 / (32 * 72.0), device="cuda")
    xs = torch.tensor(8 / 448, device="cuda")

    def check(y, x):
        ref = ops.fp8_linear_ref(x, w, ws, xs, torch.float32)
        ref = ops.swiglu(ref) if swiglu else ref
        assert ((y - ref).norm() / ref.norm()).item() < 1e-5
        if not swiglu:
            assert ((y - ref)[:, ::3].norm() / ref[:, ::3].norm()).item() < 1e-5

    for m in (1, 2):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        check(fp8_gemv(x, w, ws, xs, torch.float32, swiglu=swiglu), x)
        if config_for(n, k, m, swiglu):  # as dispatched (two tokens: H200.gemv_2)
            check(fp8_gemv(x, w, ws, xs, torch.float32, swiglu=swiglu, config=config_for(n, k, m, swiglu)), x)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fp8_gemv(x, w, ws, xs, torch.float32, swiglu=swiglu)
    x.copy_(torch.randn_like(x))
    g.replay()
    check(out, x)


@pytest.mark.parametrize("n", [25256, 50512])  # Maverick's lm_head rows a rank at TP8 and TP4
def test_fp8_lm_head_gemv_at_model_shape(n):
    """The FP8_PER_CHANNEL_PER_TOKEN lm_head through fp8_linear: one token on the GEMV with the token's scale
    computed in the kernel, in a graph replay with a new input (fp32 summation order apart); two tokens
    (cuBLAS) too."""
    import maverick_plugins as ops

    torch.manual_seed(7)
    w = torch.randn(n, 5120, device="cuda") / 72
    w8, ws = ops.quantize_fp8_dynamic_per_token(w)
    ws = ws.reshape(-1)

    def check(y, x, tol=1e-5):
        ref = ops.fp8_linear_ref(x, w8, ws, None, torch.float32)
        assert ((y - ref).norm() / ref.norm()).item() < tol

    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16) * 3
    g = torch.cuda.CUDAGraph()
    ops.fp8_linear(x, w8, ws, None, torch.float32)
    with torch.cuda.graph(g):
        out = ops.fp8_linear(x, w8, ws, None, torch.float32)
    x.copy_(torch.randn_like(x) / 5)
    g.replay()
    check(out, x)
    x2 = torch.randn(2, 5120, device="cuda", dtype=torch.bfloat16)
    check(ops.fp8_linear(x2, w8, ws, None, torch.float32), x2, 1e-3)  # Hopper's FP8 MMA sums shorter than fp32


def test_overlap_scheduler_with_cuda_graphs(tiny_engine):
    """With graphs, the overlap scheduler feeds each decode step the previous step's samples on the
    device (into the graph's static input ids): the tokens equal the synchronous engine's."""
    prompts = [prompt_ids(30, seed=1), prompt_ids(12, seed=2), prompt_ids(50, seed=3)]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=0.8, top_k=40, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=25, temperature=1.1, top_p=0.9, seed=4, ignore_eos=True)]
    outs = {}
    for off in (True, False):
        with LLM(tiny_engine, device="cuda", disable_overlap_scheduler=off) as llm:
            outs[off] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            assert (llm.engine.overlapped > 10) == (not off) and llm.kv_cache.all_free
    assert outs[True] == outs[False]


def _captured(fn):
    """(graph, its output): fn run once eagerly (compiles, allocates), then captured."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def _moe_rank_weights(E, offset, dynamic, H=5120, I=1024):
    """(routed expert args from gate_up on, shared expert args) of one TP8 rank's MoE: FP8 weights, ModelOpt
    scalar scales or (dynamic) Meta's per-channel scales with per-token activations."""
    w8 = lambda *s: (torch.randn(*s, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)  # noqa: E731
    gu8, dn8 = w8(E, 2 * I, H), w8(E, H, I)
    if dynamic:
        args = (gu8, dn8, offset, torch.rand(E, 2 * I, device="cuda") / 512 + 1e-4, None,
                torch.rand(E, H, device="cuda") / 512 + 1e-4, None)
    else:
        s, xs = torch.tensor(1 / 512.0, device="cuda"), torch.tensor(4 / 448, device="cuda")
        args = (gu8, dn8, offset, s, xs, s, xs)
    shared = (w8(2 * I, H), torch.rand(2 * I, device="cuda") / 512 + 1e-4, torch.tensor(4 / 448, device="cuda"),
              w8(H, I), torch.tensor(1 / 700.0, device="cuda"), torch.tensor(2 / 448, device="cuda"))
    return args, shared


@pytest.mark.parametrize("T,offset,dynamic", [(1, 0, False), (8, 0, False), (5, 8, False), (3, 0, True), (4, 0, False)])
def test_fused_moe_ffn_at_rank_shapes_equals_reference(T, offset, dynamic):
    """The min-latency MoE FFN (selected experts + shared expert in two launches, default configs) at one TP8
    rank's sizes (H 5120, I 1024) against moe_ffn_ref, in a CUDA graph with the routing changed between
    replays; with expert parallelism (offset: half the routed experts elsewhere) and Meta-style channels."""
    import maverick_plugins as ops

    torch.manual_seed(3)
    H, E = 5120, 16
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    args, shared = _moe_rank_weights(E, offset, dynamic)
    ids = torch.zeros(T, 1, dtype=torch.int64, device="cuda")
    sc = torch.zeros(T, 1, dtype=torch.bfloat16, device="cuda")
    g, out = _captured(lambda: ops.moe_ffn(x, ids, sc, *args, *shared))
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        ids.copy_(torch.randint(0, E + offset, (T, 1), generator=gen))
        sc.copy_(torch.rand(T, 1, generator=gen))
        g.replay()
        ref = ops.moe_ffn_ref(x, ids, sc, *args, *shared).float()
        routed_off = ops.moe_ffn_ref(x, ids, sc, *args[:2], 10 ** 6, *args[3:], *shared).float()
        assert ((ref - routed_off).norm() / ref.norm()).item() > 0.05 or offset  # the routed part counts
        # the spec rounds the shared gate/up to bf16 before SwiGLU (the kernels do not), then requantizes h to
        # FP8: a few elements land one e4m3 step apart (1.1% relative on H200); the unfused kernels, which
        # also apply SwiGLU in fp32, must agree with the fused pair far closer
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
        unfused = (ops.moe_experts(x, ids, sc, *args) + ops.fp8_linear(
            ops.fp8_linear_swiglu(x, *shared[:3], torch.bfloat16), *shared[3:], torch.bfloat16)).float()
        assert ((out.float() - unfused).norm() / unfused.norm()).item() < 5e-3


@pytest.mark.parametrize("T,dynamic", [(1, False), (1, True), (3, False), (4, True)])
def test_moe_block_picks_in_pass_1(T, dynamic, monkeypatch):
    """Router + MoE FFN at one TP8 rank's sizes (E 128, H 5120, I 1024), 1-4 tokens (the fused path forced
    on up to 4 whatever the table says): the router writes logits only, both passes pick; in a graph
    replayed with new inputs, the same output as the router's own pick followed by moe_ffn (bit for bit),
    and as moe_block_ref within FP8's rounding."""
    import dataclasses

    import maverick_plugins as ops
    from maverick_plugins import dispatch
    from maverick_plugins.kernels.small_ops import router_triton

    table = dispatch.table
    monkeypatch.setattr(dispatch, "table", lambda d: dataclasses.replace(table(d), moe_block_max_tokens=4))
    torch.manual_seed(4)
    H, E = 5120, 128
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    router = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) / 72
    assert dispatch.moe_block_fused(x, 1, fp8=True)
    args, shared = _moe_rank_weights(E, 0, dynamic)
    g, out = _captured(lambda: ops.moe_block(x, router, 1, *args, *shared))
    for seed in range(3):
        x.copy_(torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(x))
        g.replay()
        ids, sc = router_triton(x, router, 1)  # the same logits kernel, picking itself
        assert torch.equal(out, ops.moe_ffn(x, ids, sc, *args, *shared)), seed
        ref = ops.moe_block_ref(x, router, 1, *args, *shared).float()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2  # as test_fused_moe_ffn_at_rank_shapes


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("T,dynamic", [(1, False), (8, False), (2, True)])
def test_moe_tensor_core_passes_equal_the_cuda_core_ones_at_rank_shapes(mode, T, dynamic):
    """The MoE pair on the tensor cores (MODE 1 mma.sync, 2 wgmma; the input repeated over 16 MMA rows)
    computes the same exact FP8 products with fp32 sums as the CUDA-core pair, at one TP8 rank's sizes
    with the shared expert."""
    from maverick_plugins.kernels.moe_gemv import moe_experts_gemv

    torch.manual_seed(4)
    H, I, E = 5120, 1024, 16
    w8 = lambda *s: (torch.randn(*s, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)  # noqa: E731
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, E, (T, 1), device="cuda")
    sc = torch.rand(T, 1, device="cuda", dtype=torch.bfloat16)
    if dynamic:
        scales = (torch.rand(E, 2 * I, device="cuda") / 512 + 1e-4, None, torch.rand(E, H, device="cuda") / 512 + 1e-4,
                  None)
    else:
        scales = (torch.tensor(1 / 512.0, device="cuda"), torch.tensor(4 / 448, device="cuda"),
                  torch.tensor(1 / 512.0, device="cuda"), torch.tensor(4 / 448, device="cuda"))
    shared = (w8(2 * I, H), torch.rand(2 * I, device="cuda") / 512 + 1e-4, torch.tensor(4 / 448, device="cuda"),
              w8(H, I), torch.tensor(1 / 700.0, device="cuda"), torch.tensor(2 / 448, device="cuda"))
    gu8, dn8 = w8(E, 2 * I, H), w8(E, H, I)
    run = lambda cfg: moe_experts_gemv(x, ids, sc, gu8, dn8, 0, scales[0], scales[1], scales[2], scales[3],  # noqa: E731
                                       shared=shared, config=cfg).float()
    base = run(((8, 512, 4, 3, 0), (8, 512, 4, 3, 0)))
    cfg = (16, 256, 4, 3, 1) if mode == 1 else (64, 128, 4, 3, 2)
    # the same exact products; wgmma adds them in the tensor core's shorter accumulator (about 14 bits) for up
    # to 128 products before the fp32 sum (as the swap-AB GEMM does). Pass 2 requantizes h to e4m3 (steps of
    # 6-12%): an h element within ~1e-4 of a rounding boundary lands one step away, about 0.2% of the 2048
    # h elements a token has, each moving every output by ~0.1 |h w| against a norm of sqrt(1024) |h w|:
    # ~3e-3 per flipped element. Measured with wgmma 3.9e-3 (8 tokens), under 2e-3 with mma.sync
    # (H200); a wrong expert, row or scale is off by O(1).
    assert ((run((cfg, cfg)) - base).norm() / base.norm()).item() < 1e-2
    split = cfg + (4,)  # pass 1 split 4 ways over H
    assert ((run((split, cfg)) - base).norm() / base.norm()).item() < 1e-2


def test_programmatic_dependent_launch_keeps_the_tokens(tiny_engine, monkeypatch):
    """Every kernel launched with PDL waits for its predecessor before it reads: the tiny model's greedy tokens
    through CUDA graphs with PDL (the default) equal those with MAVERICK_PDL=off, in one process."""
    prompts = [prompt_ids(30, seed=1), prompt_ids(12, seed=2)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    monkeypatch.setenv("MAVERICK_PDL", "off")
    with LLM(tiny_engine, device="cuda") as llm:
        base = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    monkeypatch.setenv("MAVERICK_PDL", "on")
    with LLM(tiny_engine, device="cuda") as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == base


def test_benchmark_runs_end_to_end_on_the_tiny_preset(tmp_path):
    """maverick-bench's decode-step (graph replay), TTFT and end-to-end paths on a small model: a change to
    the graph runner's internals broke the step benchmark once without any test noticing."""
    import json

    from maverick.bench.cli import bench_main

    out = tmp_path / "r.json"
    assert bench_main(["step", "--preset", "tiny", "--tp-size", "1", "--batches", "1,2", "--contexts", "64", "--ttft", "32",
                 "--e2e", "16/8", "--concurrency", "1,2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["batch"] for row in r["rows"]] == [1, 2] and all(row["step_ms"] > 0 for row in r["rows"])


@pytest.mark.parametrize("T", [1, 8, 16])
def test_fused_router_at_maverick_shape_in_a_graph(T):
    """Router GEMV + top-1 in one launch (bf16, 128 experts x 5120) replayed in a CUDA graph with new inputs:
    the reference's experts wherever its best two logits differ, scores to bf16 rounding."""
    import maverick_plugins as ops
    from maverick_plugins import dispatch
    from maverick_plugins.kernels.small_ops import router_triton

    torch.manual_seed(T)
    x = torch.randn(T, 5120, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(128, 5120, device="cuda") / 70).to(torch.bfloat16)
    router_triton(x, w, 1)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ids, scores = router_triton(x, w, 1)
    for seed in range(3):
        x.copy_(torch.randn(T, 5120, generator=torch.Generator().manual_seed(seed)))
        g.replay()
        logits = x @ w.t()
        top2 = logits.float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0
        with dispatch.use(dispatch.KernelOptions(enabled=False)):
            ref_ids, ref_scores = ops.moe_router(x, w, 1)
        assert clear.any()
        assert torch.equal(ids[clear], ref_ids[clear])
        assert ((scores.float() - ref_scores.float()).abs() <= 1e-2).all()


def test_step_start_kernels_at_model_shapes():
    """The embedding rows (Maverick's 25256 rows a rank at TP8, hidden 5120) equal the torch reference bit for
    bit, ids of other ranks giving zeros; RoPE cos / sin equal torch.cos / torch.sin of the same fp32 angles
    for positions up to 1M (libdevice both); both in a graph replay with new inputs."""
    import maverick_plugins as ops

    torch.manual_seed(11)
    weight = torch.randn(25256, 5120, device="cuda").to(torch.bfloat16)
    inv = 1.0 / 500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128)
    ids = torch.tensor([25256 * 3 + 7, 25256 * 3 - 1, 25256 * 4, 25256 * 3], device="cuda")
    pos = torch.tensor([0, 1, 131071, -1], device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        rows = ops.embedding_rows(ids, weight, 25256 * 3)
        cos, sin = ops.rope_cos_sin(pos, inv)
    for new_ids, new_pos in (([5, 25256 * 3 + 25255, 25256 * 3 + 1, 1 << 20], [7, 8191, 1 << 20, 999999]),
                             ([25256 * 3 + 7, 0, 1, 25256 * 3 + 9], [3, 4, 5, 6])):
        ids.copy_(torch.tensor(new_ids))
        pos.copy_(torch.tensor(new_pos))
        g.replay()
        assert torch.equal(rows, ops.embedding_rows_ref(ids, weight, 25256 * 3))
        ref_cos, ref_sin = ops.rope_cos_sin_ref(pos, inv)
        assert (cos - ref_cos).abs().max().item() <= 1e-6, (cos - ref_cos).abs().max().item()
        assert (sin - ref_sin).abs().max().item() <= 1e-6, (sin - ref_sin).abs().max().item()
        if new_ids[0] == 5:  # another rank's id: zeros; the last row this rank holds
            assert not rows[0].any() and rows[1].equal(weight[25255])


@pytest.mark.parametrize("rows,programs,dot", [(4, None, False), (8, 7, False), (8, None, True)])
def test_persistent_gemv_chain_at_rank_shapes_in_a_graph(rows, programs, dot):
    """Eight FP8 GEMV stages (5120 -> 2048 -> 5120, ...) as one persistent launch, captured in a CUDA graph and
    replayed with new inputs: within the sums' order of the chain of fp8_gemv launches and of the reference,
    with few programs too (7: every program runs many tiles, and waits for stages other programs run), the
    products on tensor cores too (dot), and the counters back at zero after each replay."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import gemv_chain_ref

    torch.manual_seed(5)
    stages = []
    for j in range(8):
        n, k = (2048, 5120) if j % 2 == 0 else (5120, 2048)
        w8 = (torch.randn(n, k, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
        stages.append((w8, torch.rand(n, device="cuda") * 1e-3 + 5e-4, torch.tensor(8 / 448, device="cuda")))
    chain = GemvChain(stages, rows=rows, programs=programs, dot=dot)
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    g, out = _captured(lambda: chain(x))
    for seed in range(3):
        x.copy_(torch.randn(1, 5120, generator=torch.Generator().manual_seed(seed)))
        g.replay()
        torch.cuda.synchronize()
        want = x
        for w8, ws, xs in stages:
            want = fp8_gemv(want, w8, ws, xs, torch.bfloat16)
        r = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        assert r(out, want.reshape(-1)) < 2e-2, seed
        assert r(out, gemv_chain_ref(x, stages)[-1]) < 5e-2, seed
        assert int(chain.counters.abs().sum()) == 0, seed


@pytest.mark.parametrize("rows,programs", [(4, None), (8, 7)])
def test_persistent_dense_mlp_blocks_at_rank_shapes_in_a_graph(rows, programs):
    """Four dense MLP blocks of one TP8 rank (RMSNorm, fc13 + SwiGLU 5120 -> 2 x 2048, fc2 2048 -> 5120,
    residual add) as one persistent launch in a CUDA graph, replayed with new inputs: within the sums' order
    of the launches a layer runs today (rms_norm, fp8_gemv with SwiGLU, fp8_gemv, add_rms_norm) and of
    gemv_chain_ref, counters back at zero."""
    import maverick_plugins as ops
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage, gemv_chain_ref

    torch.manual_seed(6)
    H, I, eps = 5120, 2048, 1e-5
    xs = torch.tensor(8 / 448, device="cuda")
    blocks, stages = [], []
    for b in range(4):
        w13 = (torch.randn(2 * I, H, device="cuda") * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        w2 = (torch.randn(H, I, device="cuda") * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        s13 = torch.full((2 * I,), 1 / (64 * H ** 0.5), device="cuda")
        s2 = torch.full((H,), 1 / (64 * I ** 0.5), device="cuda")
        g = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
        blocks.append((w13, s13, w2, s2, g))
        stages += [ChainStage(w13, s13, xs, swiglu=True, norm_weight=g),
                   ChainStage(w2, s2, xs, residual_from=2 * b - 1)]
    chain = GemvChain(stages, rows=rows, programs=programs, eps=eps)
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    graph, out = _captured(lambda: chain(x))
    r = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    for seed in range(3):
        x.copy_(torch.randn(1, H, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        want, normed = x, ops.rms_norm(x, blocks[0][4], eps)
        for b, (w13, s13, w2, s2, _) in enumerate(blocks):
            a = fp8_gemv(normed, w13, s13, xs, torch.bfloat16, swiglu=True)
            want, normed = ops.add_rms_norm(want, fp8_gemv(a, w2, s2, xs, torch.bfloat16), blocks[(b + 1) % 4][4], eps)
        assert r(out, want.reshape(-1)) < 1e-2, seed
        assert r(out.float() - x.float().reshape(-1), (want - x).float().reshape(-1)) < 3e-2, seed
        assert r(out, gemv_chain_ref(x, stages, eps)[-1]) < 2e-2, seed
        assert int(chain.counters.abs().sum()) == 0, seed


@pytest.mark.parametrize("rows,programs", [(4, None), (8, 7)])
def test_persistent_moe_block_at_rank_shapes_in_a_graph(rows, programs):
    """One TP8 rank's MoE block (E 128, H 5120, I 1024: router, shared and routed fc13 + SwiGLU, both fc2s,
    residual) as one persistent launch in a CUDA graph, replayed with inputs routed to other experts: within
    FP8's rounding of the launches a layer runs today (rms_norm, moe_block's fused router + MoE pair, the
    add), which sum shared and routed before the residual (one bf16 rounding apart), and of gemv_chain_ref;
    the expert the chain used is the router's."""
    import maverick_plugins as ops
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage, gemv_chain_ref

    torch.manual_seed(8)
    H, I, E, eps = 5120, 1024, 128, 1e-5
    router = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) / 72
    g = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
    args, shared = _moe_rank_weights(E, 0, False)
    gu8, dn8, _, s, xs, _, _ = args
    sgu, sgu_s, sgu_xs, sdn, sdn_s, sdn_xs = shared
    stages = [ChainStage(router, None, None, norm_weight=g, router=True),
              ChainStage(sgu, sgu_s, sgu_xs, swiglu=True, norm_weight=g, input_from=-1),
              ChainStage(gu8, s.expand(E, 2 * I), xs, swiglu=True, norm_weight=g, input_from=-1, experts_from=0,
                         scored=True),
              ChainStage(sdn, sdn_s.expand(H), sdn_xs, input_from=1, residual_from=-1),
              ChainStage(dn8, s.expand(E, H), xs, input_from=2, residual_from=3, experts_from=0)]
    chain = GemvChain(stages, rows=rows, programs=programs, eps=eps)
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    graph, out = _captured(lambda: chain(x))
    r = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    picks = set()
    for seed in range(4):
        x.copy_(torch.randn(1, H, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        normed = ops.rms_norm(x, g, eps)
        want = x + ops.moe_block(normed, router, 1, *args, *shared)
        ids, _ = ops.moe_router(normed, router, 1)
        assert int(chain.output(0).float().argmax()) == int(ids), seed
        picks.add(int(ids))
        assert r(out, want) < 1e-2, seed
        assert r(out.float() - x.float().reshape(-1), (want - x).float().reshape(-1)) < 3e-2, seed
        assert r(out, gemv_chain_ref(x, stages, eps)[-1]) < 2e-2, seed
        assert int(chain.counters.abs().sum()) == 0, seed
    assert len(picks) >= 2, picks


def test_persistent_layers_match_the_layer_by_layer_step(monkeypatch):
    """MAVERICK_PERSISTENT=1 on the tiny preset with random FP8 weights: a decode step runs each layer as
    attention + one persistent chain (o_proj, FFN, next qkv; weights shared with the layers): its logits
    within the chains' roundings of the layer-by-layer step (same top token), and a captured CUDA graph of
    the step replays to the eager step's logits bit for bit."""
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig
    from helpers import one_token_step_logits

    from maverick.runtime.model_runner import ModelRunner

    cfg = ModelConfig.preset("tiny")
    build = BuildConfig(max_seq_len=256, max_batch_size=2, kv_cache_block_size=16, quant=QuantConfig("FP8", None),
                        dtype="bfloat16")
    ids = prompt_ids(40, seed=4, vocab=500)
    plain = ModelRunner(synthetic_model(cfg, build, 0, "cuda", seed=2), 256, 2, 16, device="cuda")
    want = one_token_step_logits(plain, ids)
    monkeypatch.setenv("MAVERICK_PERSISTENT", "1")
    runner = ModelRunner(synthetic_model(cfg, build, 0, "cuda", seed=2), 256, 2, 16, device="cuda")
    assert runner.model.tails is not None
    eager = one_token_step_logits(runner, ids)
    r = ((eager - want).norm() / want.norm()).item()
    assert r < 0.1 and int(eager[-1].argmax()) == int(want[-1].argmax()), r
    runner.capture_cuda_graphs([1])
    assert torch.equal(one_token_step_logits(runner, ids), eager)


@pytest.mark.parametrize("draft", [0, 3])
def test_serving_after_load_compiles_and_captures_nothing(draft, capsys):
    """One TP8 rank at full Maverick shapes (random FP8 weights), loaded as the runtime loads it (warm-up,
    graphs), then requests of every batch size and prompt size class (and random ones), with and without an
    EAGLE-3 draft verifying 3: no Triton specialization and no CUDA graph capture while serving (a user's
    first requests of a new shape would pay for a compiler). maverick-bench compiles --strict counts them."""
    from maverick.bench.compiles import main

    args = ["--max-batch-size", "4", "--max-num-tokens", "256", "--max-seq-len", "512", "--strict"]
    rc = main(args + (["--max-draft-len", str(draft)] if draft else []))
    out = capsys.readouterr().out
    assert rc == 0 and "0 Triton specializations, 0 graph captures" in out, out
