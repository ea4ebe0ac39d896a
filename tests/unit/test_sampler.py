"""Sampler: penalties, greedy, temperature, top-k, top-p, per-sequence seeded generators."""

import math

import pytest
import torch

from kiln.config import SamplingParams
from kiln.runtime.sampler import apply_penalties, filter_top_k_top_p, sample
from kiln.runtime.sequence import Sequence


def seq(params=None, prompt=(0,), output=(), seed=None):
    s = Sequence(list(prompt), params or SamplingParams())
    s.output_ids = list(output)
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


# ---- greedy ---------------------------------------------------------------------------------------------

def test_greedy_is_argmax_per_row():
    torch.manual_seed(0)
    logits = torch.randn(5, 37)
    seqs = [seq(SamplingParams(temperature=0)) for _ in range(5)]
    assert sample(logits.clone(), seqs) == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy_even_with_temperature():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    seqs = [seq(SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(4)]
    for _ in range(5):
        assert sample(logits.clone(), seqs) == logits.argmax(-1).tolist()


def test_filter_top_k_1_leaves_only_argmax():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9, 1.0])
    out = filter_top_k_top_p(logits, 1, 1.0)
    assert torch.isfinite(out).tolist() == [False, True, False, False, False]


def test_empty_batch():
    assert sample(torch.empty(0, 10), []) == []


# ---- repetition penalty ---------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative_only_seen():
    logits = torch.tensor([[2.0, -2.0, 4.0, -1.0, 3.0, -3.0]])
    # prompt sees 0 and 1, output sees 2, 3 (twice) ; 4 and 5 are unseen.
    s = seq(SamplingParams(repetition_penalty=2.0), prompt=[0, 1, 0], output=[2, 3, 3])
    out = apply_penalties(logits.clone(), [s])
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0, 3.0, -3.0]  # penalized once per token, not per count


def test_repetition_penalty_below_one_boosts():
    logits = torch.tensor([[2.0, -2.0, 5.0]])
    s = seq(SamplingParams(repetition_penalty=0.5), prompt=[0, 1])
    assert apply_penalties(logits.clone(), [s])[0].tolist() == [4.0, -1.0, 5.0]


def test_repetition_penalty_one_is_noop():
    logits = torch.randn(1, 8)
    s = seq(SamplingParams(), prompt=[0, 1, 2], output=[3])
    assert torch.equal(apply_penalties(logits.clone(), [s]), logits)


def test_repetition_penalty_can_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    s = seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])
    assert sample(logits.clone(), [s]) == [1]  # 3/2 = 1.5 < 2


# ---- presence / frequency penalties ---------------------------------------------------------------------

def test_presence_and_frequency_penalties_openai_semantics():
    logits = torch.zeros(1, 6)
    s = seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[4, 4, 5], output=[1, 1, 1, 2])
    out = apply_penalties(logits.clone(), [s])[0]
    expected = [0.0, -(0.25 * 3 + 0.5), -(0.25 * 1 + 0.5), 0.0, 0.0, 0.0]  # prompt tokens 4, 5 untouched
    assert torch.allclose(out, torch.tensor(expected))


def test_presence_frequency_noop_without_output():
    logits = torch.randn(1, 6)
    s = seq(SamplingParams(presence_penalty=1.0, frequency_penalty=1.0), prompt=[1, 2, 3])
    assert torch.equal(apply_penalties(logits.clone(), [s]), logits)


