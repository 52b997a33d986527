"""Which captured graph a step replays, and that padding a prompt chunk up to a graph's shape changes nothing
(CPU: the padded batch runs eagerly through the same model; the GPU tests replay the graphs themselves)."""
import pytest
import torch

from helpers import prompt_ids, runner_for
from maverick.config import BuildConfig
from maverick.runtime.step import StepSeq
from maverick.runtime.cuda_graph import StepGraphs, graph_parts, graph_shape

DECODE, PREFILL = [1, 2, 4, 8], [16, 32, 64, 128]


@pytest.mark.parametrize("tokens,logits,expect", [
    ([1], [1], (1, 1)), ([1, 1, 1], [1, 1, 1], (4, 1)), ([1] * 8, [1] * 8, (8, 1)),
    ([1] * 9, [1] * 9, None),  # more sequences than the largest decode graph
    ([2], [1], (1, 16)), ([16], [1], (1, 16)), ([17], [1], (1, 32)), ([128], [1], (1, 128)),
    ([129], [1], None),  # longer than the largest prefill graph
    ([40], [0], (1, 64)),  # a chunk before the prompt's last: no logits
    ([5, 1], [1, 1], None), ([5, 7], [1, 1], None),  # a prompt beside others: not one graph
    ([3], [3], None), ([1, 1], [1, 2], None),  # several logits of a sequence without verify graphs: eager
    ([1, 1], [1, 0], None),  # a decode row without logits would break "logits row i is sequence i"
])
def test_graph_shape(tokens, logits, expect):
    assert graph_shape(tokens, logits, DECODE, PREFILL) == expect


@pytest.mark.parametrize("tokens,logits,expect", [
    ([4], [4], (1, 4)), ([4, 2, 1], [4, 2, 1], (4, 4)),  # verify windows (k + 1) beside plain decode rows
    ([1, 1], [1, 1], (2, 1)),  # no draft this step: the decode graph
    ([5], [5], None), ([4] * 9, [4] * 9, None),  # a window above max_draft_len + 1, more rows than any graph
    ([4, 3], [4, 1], None),  # a prompt chunk beside a verify row: not one graph (see graph_parts)
    ([3], [1], (1, 16)),  # a short prompt chunk: still a prefill graph
])
def test_graph_shape_with_verify_graphs(tokens, logits, expect):
    assert graph_shape(tokens, logits, DECODE, PREFILL, verify_q=4) == expect


def test_graph_parts_put_verify_rows_with_decode_rows():
    assert graph_parts([4, 20, 1], [4, 1, 1], DECODE, PREFILL, verify_q=4) == [([0, 2], (2, 4)), ([1], (1, 32))]
    assert graph_parts([4, 20, 1], [4, 1, 1], DECODE, PREFILL) is None  # no verify graphs: eager


def test_prefill_graph_sizes_within_the_build_limits():
    b = BuildConfig(max_num_tokens=512, max_seq_len=300, cuda_graph_prefill_tokens=(64, 16, 512, 256, 1, 64))
    assert b.graph_prefill_tokens() == [16, 64, 256]
    assert BuildConfig(cuda_graph_prefill_tokens=()).graph_prefill_tokens() == []
    assert BuildConfig.from_dict(b.to_dict()) == b


def test_decode_graphs_reach_max_batch_size():
    """Every decode batch up to max_batch_size has a graph to pad up to (an eager decode step is host-bound)."""
    assert BuildConfig(max_batch_size=8).graph_batch_sizes() == [1, 2, 4, 8]
    assert BuildConfig(max_batch_size=48).graph_batch_sizes() == [1, 2, 4, 8, 16, 32, 48]
    assert BuildConfig(max_batch_size=1024).graph_batch_sizes()[-4:] == [128, 256, 512, 1024]
    assert BuildConfig(max_batch_size=12, cuda_graph_batch_sizes=(1, 4)).graph_batch_sizes() == [1, 4, 12]


def _state(runner):
    return [(k[:-1].clone(), v[:-1].clone()) for k, v in runner.kv_caches]  # the scratch block aside


