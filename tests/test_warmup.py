"""The load-time warm-up runs an eager step of every shape class the kernels compile apart, so serving
compiles none (counted on GPU by `maverick-bench compiles`); here: which shapes, and that it leaves the KV
pools as it found them."""
from helpers import runner_for

from maverick.runtime.warmup import token_classes, warmup_shapes


def test_token_classes_are_dense_then_around_each_power_of_two():
    assert token_classes(100, 5) == [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 99, 100]
    assert token_classes(3, 17) == [1, 2, 3]


def test_warmup_shapes_cover_every_class_within_the_engines_limits():
    shapes = set(warmup_shapes(max_num_tokens=2048, max_batch_size=64, max_seq_len=4096, small_m=16,
                               decode_new_tokens=8))
    assert {(1, n) for n in range(1, 18)} | {(1, 2047), (1, 2048), (1, 1023), (1, 1025)} <= shapes  # tokens a step
    assert {(b, 1) for b in (*range(1, 18), 31, 32, 33, 63, 64)} <= shapes  # decode batches
    per_seq = {*range(1, 10), 16, 17, 32, 33, 64, 65}  # the decode kernel's rows, the prefill kernel's tiles
    assert {(b, q) for b in (2, 3, 4, 64) for q in per_seq if b * q <= 2048} <= shapes
    assert all(b <= 64 and b * q <= 2048 for b, q in shapes)
    short = warmup_shapes(max_num_tokens=2048, max_batch_size=4, max_seq_len=40, small_m=16, decode_new_tokens=8)
    assert max(q for _, q in short) == 39 and max(b for b, _ in short) == 4  # a sequence stays under max_seq_len


def test_warmup_runs_each_shape_and_rounds_with_a_draft_and_frees_every_block(tiny_ckpt):
    from test_eagle3 import _random_draft

    runner = runner_for(tiny_ckpt, max_seq_len=128)
    k = 2
    runner.attach_draft(_random_draft(), k)
    calls = []
    step = runner.step

    def record(seqs, rows):
        s = seqs[0]
        calls.append(("round", len(seqs), len(s.draft_tokens)) if s.draft_len else ("target", len(seqs), len(s.tokens)))
        return step(seqs, rows)

    runner.step = record
    ran = runner.warmup(64)
    assert runner.kv.all_free
    want = warmup_shapes(64, runner.max_batch_size, 128, 16, 8)
    assert [c[1:] for c in calls if c[0] == "target"] == want
    rounds = [c[1:] for c in calls if c[0] == "round"]
    assert rounds == [(b, e) for b in sorted(b for b, q in want if q == 1) for e in range(1, k + 2)]
    assert ran == want + rounds