def test_negative_presence_penalty_rewards():
    logits = torch.zeros(1, 4)
    s = seq(SamplingParams(presence_penalty=-1.0), output=[3, 3])
    assert apply_penalties(logits.clone(), [s])[0].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_repetition_then_presence_frequency_order():
    logits = torch.tensor([[4.0, -4.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    s = seq(p, prompt=[0], output=[1, 1])
    out = apply_penalties(logits.clone(), [s])[0].tolist()
    # token 0: prompt only -> 4/2 ; token 1: -4*2 then -(0.5*2 + 1) ; token 2 unseen.
    assert out == [2.0, -10.0, 1.0]


def test_penalties_are_per_row():
    logits = torch.ones(2, 4)
    a = seq(SamplingParams(frequency_penalty=1.0), output=[0])
    b = seq(SamplingParams(frequency_penalty=1.0), output=[3, 3])
    out = apply_penalties(logits.clone(), [a, b])
    assert out.tolist() == [[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0]]


# ---- top-k ----------------------------------------------------------------------------------------------

def test_top_k_never_samples_outside_top_k():
    torch.manual_seed(2)
    vocab, k = 64, 5
    logits = torch.randn(vocab) * 0.5  # flat-ish so the tail would be drawn often without top-k
    allowed = set(torch.topk(logits, k).indices.tolist())
    params = SamplingParams(temperature=1.0, top_k=k)
    seqs = [seq(params, seed=1000 + i) for i in range(400)]
    draws = sample(logits.expand(len(seqs), vocab).clone(), seqs)
    assert set(draws) <= allowed
    assert len(set(draws)) == k  # and all of the k are reachable


def test_top_k_filter_keeps_exactly_k():
    torch.manual_seed(3)
    logits = torch.randn(100)
    out = filter_top_k_top_p(logits, 7, 1.0)
    keep = torch.isfinite(out)
    assert keep.sum() == 7
    assert set(keep.nonzero().flatten().tolist()) == set(torch.topk(logits, 7).indices.tolist())
    assert torch.equal(out[keep], logits[keep])


def test_top_k_at_least_vocab_is_noop():
    logits = torch.randn(10)
    assert torch.equal(filter_top_k_top_p(logits, 10, 1.0), logits)
    assert torch.equal(filter_top_k_top_p(logits, 0, 1.0), logits)


# ---- top-p ----------------------------------------------------------------------------------------------

# probabilities 0.5, 0.25, 0.15, 0.07, 0.03 placed at shuffled vocabulary positions
PROBS = {3: 0.5, 0: 0.25, 4: 0.15, 1: 0.07, 2: 0.03}


def probs_logits():
    logits = torch.empty(5)
    for i, p in PROBS.items():
        logits[i] = math.log(p)
    return logits


@pytest.mark.parametrize(
    "top_p,kept",
    [
        (0.3, {3}),
        (0.5 - 1e-3, {3}),
        (0.6, {3, 0}),
        (0.74, {3, 0}),
        (0.8, {3, 0, 4}),
        (0.89, {3, 0, 4}),
        (0.95, {3, 0, 4, 1}),
        (0.99, {3, 0, 4, 1, 2}),
    ],
)
def test_top_p_keeps_smallest_nucleus(top_p, kept):
    out = filter_top_k_top_p(probs_logits(), 0, top_p)
    assert set(torch.isfinite(out).nonzero().flatten().tolist()) == kept


def test_top_p_sampling_stays_in_nucleus():
    params = SamplingParams(temperature=1.0, top_p=0.8)
    seqs = [seq(params, seed=i) for i in range(300)]
    draws = sample(probs_logits().expand(300, 5).clone(), seqs)
    assert set(draws) == {3, 0, 4}


def test_top_k_then_top_p():
    # top_k 2 renormalizes over {3, 0}: 2/3, 1/3 ; top_p 0.6 then keeps only {3}.
    out = filter_top_k_top_p(probs_logits(), 2, 0.6)
    assert set(torch.isfinite(out).nonzero().flatten().tolist()) == {3}


# ---- seeds and temperature ------------------------------------------------------------------------------

def draws(seed, n=30, other=None):
    torch.manual_seed(5)
    logits = torch.randn(1, 40)
    params = SamplingParams(temperature=1.0, seed=seed)
    s = seq(params, seed=seed)
    out = []
    for _ in range(n):
        batch = [s] if other is None else [other, s]
        rows = logits if other is None else torch.cat([torch.randn(1, 40), logits])
        out.append(sample(rows.clone(), batch)[-1])
    return out


def test_seeded_generator_reproduces_draws():
    a, b = draws(123), draws(123)
    assert a == b
    assert len(set(a)) > 3  # actually random, not collapsed onto one token
    assert draws(124) != a


def test_seed_reproduces_whatever_the_batch():
    alone = draws(77)
    other = seq(SamplingParams(temperature=1.0), seed=999)
    assert draws(77, other=other) == alone
    unseeded = seq(SamplingParams(temperature=1.0))  # draws from the global generator
    assert draws(77, other=unseeded) == alone


def freq_of_top(temperature, n=2000):
    logits = torch.tensor([2.0, 0.0])
    params = SamplingParams(temperature=temperature)
    seqs = [seq(params, seed=i) for i in range(n)]
    return sum(t == 0 for t in sample(logits.expand(n, 2).clone(), seqs)) / n


def test_temperature_scaling():
    low, one, high = freq_of_top(0.5), freq_of_top(1.0), freq_of_top(4.0)
    # P(top) = sigmoid(2 / T): 0.982, 0.881, 0.622
    assert abs(low - 1 / (1 + math.exp(-4))) < 0.03
    assert abs(one - 1 / (1 + math.exp(-2))) < 0.03
    assert abs(high - 1 / (1 + math.exp(-0.5))) < 0.04
    assert low > one > high


def test_temperature_scales_logits_before_draw():
    logits = torch.tensor([[1.0, 0.5, -0.3, 2.0]])
    s = seq(SamplingParams(temperature=0.7), seed=42)
    got = [sample(logits.clone(), [s])[0] for _ in range(20)]
    g = torch.Generator().manual_seed(42)
    probs = torch.softmax(logits[0] / 0.7, -1)
    want = [int(torch.multinomial(probs, 1, generator=g).item()) for _ in range(20)]
    assert got == want


def test_extreme_settings_never_break_sampling():
    """Values a request may carry but float32 cannot follow: a top_p that rounds to 0, a temperature so
    small that logits overflow, bad words that ban every token. Each still gives a token."""
    from kiln.config import SamplingParams as SP
    from kiln.runtime.sampler import sample as sample_tokens
    from kiln.runtime.sequence import Sequence as Seq

    torch.manual_seed(0)
    logits = torch.randn(3, 8) * 5
    seqs = [
        Seq([1, 2], SP(temperature=1.0, top_p=1e-300)),
        Seq([1, 2], SP(temperature=1e-30)),
        Seq([1, 2], SP(temperature=1.0, bad_token_ids=tuple((t,) for t in range(8)))),
    ]
    tokens = sample_tokens(logits.clone(), seqs)
    assert tokens[0] == int(logits[0].argmax())  # only the top-1 token is left
    assert tokens[1] == int(logits[1].argmax())
    assert 0 <= tokens[2] < 8


def test_one_penalized_row_in_a_greedy_batch_is_still_penalized():
    """The all-greedy fast path must not skip a row whose penalty changes its argmax."""
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    plain = seq(SamplingParams(temperature=0), output=(1,))
    penalized = seq(SamplingParams(temperature=0, repetition_penalty=2.0), output=(1,))
    assert plain.params.plain_greedy and not penalized.params.plain_greedy
    assert sample(logits.clone(), [plain, penalized]) == [1, 2]
    banned = seq(SamplingParams(temperature=0, bad_token_ids=((1,),)))
    assert sample(logits.clone(), [plain, banned]) == [1, 2]


def test_logprobs_are_recorded_in_an_otherwise_greedy_batch():
    logits = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    plain, wants = seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=0, logprobs=1))
    assert sample(logits.clone(), [plain, wants]) == [1, 0]
    assert plain.logprobs == [] and wants.logprobs == [pytest.approx(math.log(1 / (1 + math.exp(-3.0))))]


def test_sequence_ids_equal_slices_of_all_ids():
    s = seq(prompt=range(7), output=range(100, 105))
    for start in range(13):
        for end in range(start, 13):
            assert s.ids(start, end) == s.all_ids[start:end], (start, end)


def test_filter_rows_equals_the_one_row_filter():
    from kiln.runtime.sampler import filter_rows

    torch.manual_seed(9)
    logits = torch.randn(6, 50) * 3
    logits[2, :10] = logits[2, 10]  # ties at the k-th value are kept by both
    settings = [(0, 1.0), (5, 1.0), (12, 1.0), (0, 0.7), (7, 0.4), (50, 1e-9)]
    got = filter_rows(logits.clone(), [k for k, _ in settings], [p for _, p in settings])
    for row, (k, p) in enumerate(settings):
        assert torch.equal(got[row], filter_top_k_top_p(logits[row].clone(), k, p)), (k, p)


def test_a_mixed_batch_draws_each_seeded_row_as_alone():
    """Greedy, penalized, seeded and unseeded rows sampled together: each seeded row draws what it
    draws alone, greedy rows take the argmax, and unseeded rows stay inside their top-k."""
    torch.manual_seed(4)
    logits = torch.randn(5, 30)
    make = [
        lambda: seq(SamplingParams(temperature=0)),
        lambda: seq(SamplingParams(temperature=0.9, top_k=4, seed=3), seed=3),
        lambda: seq(SamplingParams(temperature=1.3, top_p=0.8, seed=5), seed=5),
        lambda: seq(SamplingParams(temperature=1.0, top_k=3)),
        lambda: seq(SamplingParams(temperature=0.5, repetition_penalty=1.5, seed=8), output=(1, 2), seed=8),
    ]
    for _ in range(10):
        together = sample(logits.clone(), [m() for m in make])
        alone = [sample(logits[i : i + 1].clone(), [m()])[0] for i, m in enumerate(make)]
        assert together[0] == alone[0] == int(logits[0].argmax())
        assert together[1] == alone[1] and together[2] == alone[2] and together[4] == alone[4]
        assert together[3] in torch.topk(logits[3], 3).indices.tolist()