def test_padded_prompt_chunks_equal_eager(tiny_ckpt):
    """A 40-token prompt in chunks of 24 and 16 (the second starts past a 32-token attention chunk boundary on
    the local layers, with 24 tokens of context): each chunk padded to a 64-token graph shape gives the eager
    step's logits and leaves the same KV cache (the padding writes only the scratch block)."""
    eager = runner_for(tiny_ckpt)
    padded = runner_for(tiny_ckpt)
    padded.model = eager.model
    ids = prompt_ids(40, seed=8)
    pos = 0
    for chunk in (ids[:24], ids[24:]):
        seqs = {r: [StepSeq(0, chunk, pos, r.kv.grow(0, pos + len(chunk)))] for r in (eager, padded)}
        ref = eager.forward(seqs[eager])
        batch = padded._padded(seqs[padded], (1, 64))
        assert batch.num_tokens == 64 and tuple(batch.q_index.shape) == (1, 64)
        with torch.inference_mode():
            out = padded.model(batch, padded.kv_caches)
        assert out.shape == ref.shape == (1, eager.model.cfg.vocab_size)
        assert (out - ref).abs().max().item() < 1e-5
        for (k0, v0), (k1, v1) in zip(_state(eager), _state(padded)):
            # fp32 GEMMs of 64 rows and of 24 block differently: 1e-7 apart, not bit-equal; a slot the padding
            # wrote instead of the scratch block would differ by O(1)
            assert (k0 - k1).abs().max() < 1e-5 and (v0 - v1).abs().max() < 1e-5
        pos += len(chunk)


class _EagerGraphs:
    """A CPU stand-in for StepGraphs: replay runs the padded batch through the model eagerly."""

    logits_rows = StepGraphs.logits_rows

    def __init__(self, runner, batch_sizes, prefill_tokens, verify_q: int = 0):
        self.runner, self.batch_sizes, self.prefill_tokens = runner, batch_sizes, prefill_tokens
        self.verify_q = verify_q
        self.replays = []

    def shape_for(self, token_counts, num_logits):
        return graph_shape(token_counts, num_logits, self.batch_sizes, self.prefill_tokens, self.verify_q)

    def parts_for(self, token_counts, num_logits):
        return graph_parts(token_counts, num_logits, self.batch_sizes, self.prefill_tokens, self.verify_q)

    def host_arrays(self, shape):
        return None  # builds its own batch (the real graphs fill their staging buffer in place)

    def replay(self, batch, rows, n_rows, feed=None, feed_src=None):
        from maverick.layers.sampler import sample
        from maverick.runtime.staging import take_fed_tokens

        self.replays.append(tuple(batch.q_index.shape))
        if feed_src is not None:
            take_fed_tokens(batch.input_ids, torch.tensor(feed_src), feed)
        logits = self.runner.model(batch, self.runner.kv_caches)[:n_rows]
        if rows is None:
            return logits, None
        return logits, sample(logits, rows.padded(n_rows).to_tensors("cpu"))


def test_prompt_chunks_beside_decode_rows_run_as_separate_replays(tiny_ckpt):
    """A step of two decode rows (the last fed from the previous step's tokens on the device) with a 21-token
    prompt chunk and a 5-token one without logits (a chunk before its prompt's last) between them runs as the
    decode graph and one prefill graph per chunk, and gives the eager step's logits and sampled tokens in the
    step's order. Several chunks only up to PROMPT_REPLAY_TOKENS graph tokens together (else eager); one
    chunk up to the largest graph."""
    from maverick.runtime import cuda_graph
    from maverick.layers.sampler import SamplingRows

    assert (cuda_graph.MAX_PROMPT_REPLAYS, cuda_graph.PROMPT_REPLAY_TOKENS) == (4, 256)
    eager, split = runner_for(tiny_ckpt), runner_for(tiny_ckpt)
    split.model = eager.model
    split.graphs = _EagerGraphs(split, [1, 2, 4], [16, 32])
    a, b = prompt_ids(12, seed=30), prompt_ids(9, seed=31)
    for r in (eager, split):  # two sequences with context, prefilled eagerly
        r.forward([StepSeq(0, a, 0, r.kv.grow(0, 12)), StepSeq(2, b, 0, r.kv.grow(2, 9))])
    split.graphs.replays.clear()
    prompt, other = prompt_ids(21, seed=32), prompt_ids(5, seed=33)
    rows = SamplingRows(temperature=[0.8, 0.0, 1.1], top_k=[0, 0, 20], top_p=[0.9, 1.0, 1.0], min_p=[0.0] * 3,
                        seeds=[5, 6, 7], offsets=[3, 0, 8])
    feed = torch.tensor([0, 0, 77])
    out = {}
    for r in (eager, split):
        seqs = [StepSeq(0, [41], 12, r.kv.grow(0, 13)), StepSeq(1, prompt, 0, r.kv.grow(1, 21)),
                StepSeq(3, other, 0, r.kv.grow(3, 5), num_logits=0), StepSeq(2, [0], 9, r.kv.grow(2, 10), feed_row=2)]
        out[r] = r.step(seqs, rows, feed)
    assert split.graphs.replays == [(2, 1), (1, 32), (1, 16)]
    (le, te, _), (ls, ts, _) = out[eager], out[split]
    assert ls.shape == le.shape == (3, eager.model.cfg.vocab_size)
    assert (ls - le).abs().max().item() < 1e-5 and torch.equal(ts, te)
    def step_of(*lengths):  # chunks of these lengths beside one decode row (the choice reads no blocks)
        return [StepSeq(10 + j, [7] * n, 0, None) for j, n in enumerate(lengths)] + [StepSeq(0, [9], 13, None)]

    assert split._graph_parts(step_of(5, 7, 3, 9)) == [([4], (1, 1))] + [([i], (1, 16)) for i in range(4)]
    assert split._graph_parts(step_of(5, 7, 3, 9, 4)) is None  # five chunks
    assert split._graphable(step_of(5, 7)) is None
    split.graphs.prefill_tokens = [16, 32, 128, 256]
    assert split._graph_parts(step_of(100, 120)) == [([2], (1, 1)), ([0], (1, 128)), ([1], (1, 128))]
    assert split._graph_parts(step_of(100, 120, 20)) is None  # 128 + 128 + 32 graph tokens
    assert split._graph_parts(step_of(200)) == [([1], (1, 1)), ([0], (1, 256))]  # one chunk: any graph
    assert split._graph_parts(step_of(300)) is None  # above the largest prefill graph
    for r in (eager, split):
        for i in list(r.kv.seqs):
            r.kv.free(i)


