"""`services.gateway.sampling.sample`: greedy, seeded sampling, top-k, top-p, log-probabilities."""

import pytest
import torch

from services.gateway.requests import SamplingConfig
from services.gateway.sampling import sample

pytestmark = pytest.mark.timeout(60)

V = 200


def cfg(**kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=1, **kw)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator, n: int) -> list[int]:
    """n tokens drawn one after another from the same generator (as the engine does, one per step)."""
    return [sample(logits[None], [config], [generator])[0][0] for _ in range(n)]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(6, V, generator=gen(0)) * 3


@pytest.fixture
def flat() -> torch.Tensor:
    """A flat-ish distribution: many tokens have comparable probability."""
    return torch.randn(V, generator=gen(1)) * 0.1


def test_greedy_is_argmax(logits):
    tokens, logprobs = sample(logits, [cfg()] * len(logits), [gen(i) for i in range(len(logits))])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [0.0] * len(logits)  # not asked for


def test_greedy_rows_stay_argmax_next_to_sampled_rows(logits):
    configs = [cfg(), cfg(temperature=1.0), cfg(), cfg(temperature=1.0), cfg(), cfg()]
    tokens, _ = sample(logits, configs, [gen(i) for i in range(len(configs))])
    argmax = logits.argmax(dim=-1).tolist()
    for i, c in enumerate(configs):
        if c.greedy:
            assert tokens[i] == argmax[i]


def test_same_seed_same_tokens_different_seed_differs(flat):
    c = cfg(temperature=1.0)
    first = draws(flat, c, gen(1234), 20)
    again = draws(flat, c, gen(1234), 20)
    other = draws(flat, c, gen(4321), 20)
    assert first == again
    assert first != other
    assert len(set(first)) > 5  # it really samples on a flat distribution


def test_seeded_rows_do_not_depend_on_batch_neighbours(flat, logits):
    """A sequence's draws depend on its own generator only, not on which rows share the batch."""
    c = cfg(temperature=1.0)
    alone = [sample(flat[None], [c], [g])[0][0] for g in [gen(7)] for _ in range(10)]
    g7, g8 = gen(7), gen(8)
    batched = []
    for _ in range(10):
        tokens, _ = sample(torch.stack([logits[0], flat]), [c, c], [g8, g7])
        batched.append(tokens[1])
    assert batched == alone


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_is_argmax(logits, temperature):
    c = cfg(temperature=temperature, top_k=1)
    g = gen(3)
    for row in logits:
        assert draws(row, c, g, 20) == [int(row.argmax())] * 20


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_tiny_top_p_is_argmax(logits, temperature):
    c = cfg(temperature=temperature, top_p=1e-6)
    g = gen(4)
    for row in logits:
        assert draws(row, c, g, 20) == [int(row.argmax())] * 20


def test_top_k_restricts_to_the_k_best(flat):
    k = 5
    best = set(flat.topk(k).indices.tolist())
    seen = draws(flat, cfg(temperature=2.0, top_k=k), gen(5), 400)
    assert set(seen) <= best
    assert len(set(seen)) == k  # all k are reachable at this temperature


def test_top_p_keeps_the_nucleus_and_the_crossing_token():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    # sorted: 0.5, 0.3 (cumulative 0.8 crosses 0.7 and is kept), then 0.1, 0.05, 0.05 are dropped
    seen = draws(logits, cfg(temperature=1.0, top_p=0.7), gen(6), 300)
    assert set(seen) == {1, 3}
    seen = draws(logits, cfg(temperature=1.0, top_p=0.4), gen(6), 100)
    assert set(seen) == {1}


def test_top_k_and_top_p_together(flat):
    k = 8
    best = set(flat.topk(k).indices.tolist())
    seen = draws(flat, cfg(temperature=1.0, top_k=k, top_p=0.5), gen(9), 300)
    assert set(seen) <= best
    assert 1 < len(set(seen)) < k  # top_p cut the k further


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    cold = draws(logits, cfg(temperature=0.05), gen(10), 200)
    hot = draws(logits, cfg(temperature=100.0), gen(10), 400)
    assert set(cold) == {0}
    assert set(hot) == {0, 1, 2, 3}


def test_logprobs_are_log_softmax_of_the_model_logits(logits):
    configs = [
        cfg(return_logprobs=True),
        cfg(temperature=0.7, return_logprobs=True),
        cfg(temperature=1.0),  # did not ask
        cfg(temperature=2.0, top_k=10, return_logprobs=True),
        cfg(temperature=1.0, top_p=0.5, return_logprobs=True),
        cfg(),
    ]
    tokens, logprobs = sample(logits, configs, [gen(100 + i) for i in range(len(configs))])
    expected = logits.log_softmax(dim=-1)
    for i, c in enumerate(configs):
        if c.return_logprobs:
            # under the model: the temperature and the truncation do not change the reported value
            assert logprobs[i] == pytest.approx(float(expected[i, tokens[i]]), abs=1e-5)
            assert logprobs[i] <= 0.0
        else:
            assert logprobs[i] == 0.0


@pytest.mark.parametrize("temperature", [1e-40, 1e-38, 1e-30])
def test_tiny_temperature_is_argmax_not_an_error(logits, temperature):
    """logits / T overflows float32 to inf for tiny T; softmax of inf is NaN and multinomial raises,
    which in the engine's step killed the engine thread for every request."""
    for top in ({}, {"top_k": 5}, {"top_p": 0.9}):
        c = cfg(temperature=temperature, return_logprobs=True, **top)
        tokens, logprobs = sample(logits, [c] * len(logits), [gen(i) for i in range(len(logits))])
        assert tokens == logits.argmax(dim=-1).tolist()
        assert all(lp <= 0.0 for lp in logprobs)


def test_infinite_temperature_samples_every_token():
    logits = torch.tensor([5.0, 0.0, -5.0])
    seen = draws(logits, cfg(temperature=float("inf")), gen(11), 200)
    assert set(seen) == {0, 1, 2}