def _batch_spec(seqs, bs, chunk, scratch_g, scratch_l, pad_batch, pad_q, pad_gb, pad_tokens, pad_lb):
    """build_forward_batch token by token, as plain lists (its specification)."""
    B = max(len(seqs), pad_batch)
    Q = max([len(s.tokens) for s in seqs] + [pad_q, 1])
    nbg = max([len(s.blocks.global_blocks) for s in seqs] + [pad_gb, 1])
    nbl = max([len(s.blocks.local_blocks) for s in seqs] + [pad_lb, 1])
    out = {k: [] for k in ("input_ids", "positions", "token_to_padded", "global_slots", "local_slots",
                           "logits_indices")}
    q_index, q_pos = [[0] * Q for _ in range(B)], [[-1] * Q for _ in range(B)]
    gtab, ltab, ctx = [[0] * nbg for _ in range(B)], [[0] * nbl for _ in range(B)], [0] * B
    for b, s in enumerate(seqs):
        gb, lb = s.blocks.global_blocks, s.blocks.local_blocks
        ctx[b], gtab[b][:len(gb)], ltab[b][:len(lb)] = s.start, gb, lb
        keep_from = (s.start + len(s.tokens) - 1) // chunk * chunk
        for j, tok in enumerate(s.tokens):
            p = s.start + j
            q_index[b][j], q_pos[b][j] = len(out["input_ids"]), p
            out["input_ids"].append(tok)
            out["positions"].append(p)
            out["token_to_padded"].append(b * Q + j)
            out["global_slots"].append(gb[p // bs] * bs + p % bs if gb else scratch_g)
            r = p % chunk
            out["local_slots"].append(lb[r // bs] * bs + r % bs if lb and p >= keep_from else scratch_l)
        n = len(out["input_ids"])
        out["logits_indices"] += range(n - s.num_logits, n)
    pad = max(0, pad_tokens - len(out["input_ids"]))
    for k, v in (("input_ids", 0), ("positions", 0), ("token_to_padded", 0), ("global_slots", scratch_g),
                 ("local_slots", scratch_l)):
        out[k] += [v] * pad
    return dict(out, q_index=q_index, q_positions=q_pos, global_block_table=gtab, local_block_table=ltab,
                ctx_lens=ctx)


def test_forward_batch_matches_its_per_token_spec():
    """Random steps (decode rows, prompt chunks with context across chunk boundaries, sequences without
    global or local blocks, every padding): the vectorized build equals the token-by-token one."""
    import random

    from maverick.runtime.batch import build_forward_batch
    from maverick.runtime.kv_cache import SeqBlocks

    rng = random.Random(0)
    for _ in range(300):
        bs = rng.choice([4, 8, 16, 64])
        chunk = bs * rng.choice([2, 4, 8])
        seqs = []
        for i in range(rng.randint(1, 5)):
            start, n = rng.randint(0, 300), rng.choice([1, 2, rng.randint(1, 80)])
            gb = rng.sample(range(1000), -(-(start + n) // bs)) if rng.random() < 0.9 else []
            lb = rng.sample(range(1000), -(-min(start + n, chunk) // bs)) if rng.random() < 0.9 else []
            seqs.append(StepSeq(i, [rng.randint(0, 99) for _ in range(n)], start, SeqBlocks(gb, lb),
                                num_logits=rng.randint(0, min(n, 3))))
        pads = [rng.randint(0, 8), rng.randint(0, 100), rng.randint(0, 200), rng.randint(0, 500), rng.randint(0, 50)]
        got = build_forward_batch(seqs, bs, chunk, 5555, 6666, *pads).tensors()
        want = _batch_spec(seqs, bs, chunk, 5555, 6666, *pads)
        for k, t in got.items():
            assert t.dtype == torch.int64 and t.tolist() == want[k], k


def test_speculative_steps_padded_to_verify_graphs_equal_plain_decoding(tiny_ckpt):
    """With a draft, verify windows (k + 1 tokens, every token's logits) beside plain decode rows replay the
    verify graphs (rows, k + 1), prompt chunks their prefill graphs beside them: the padded batches (run
    eagerly here) give exactly plain greedy decoding."""
    from test_eagle3 import PROMPT_LENGTHS, _generate, _greedy_params, _oracle, _random_draft

    prompts = [prompt_ids(n, seed=i + 1) for i, n in enumerate(PROMPT_LENGTHS)]
    base = [r.output_token_ids for r in _generate(runner_for(tiny_ckpt, max_seq_len=128), prompts,
                                                   _greedy_params())[0]]
    runner = runner_for(tiny_ckpt, max_seq_len=128)
    runner.attach_draft(_random_draft(), 3)
    oracle = _oracle(prompts, base, wrong_every=5)
    runner.spec.propose = lambda seqs: oracle(seqs)[:, :3]
    runner.graphs = _EagerGraphs(runner, [1, 2, 4], [16, 32], verify_q=4)
    reqs, engine = _generate(runner, prompts, _greedy_params())
    assert [r.output_token_ids for r in reqs] == base and engine.spec_stats.acceptance_length > 1.5
    assert {(2, 4), (4, 4)} & set(runner.graphs.replays) and (1, 16) in runner.graphs.replays


class _EagerRounds:
    """A CPU stand-in for RoundGraphs' capture: each 'replay' runs the round's body over its static inputs."""

    @staticmethod
    def install(runner, batch_sizes):
        from maverick.runtime.cuda_graph import RoundGraphs

        rounds = RoundGraphs(runner, runner.spec)
        for rows in batch_sizes:
            staged, body = rounds._prepare(rows)
            rounds.graphs[rows] = (body, staged)
        runner.rounds = rounds
        return rounds


def test_steady_rounds_in_one_round_graph_equal_plain_decoding(tiny_ckpt):
    """Steady rounds (every row drafting max_draft_len, the draft catching up over at most k + 1 positions)
    replay the round graph: draft extend, chain and verify over static, padded inputs (run eagerly here);
    the other rounds fall back to the eager draft. Exactly plain greedy decoding, and the round graph ran."""
    from test_eagle3 import PROMPT_LENGTHS, _generate, _greedy_params, _random_draft

    prompts = [prompt_ids(n, seed=i + 1) for i, n in enumerate(PROMPT_LENGTHS)]
    base = [r.output_token_ids for r in _generate(runner_for(tiny_ckpt, max_seq_len=128), prompts,
                                                   _greedy_params())[0]]
    for k in (1, 3):
        runner = runner_for(tiny_ckpt, max_seq_len=128)
        runner.attach_draft(_random_draft(), k)
        runner.graphs = _EagerGraphs(runner, [1, 2, 4], [16, 32], verify_q=k + 1)
        rounds = _EagerRounds.install(runner, [1, 2, 4])
        used = []
        replay = rounds.replay
        rounds.replay = lambda seqs, rows: used.append((len(seqs), rows)) or replay(seqs, rows)
        reqs, engine = _generate(runner, prompts, _greedy_params())
        assert [r.output_token_ids for r in reqs] == base
        assert sum(n for n, _ in used) > engine.spec_stats.rounds / 2  # rounds that ran in the graph
        assert {rows for _, rows in used} <= {1, 2, 4} and all(n <= rows for n, rows in used)


def test_round_graph_with_the_trained_head_accepts_and_equals_plain_decoding():
    """The bundled model and its trained head: accepted runs make the draft catch up over several positions
    in the round graph's extend (padded to k + 1); still plain greedy decoding, well over a token a round."""
    from pathlib import Path

    import torch
    from test_eagle3 import _generate, _greedy_params

    from maverick.builder.from_checkpoint import load_model_from_checkpoint
    from maverick.checkpoint import open_checkpoint
    from maverick.checkpoint.eagle3 import read_eagle3
    from maverick.models import ModelSpec
    from maverick.models.eagle3 import Eagle3Draft
    from maverick.runtime.model_runner import ModelRunner

    data = Path(__file__).resolve().parent.parent / "maverick" / "data"
    reader = open_checkpoint(data / "shakespeare")
    cfg, weights = read_eagle3(data / "shakespeare_eagle3", reader.config, torch.float32)
    draft = Eagle3Draft(cfg, torch.float32)
    draft.load_state_dict(weights)
    text = (data / "shakespeare" / "test.txt").read_bytes()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data / "shakespeare")
    prompts = [tok.encode(text[i:i + 400].decode("utf-8", "ignore"), add_special_tokens=False)[:48]
               for i in (1000, 30000)]

    def runner(k=0):
        r = ModelRunner(load_model_from_checkpoint(reader, ModelSpec(dtype=torch.float32)), max_seq_len=96,
                        max_batch_size=2, block_size=16)
        if k:
            r.attach_draft(draft, k)
            r.graphs = _EagerGraphs(r, [1, 2], [16, 32, 64], verify_q=k + 1)
            _EagerRounds.install(r, [1, 2])
        return r

    base = [q.output_token_ids for q in _generate(runner(), prompts, _greedy_params(32), max_num_tokens=128)[0]]
    spec = runner(3)
    used, replay = [], spec.rounds.replay
    spec.rounds.replay = lambda seqs, rows: used.append(max(len(s.draft_tokens) for s in seqs)) or replay(seqs, rows)
    reqs, engine = _generate(spec, prompts, _greedy_params(32), max_num_tokens=128)
    assert [q.output_token_ids for q in reqs] == base and engine.spec_stats.acceptance_length > 1.5
    assert max(used) > 1  # the graph's extend caught up over an accepted run


def test_round_chain_steps_are_the_verify_batchs_tokens(tiny_ckpt):
    """A round graph's chain step d reads its inputs from the verify batch on the device (no host build a
    depth): field for field what build_forward_batch makes of that one-token step, padded rows included."""
    import torch
    from test_eagle3 import _random_draft

    from maverick.runtime.batch import build_forward_batch
    from maverick.runtime.cuda_graph import RoundGraphs
    from maverick.runtime.kv_cache import SeqBlocks

    k, rows = 3, 4
    runner = runner_for(tiny_ckpt, max_seq_len=128)
    runner.attach_draft(_random_draft(), k)
    runner.graphs = _EagerGraphs(runner, [1, 2, 4], [16], verify_q=k + 1)
    rounds = RoundGraphs(runner, runner.spec)
    seqs = []
    for i, start in enumerate((13, 31)):  # the second crosses a block (8) as its chain goes on
        blocks = runner.kv.grow(i, start + k + 1)
        seqs.append(StepSeq(i, [5] * (k + 1), start, blocks, num_logits=k + 1, draft_len=k, draft_start=start - 2,
                            draft_tokens=[4, 5, 6]))
    verify = rounds._batches(seqs, rows)["verify"]
    const = {"rows": torch.arange(rows), "local_table": torch.zeros(rows, 1, dtype=torch.long),
             "local_slots": torch.full((rows,), runner.scratch_local)}
    for d in range(1, k):
        got = rounds._chain(verify, d, torch.zeros(rows, dtype=torch.long), const)
        steps = [StepSeq(s.seq_id, [0], s.start + d - 1, SeqBlocks(s.blocks.global_blocks, [])) for s in seqs]
        want = build_forward_batch(steps, runner.block_size, runner.chunk, runner.scratch_global, runner.scratch_local,
                                   pad_batch=rows, pad_q=1, pad_tokens=rows,
                                   pad_global_blocks=runner.graph_blocks).pad_logits(rows)
        for name, t in want.tensors().items():
            assert torch.equal(getattr(got, name), t), (d, name)
    for s in seqs:
        runner.kv.free(s.seq_id)
